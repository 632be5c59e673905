"""The Triton kernels against the PyTorch reference, forward and backward (CPU: Triton's interpreter).

Without a GPU, conftest turns the interpreter on (TRITON_INTERPRET=1) before the kernels are defined,
so these tests run the kernels' own code on CPU tensors. With a GPU they run on it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402

from mhc_lm.kernels import glue, selfcheck, use_triton  # noqa: E402
from mhc_lm.kernels import sinkhorn as ks  # noqa: E402
from mhc_lm.residual import MIXERS, make_mixer  # noqa: E402
from mhc_lm.residual.base import read_streams, write_streams  # noqa: E402
from mhc_lm.residual.sinkhorn import sinkhorn, sinkhorn_reference  # noqa: E402

from conftest import ROOT  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32 = dict(rtol=1e-5, atol=1e-5)  # the contract: the kernels match the reference to 1e-5 in fp32
BF16 = dict(rtol=8e-3, atol=1e-5)  # one rounding of an fp32 result to bf16 (2^-8 relative)


def ragged(block: int) -> int:
    """A token count that is not a multiple of the block: one full program, one partial."""
    return block + block // 2 + 1


def grads(outputs, inputs, seed=0):
    """Gradients of sum(outputs * fixed random weights) w.r.t. inputs (a generic VJP probe). The weights are
    bf16 numbers, so a bf16 output and its fp32 reference get exactly the same ones."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    probes = [torch.randn(o.shape, generator=gen).bfloat16().to(o.device, o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, inputs, probes)


def close(actual, expected, dtype):
    torch.testing.assert_close(actual.float(), expected.float(), **(FP32 if dtype == torch.float32 else BF16))


# ---------------------------------------------------------------------------------------------
# 1. Sinkhorn


@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1.0, 50.0])
def test_sinkhorn_kernel_matches_reference(n, dtype, magnitude):
    torch.manual_seed(n)
    tokens = ragged(ks.block_tokens(n))
    logits = (torch.randn(tokens, n, n) * magnitude).to(DEVICE, dtype).requires_grad_()
    comb = ks.sinkhorn(logits, 20, 1e-6)
    assert comb.dtype == torch.float32
    (grad,) = grads([comb], [logits])
    assert grad.dtype == dtype
    ref_logits = logits.detach().float().requires_grad_()  # the reference in fp32 from the same inputs
    ref = sinkhorn_reference(ref_logits, 20, 1e-6)
    (ref_grad,) = grads([ref], [ref_logits])
    torch.testing.assert_close(comb, ref, **FP32)  # fp32 out whatever the input dtype
    close(grad, ref_grad, dtype)
    assert torch.isfinite(grad.float()).all()


@pytest.mark.parametrize("iters", [1, 3])
def test_sinkhorn_kernel_other_iteration_counts(iters):
    torch.manual_seed(0)
    logits = (torch.randn(2, 37, 4, 4) * 3).to(DEVICE).requires_grad_()
    comb = ks.sinkhorn(logits, iters, 1e-4)
    ref = sinkhorn_reference(logits, iters, 1e-4)
    torch.testing.assert_close(comb, ref, **FP32)
    for ours, theirs in zip(grads([comb], [logits]), grads([ref], [logits])):
        torch.testing.assert_close(ours, theirs, **FP32)


def test_sinkhorn_dispatch_by_kernel_option():
    logits = torch.randn(5, 4, 4, device=DEVICE, requires_grad=True)
    for kernel in ("triton", "torch"):  # the two code paths; `auto` picks one of them (next test)
        comb = sinkhorn(logits, kernel=kernel)
        torch.testing.assert_close(comb, sinkhorn_reference(logits), **FP32)
    # fp64 stays on the PyTorch path under auto (it is what the fp64 gradcheck checks).
    assert sinkhorn(logits.double(), kernel="auto").dtype == torch.float64


