"""The kernels' self-check at first use: compile them and compare with a reference on a tiny input.

A user on a CUDA machine gets the kernels by default (`residual.kernel=auto`). If Triton cannot
compile them for that GPU, or they compute something else there, the run must stop at once with one
line that says so and names the way around (`residual.kernel=torch`), not fail or drift halfway
through training. `check_once(device)` runs `self_check` the first time a process sends a CUDA
tensor through the kernels (`mhc_lm.kernels.use_triton`; train.py calls it again before its first step,
which covers a compiled model, whose traced forward skips it). It costs one compilation of each
kernel, which the run needs anyway, and a few milliseconds.

The reference is written here in plain PyTorch, in fp64, independently of the residual package's
PyTorch path (which sits above the kernels and is what the tests compare with).
"""

from __future__ import annotations

from typing import Callable

import torch

from mhc_lm.errors import ConfigError

# The tiny input: n = 4 (the default), token and channel counts that are not multiples of any block.
N_STREAMS, TOKENS, WIDTH, ITERS, EPS = 4, 37, 40, 20, 1e-6
TOLERANCE = 1e-4  # relative to each output's largest entry; the fp32 contract is 1e-5

_CHECKED: set[str] = set()


class KernelCheckError(ConfigError):
    """The kernels failed their self-check on this device: the fix is the option `residual.kernel=torch`."""


def kernel_ops() -> dict[str, Callable]:
    """The four custom ops under test, by name (compiles nothing yet: Triton compiles at the first launch)."""
    from . import glue_ops, sinkhorn_ops

    sinkhorn, mhc_coefficients = sinkhorn_ops()
    read_streams, write_streams = glue_ops()
    return dict(sinkhorn=sinkhorn, mhc_coefficients=mhc_coefficients, read_streams=read_streams,
                write_streams=write_streams)


# ---------------------------------------------------------------------------------------------
# fp64 references