def test_auto_resolves_to_torch_on_cpu_and_to_triton_on_cuda_with_triton(monkeypatch):
    """`auto` is the kernels exactly for a CUDA tensor of at most 8 streams with triton installed: checked with
    triton's availability patched both ways and a stand-in CUDA tensor, so it runs on any machine."""
    from mhc_lm import kernels

    residual_sinkhorn = sys.modules["mhc_lm.residual.sinkhorn"]  # the module (the package exports the function)
    taken = []
    monkeypatch.setattr(residual_sinkhorn, "sinkhorn_ops",
                        lambda: (lambda *args: taken.append("triton") or sinkhorn_reference(*args), None))
    cpu_logits = torch.randn(5, 4, 4)
    sinkhorn(cpu_logits, kernel="auto")
    assert taken == []  # CPU: PyTorch, though triton is installed and the interpreter may be on
    sinkhorn(cpu_logits, kernel="triton")
    assert taken == ["triton"]  # the probe sees the kernel path when it is taken

    monkeypatch.setattr(selfcheck, "check_once", lambda device: None)
    fake_cuda = type("FakeCuda", (), {"is_cuda": True, "device": torch.device("cuda")})()
    for installed in (True, False):
        monkeypatch.setattr(kernels, "_TRITON_AVAILABLE", installed)
        assert kernels.use_triton("auto", fake_cuda, 4) is installed
        assert kernels.use_triton("auto", torch.zeros(1), 4) is False
    monkeypatch.setattr(kernels, "_TRITON_AVAILABLE", True)
    assert kernels.use_triton("auto", fake_cuda, kernels.MAX_KERNEL_STREAMS + 1) is False


# ---------------------------------------------------------------------------------------------
# 2. The coefficient epilogue


def epilogue_reference(mixes, r, scale, base, n, iters, eps, hc_eps):
    """The generator's steps 3-4 (docs/residual.md, section 2) in torch ops, from the same matmul output and r."""
    mixes = mixes * r
    pre_m, post_m, res_m = mixes.split([n, n, n * n], dim=-1)
    base_pre, base_post, base_res = base.split([n, n, n * n])
    pre = torch.sigmoid(scale[0] * pre_m + base_pre) + hc_eps
    post = 2 * torch.sigmoid(scale[1] * post_m + base_post)
    comb = sinkhorn_reference((scale[2] * res_m + base_res).unflatten(-1, (n, n)), iters, eps)
    return pre, post, comb


@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize("magnitude", [1.0, 50.0])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's sigmoid at -100: exact 0
def test_coefficient_epilogue_matches_reference(n, magnitude):
    """Res logits up to |50| (magnitude 50, scale 1): the Sinkhorn's hardest inputs."""
    torch.manual_seed(n)
    tokens = ragged(ks.block_tokens(n))
    width = 2 * n + n * n
    mixes = (torch.randn(tokens, width) * magnitude).to(DEVICE).requires_grad_()
    r = (torch.rand(tokens, 1) + 0.5).to(DEVICE).requires_grad_()
    scale = torch.tensor([0.7, 1.3, 0.8], device=DEVICE, requires_grad=True)  # all != 1
    base = torch.randn(width, device=DEVICE, requires_grad=True)
    inputs = (mixes, r, scale, base)
    ours = ks.mhc_coefficients(*inputs, n, 20, 1e-6, 1e-6)
    ref = epilogue_reference(*inputs, n, 20, 1e-6, 1e-6)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **FP32)
    for a, b in zip(grads(ours, inputs), grads(ref, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))


def test_coefficient_epilogue_with_unused_outputs():
    """Autograd hands None for outputs that do not reach the loss; the backward treats them as zero."""
    n = 4
    mixes = torch.randn(10, 2 * n + n * n, device=DEVICE, requires_grad=True)
    r = torch.ones(10, 1, device=DEVICE)
    scale, base = torch.ones(3, device=DEVICE), torch.zeros(2 * n + n * n, device=DEVICE)
    _, post, _ = ks.mhc_coefficients(mixes, r, scale, base, n, 20, 1e-6, 1e-6)
    (grad,) = torch.autograd.grad(post.sum(), mixes)
    _, ref_post, _ = epilogue_reference(mixes, r, scale, base, n, 20, 1e-6, 1e-6)
    (ref_grad,) = torch.autograd.grad(ref_post.sum(), mixes)
    torch.testing.assert_close(grad, ref_grad, **FP32)
    assert grad[:, 2 * n:].abs().max() == 0  # nothing flows into the res block


# ---------------------------------------------------------------------------------------------
# 3. The apply kernels (generic in comb)


def stream_inputs(n, dtype, expanded=False, seed=0):
    """Streams (B, T, n, C) with B*T and C not multiples of the blocks, and random coefficients."""
    torch.manual_seed(seed)
    bt, bc = glue.blocks(n)
    B, T, C = 2, ragged(bt) // 2 + 1, bc + bc // 2 + 3
    if expanded:  # the embedding copied into every stream (stride 0), as the model's first layer sees it
        streams = torch.randn(B, T, C).to(DEVICE, dtype).unsqueeze(-2).expand(B, T, n, C)
    else:
        streams = torch.randn(B, T, n, C).to(DEVICE, dtype)
    h = (torch.rand(B, T, n) * 2).to(DEVICE)
    out = torch.randn(B, T, C).to(DEVICE, dtype)
    comb = torch.rand(B, T, n, n).to(DEVICE)
    return [t.detach().requires_grad_() for t in (h, out, comb, streams)]


def reference_from(tensors):
    """The same leaves in fp32 (the reference computes in the kernels' precision)."""
    return [t.detach().float().requires_grad_() for t in tensors]


@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("expanded", [False, True])
def test_read_kernel_matches_reference(n, dtype, expanded):
    h, _, _, streams = stream_inputs(n, dtype, expanded)
    y = glue.read_streams(h, streams)
    assert y.dtype == dtype and y.shape == streams.shape[:-2] + streams.shape[-1:]
    ref_h, ref_streams = reference_from([h, streams])
    ref = read_streams(ref_h, ref_streams)
    close(y, ref, dtype)
    for a, b, leaf in zip(grads([y], [h, streams]), grads([ref], [ref_h, ref_streams]), [h, streams]):
        assert a.dtype == leaf.dtype
        close(a, b, a.dtype)  # fp32 gradients (of h) are exact sums of bf16 products: the fp32 tolerance


@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("expanded", [False, True])
def test_write_kernel_matches_reference(n, dtype, expanded):
    inputs = stream_inputs(n, dtype, expanded, seed=n)
    y = glue.write_streams(*inputs)
    assert y.dtype == dtype and y.shape == inputs[3].shape
    ref_inputs = reference_from(inputs)
    ref = write_streams(*ref_inputs)
    close(y, ref, dtype)
    for a, b, leaf in zip(grads([y], inputs), grads([ref], ref_inputs), inputs):
        assert a.dtype == leaf.dtype
        close(a, b, a.dtype)


def test_write_kernel_pins_the_comb_convention():
    """new stream i = sum_j comb[j, i] x_j (H_res = comb^T), by hand, through the kernel."""
    h_res = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    comb = h_res.T.reshape(1, 1, 2, 2).to(DEVICE)
    streams = torch.tensor([[10.0, 1.0], [20.0, 2.0]]).reshape(1, 1, 2, 2).to(DEVICE)
    zero = torch.zeros(1, 1, 2, device=DEVICE)
    out = glue.write_streams(zero, zero, comb, streams)[0, 0]
    torch.testing.assert_close(out.cpu(), torch.tensor([[11.0, 1.1], [17.0, 1.7]]))