def sinkhorn_fp64(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """softmax over rows + eps, a column step, then iters - 1 (row, column) pairs (docs/sinkhorn.md)."""
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


def coefficients_fp64(mixes, r, scale, base, n: int, iters: int, eps: float, hc_eps: float,
                      project: Callable = sinkhorn_fp64):
    """The epilogue (SPEC 2.3-2.4) in the inputs' precision; `project` is the Sinkhorn (another one: gpu_check)."""
    pre_m, post_m, res_m = (mixes * r).split([n, n, n * n], dim=-1)
    base_pre, base_post, base_res = base.split([n, n, n * n])
    pre = torch.sigmoid(scale[0] * pre_m + base_pre) + hc_eps
    post = 2 * torch.sigmoid(scale[1] * post_m + base_post)
    return pre, post, project((scale[2] * res_m + base_res).unflatten(-1, (n, n)), iters, eps)


def read_fp64(h_pre, streams):
    return torch.einsum("tj,tjc->tc", h_pre, streams)


def write_fp64(h_post, out, comb, streams):
    return h_post[..., None] * out[:, None, :] + torch.einsum("tji,tjc->tic", comb, streams)


# ---------------------------------------------------------------------------------------------
# The comparison


def _inputs(name: str, n: int, tokens: int, width: int, magnitude: float, device, generator):
    def rand(*shape, low=-1.0, high=1.0):
        return (torch.rand(*shape, generator=generator, dtype=torch.float64) * (high - low) + low).to(device)

    if name == "sinkhorn":
        return (rand(tokens, n, n, low=-magnitude, high=magnitude),), (ITERS, EPS)
    if name == "mhc_coefficients":
        mixes = rand(tokens, 2 * n + n * n, low=-magnitude, high=magnitude)
        return (mixes, rand(tokens, 1, low=0.5, high=1.5), rand(3, low=0.5, high=1.5),
                rand(2 * n + n * n)), (n, ITERS, EPS, EPS)
    if name == "read_streams":
        return (rand(tokens, n, low=0.0, high=2.0), rand(tokens, n, width)), ()
    return (rand(tokens, n, low=0.0, high=2.0), rand(tokens, width), rand(tokens, n, n, low=0.0, high=1.0),
            rand(tokens, n, width)), ()


REFERENCES = dict(sinkhorn=sinkhorn_fp64, mhc_coefficients=coefficients_fp64, read_streams=read_fp64,
                  write_streams=write_fp64)


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(1, max |expected|); inf where the kernel gave NaN or inf."""
    diff = (actual.double() - expected).abs().max().item()
    return diff / max(1.0, expected.abs().max().item()) if diff == diff else float("inf")


def compare_kernels(device, n: int = N_STREAMS, dtype: torch.dtype = torch.float32, tokens: int = TOKENS,
                    width: int = WIDTH, magnitude: float = 1.0, ops: dict[str, Callable] | None = None,
                    seed: int = 0) -> dict[str, float]:
    """Each kernel, forward and backward, against its fp64 reference from the same inputs (cast to `dtype`):
    {"<kernel> forward" | "<kernel> backward": relative error}. Exceptions (a compilation failure) propagate."""
    ops = kernel_ops() if ops is None else ops
    generator = torch.Generator().manual_seed(seed)
    errors = {}
    with torch.autocast(torch.device(device).type, enabled=False), torch.enable_grad():
        for name, reference in REFERENCES.items():
            tensors, constants = _inputs(name, n, tokens, width, magnitude, device, generator)
            # The epilogue takes fp32 whatever the activations; the others the activation dtype.
            cast = torch.float32 if name == "mhc_coefficients" else dtype
            leaves = [t.to(cast).requires_grad_() for t in tensors]
            ref_leaves = [t.detach().double().requires_grad_() for t in leaves]  # the same rounded inputs
            outputs = _as_tuple(ops[name](*leaves, *constants))
            expected = _as_tuple(reference(*ref_leaves, *constants))
            errors[f"{name} forward"] = max(_error(a, b) for a, b in zip(outputs, expected))
            probes = [torch.rand(o.shape, generator=generator, dtype=torch.float64).to(device) for o in expected]
            grads = torch.autograd.grad(outputs, leaves, [p.to(o.dtype) for p, o in zip(probes, outputs)])
            ref_grads = torch.autograd.grad(expected, ref_leaves, probes)
            errors[f"{name} backward"] = max(_error(a, b) for a, b in zip(grads, ref_grads))
    return errors


# ---------------------------------------------------------------------------------------------
# The check


def describe_device(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return f"{device.type} (Triton interpreter)"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def failure_message(device, why: str) -> str:
    why = " ".join(str(why).split())  # one line, whatever the compiler printed
    why = why if len(why) <= 300 else why[:297] + "..."
    return (f"residual.kernel: the Triton kernels failed their self-check on {describe_device(device)} with triton "
            f"{_triton_version()} ({why}); run with residual.kernel=torch (the PyTorch path) to train without them")


def self_check(device, ops: dict[str, Callable] | None = None) -> dict[str, float]:
    """Compile and compare every kernel on a tiny fp32 input on `device`; returns the errors, raises
    KernelCheckError (one line) when a kernel fails to run or differs by more than TOLERANCE."""
    try:
        errors = compare_kernels(device, ops=ops)
    except Exception as err:  # a compilation or launch failure: whatever it is, the fix is the same
        raise KernelCheckError(failure_message(device, f"{type(err).__name__}: {err}")) from err
    bad = {name: error for name, error in errors.items() if not error <= TOLERANCE}
    if bad:
        name, error = next(iter(bad.items()))  # the first in order: a forward before its backward
        raise KernelCheckError(failure_message(device, f"{name} differs from the reference by {error:.1e}, "
                                                       f"allowed {TOLERANCE:.0e}"))
    return errors


def check_once(device) -> None:
    """`self_check` the first time this process uses the kernels on `device`; a passed check is remembered."""
    key = str(torch.device(device))
    if key in _CHECKED:
        return
    self_check(device)
    _CHECKED.add(key)