def test_write_kernel_promotes_mixed_dtypes_like_the_reference():
    h, out, comb, streams = stream_inputs(4, torch.float32)
    out = out.detach().bfloat16().requires_grad_()
    y = glue.write_streams(h, out, comb, streams)
    assert y.dtype == write_streams(h, out, comb, streams).dtype == torch.float32
    (grad_out,) = grads([y], [out])
    assert grad_out.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# 4. Whole mixers: the kernel path equals the PyTorch path


def mixer_pair(name, n, dim, **options):
    torch.manual_seed(0)
    fast = make_mixer(name, dim, n, 1, kernel="triton", **options).to(DEVICE)
    slow = make_mixer(name, dim, n, 1, kernel="torch", **options).to(DEVICE)
    with torch.no_grad():
        for p in fast.parameters():
            p.normal_(0, 0.3)
    slow.load_state_dict(fast.state_dict())
    return fast, slow


# Options that take each variant away from its identity-leaning start, so that every coefficient matters.
STRONG_OPTIONS = {"mhc": {"fn_init_std": 0.5, "scale_init": 1.0}, "hc": {"scale_init": 0.5},
                  "orthogonal": {"fn_init_std": 0.5, "scale_init": 1.0},  # a signed comb through the apply kernels
                  "orthostochastic": {"fn_init_std": 0.5, "scale_init": 1.0}}


def stream_variants() -> list[str]:
    """Every registered variant with n streams (all but the one-stream plain residual)."""
    return sorted(name for name in MIXERS if name != "residual")


def count_kernel_calls(monkeypatch) -> list[str]:
    """Record each call of the fused apply kernels (the mixers look them up at every forward)."""
    calls = []
    for name in ("read_streams", "write_streams"):
        real = getattr(glue, name)
        monkeypatch.setattr(glue, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    return calls


def test_every_stream_variant_is_covered():
    assert {"hc", "mhc", "ihc"} <= set(stream_variants())
    assert make_mixer("residual", 8, 1, 0).n == 1  # the one variant left out has nothing to fuse


@pytest.mark.parametrize("name", stream_variants())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixer_kernel_path_equals_torch_path(name, dtype, monkeypatch):
    """Every n-stream variant (the registry, so new ones join) through the fused apply kernels, forward and
    backward, against its PyTorch path; `residual.kernel=triton` must reach the kernels, not be ignored."""
    n, dim = 4, 48
    fast, slow = mixer_pair(name, n, dim, **STRONG_OPTIONS.get(name, {}))
    linear = torch.nn.Linear(dim, dim).to(DEVICE, dtype)
    streams = torch.randn(2, 41, n, dim).to(DEVICE, dtype)
    x_fast, x_slow = streams.clone().requires_grad_(), streams.clone().requires_grad_()
    calls = count_kernel_calls(monkeypatch)
    y_fast = fast(x_fast, linear)
    assert calls == ["read_streams", "write_streams"], f"residual={name} kernel=triton took {calls}"
    y_slow = slow(x_slow, linear)
    assert len(calls) == 2  # kernel=torch does not touch them
    assert y_fast.dtype == y_slow.dtype
    # bf16: the torch path rounds its products and sums to bf16 (the kernels once, at the end), so where
    # stream and branch cancel the error is a few bf16 ulps of the operands, not of the result.
    tol = FP32 if dtype == torch.float32 else dict(rtol=2e-2, atol=max(2e-2, 2 ** -6 * y_slow.abs().max().item()))
    torch.testing.assert_close(y_fast.float(), y_slow.float(), **tol)
    g_fast = grads([y_fast], [x_fast, *fast.parameters()])
    g_slow = grads([y_slow], [x_slow, *slow.parameters()])
    for (pname, _), a, b in zip([("streams", None), *fast.named_parameters()], g_fast, g_slow):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.float(), b.float(), rtol=tol["rtol"], atol=tol["atol"] * scale, msg=pname)


def test_mhc_coefficients_through_the_kernel_path():
    fast, slow = mixer_pair("mhc", 3, 16, fn_init_std=0.5)
    streams = torch.randn(3, 11, 3, 16, device=DEVICE)
    for a, b in zip(fast.coefficients(streams), slow.coefficients(streams)):
        torch.testing.assert_close(a, b, **FP32)


def test_kernel_path_compiles_without_graph_breaks():
    """The kernels are torch.library custom ops: torch.compile(fullgraph=True) takes them as single nodes."""
    torch._dynamo.reset()
    fast, slow = mixer_pair("mhc", 4, 32, fn_init_std=0.5)
    linear = torch.nn.Linear(32, 32).to(DEVICE)
    compiled = torch.compile(lambda x: fast(x, linear), fullgraph=True, backend="aot_eager")
    streams = torch.randn(2, 9, 4, 32, device=DEVICE)
    x_compiled, x_eager = streams.clone().requires_grad_(), streams.clone().requires_grad_()
    out = compiled(x_compiled)
    ref = slow(x_eager, linear)
    torch.testing.assert_close(out, ref, **FP32)
    torch.testing.assert_close(grads([out], [x_compiled])[0], grads([ref], [x_eager])[0], **FP32)


def test_every_kernel_compiles_for_a_gpu():
    """The interpreter runs the kernels' Python; only Triton's compiler rejects what it cannot lower (a
    non-constexpr axis, say). Compile each kernel for sm_90 with the bundled ptxas (no GPU needed)."""
    pytest.importorskip("triton.compiler")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "benchmarks/kernel_resources.py", "--check", "--iters", "2",
                             "--n", "3", "4", "8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("compiled in") == 3 * 8


def test_dispatch_rule():
    cpu = torch.zeros(1)
    assert not use_triton("torch", cpu, 4) and not use_triton("auto", cpu, 4)
    assert use_triton("triton", cpu, 4)  # under the interpreter (conftest) a CPU tensor may take the kernels
    if torch.cuda.is_available():
        cuda = torch.zeros(1, device="cuda")
        assert use_triton("auto", cuda, 4) and not use_triton("auto", cuda, 16) and not use_triton("torch", cuda, 4)


@pytest.mark.gpu
def test_auto_takes_the_kernels_on_a_gpu(monkeypatch):
    calls = []
    real = glue.write_streams
    monkeypatch.setattr(glue, "write_streams", lambda *a: calls.append(1) or real(*a))
    mixer = make_mixer("mhc", 64, 4, 0).cuda()
    mixer(torch.randn(2, 8, 4, 64, device="cuda"), lambda x: x)
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2, 4, 8])
def test_gpu_kernels_at_scale_in_bf16(n):
    """64K tokens through the epilogue and the Sinkhorn on the device, against the fp32 reference."""
    torch.manual_seed(0)
    logits = (torch.randn(65536, n, n, device="cuda") * 8).bfloat16().requires_grad_()
    comb = ks.sinkhorn(logits, 20, 1e-6)
    ref_logits = logits.detach().float().requires_grad_()
    ref = sinkhorn_reference(ref_logits, 20, 1e-6)
    torch.testing.assert_close(comb, ref, **FP32)
    close(grads([comb], [logits])[0], grads([ref], [ref_logits])[0], torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# 5. The self-check at first use (here under the interpreter; on a GPU, on the GPU)


def broken_ops(**overrides):
    """The real kernels with some replaced: a wrong result, or a failure like Triton's compiler's."""
    ops = selfcheck.kernel_ops()
    ops.update(overrides)
    return ops


def test_self_check_passes_and_measures_every_kernel():
    errors = selfcheck.self_check(DEVICE)
    assert set(errors) == {f"{k} {d}" for k in selfcheck.REFERENCES for d in ("forward", "backward")}
    assert max(errors.values()) <= 1e-5  # the fp32 contract, well inside the check's 1e-4


def test_self_check_references_are_independent_of_the_torch_path():
    """The check's fp64 references agree with the residual package's PyTorch path (a second, separate writing)."""
    logits = torch.randn(5, 3, 3, dtype=torch.float64) * 4
    torch.testing.assert_close(selfcheck.sinkhorn_fp64(logits, 7, 1e-6), sinkhorn_reference(logits, 7, 1e-6))
    h, out, comb, streams = (t.detach().double() for t in stream_inputs(3, torch.float32))
    flat = lambda t: t.flatten(0, 1)  # noqa: E731  (the check works on (tokens, ...))
    torch.testing.assert_close(selfcheck.write_fp64(flat(h), flat(out), flat(comb), flat(streams)),
                               flat(write_streams(h, out, comb, streams)))
    torch.testing.assert_close(selfcheck.read_fp64(flat(h), flat(streams)), flat(read_streams(h, streams)))


def assert_one_line_failure(err: Exception):
    message = str(err)
    assert "\n" not in message
    assert "residual.kernel=torch" in message and f"triton {triton.__version__}" in message
    assert selfcheck.describe_device(DEVICE) in message
    return message


def test_self_check_stops_on_a_wrong_kernel():
    real_write = glue.write_streams
    wrong = broken_ops(write_streams=lambda h, out, comb, x: real_write(h, out, comb.transpose(-1, -2), x))
    with pytest.raises(selfcheck.KernelCheckError) as err:
        selfcheck.self_check(DEVICE, ops=wrong)
    assert "write_streams forward differs from the reference" in assert_one_line_failure(err.value)


def test_self_check_stops_on_a_kernel_that_does_not_compile():
    def fails(*args):
        raise RuntimeError("PTX .version 8.7 does not support .target sm_120\nptxas fatal : Ptx assembly aborted")

    with pytest.raises(selfcheck.KernelCheckError) as err:
        selfcheck.self_check(DEVICE, ops=broken_ops(sinkhorn=fails))
    assert "RuntimeError: PTX .version 8.7 does not support .target sm_120 ptxas fatal" in \
        assert_one_line_failure(err.value)


def test_first_cuda_use_runs_the_check_once(monkeypatch):
    """use_triton checks at the first CUDA tensor per device, remembers a pass, and never checks CPU tensors."""
    from mhc_lm import kernels

    checked = []
    monkeypatch.setattr(selfcheck, "_CHECKED", set())
    monkeypatch.setattr(selfcheck, "self_check", lambda device: checked.append(str(device)))
    fake_cuda = type("FakeCuda", (), {"is_cuda": True, "device": torch.device(DEVICE)})()
    assert kernels.use_triton("auto", fake_cuda, 4) and kernels.use_triton("triton", fake_cuda, 4)
    assert checked == [DEVICE]  # once per process and device
    if not torch.cuda.is_available():
        assert kernels.use_triton("triton", torch.zeros(1), 4) and checked == [DEVICE]  # interpreter: no check
    assert not kernels.use_triton("torch", fake_cuda, 4)


def test_a_failed_check_stops_the_first_use(monkeypatch):
    from mhc_lm import kernels

    monkeypatch.setattr(selfcheck, "_CHECKED", set())
    real_read = glue.read_streams
    wrong = broken_ops(read_streams=lambda h, x: real_read(h, x) * 1.01)
    monkeypatch.setattr(selfcheck, "kernel_ops", lambda: wrong)
    fake_cuda = type("FakeCuda", (), {"is_cuda": True, "device": torch.device(DEVICE)})()
    for _ in range(2):  # a failure is not remembered as a pass
        with pytest.raises(selfcheck.KernelCheckError) as err:
            kernels.check_before_training("auto", 4, DEVICE) if torch.cuda.is_available() else \
                kernels.use_triton("auto", fake_cuda, 4)
        assert "read_streams forward differs" in assert_one_line_failure(err.value)
    kernels.check_before_training("auto", 1, DEVICE)  # one stream: nothing to fuse, nothing checked
