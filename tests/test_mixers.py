"""The mixer interface: the comb = H_res^T convention, the invariants of docs/residual.md, shapes and gradients
of every variant."""

from __future__ import annotations

import pytest
import torch

from mhc_lm.residual import COMMON_OPTIONS, MIXERS, apply_comb, make_mixer
from mhc_lm.residual.registry import parse_options

# Streams per variant for the generic tests (the plain residual has exactly one).
VARIANT_N = {name: (1 if name == "residual" else 4) for name in MIXERS}


def test_comb_convention_pinned_with_an_asymmetric_matrix():
    """new stream i = sum_j H_res[i, j] x_j with H_res = comb^T, checked against hand arithmetic."""
    h_res = torch.tensor([[0.9, 0.1], [0.3, 0.7]])  # rows: what new streams 0 and 1 read
    comb = h_res.T.reshape(1, 1, 2, 2)
    streams = torch.tensor([[10.0, 1.0], [20.0, 2.0]]).reshape(1, 1, 2, 2)  # x_0 = (10, 1), x_1 = (20, 2)
    out = apply_comb(comb, streams)[0, 0]
    # new_0 = 0.9 * x_0 + 0.1 * x_1 = (11, 1.1); new_1 = 0.3 * x_0 + 0.7 * x_1 = (17, 1.7)
    torch.testing.assert_close(out, torch.tensor([[11.0, 1.1], [17.0, 1.7]]))
    # The transposed reading would give (15, 1.5) and (13, 1.3): the test tells the two apart.


def test_coefficients_return_h_res_in_paper_orientation():
    """With a zero branch the mixer maps x to H_res · x, H_res being what `coefficients` returns."""
    torch.manual_seed(0)
    mixer = make_mixer("mhc", 8, 3, 0, fn_init_std=0.5, scale_init=1.0, res_init="uniform")
    streams = torch.randn(2, 5, 3, 8)
    _, _, h_res = mixer.coefficients(streams)
    assert not torch.allclose(h_res, h_res.transpose(-1, -2), atol=1e-3)  # really asymmetric
    out = mixer(streams, torch.zeros_like)
    torch.testing.assert_close(out, torch.einsum("btij,btjc->btic", h_res, streams))


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_shapes_and_backward_every_mixer(name):
    torch.manual_seed(0)
    n, dim = VARIANT_N[name], 16
    mixer = make_mixer(name, dim, n, 1)
    linear = torch.nn.Linear(dim, dim)
    streams = torch.randn(2, 7, n, dim, requires_grad=True)
    out = mixer(streams, linear)
    assert out.shape == streams.shape
    h_pre, h_post, h_res = mixer.coefficients(streams)
    assert h_pre.shape == (2, 7, n) and h_post.shape == (2, 7, n) and h_res.shape == (2, 7, n, n)
    (out.square().sum()).backward()
    assert torch.isfinite(streams.grad).all() and streams.grad.abs().sum() > 0
    for pname, param in mixer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
    assert linear.weight.grad is not None


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_mixer_in_bf16_streams(name):
    n = VARIANT_N[name]
    mixer = make_mixer(name, 16, n, 0)
    streams = torch.randn(1, 3, n, 16, dtype=torch.bfloat16)
    out = mixer(streams, lambda x: x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_mhc_invariants():
    """docs/residual.md: H_pre in (0, 1], H_post in [0, 2], H_res >= 0 with rows summing to 1 (1e-5)."""
    torch.manual_seed(0)
    mixer = make_mixer("mhc", 32, 4, 0, fn_init_std=1.0, scale_init=1.0)
    streams = torch.randn(4, 16, 4, 32) * 3
    h_pre, h_post, h_res = mixer.coefficients(streams)
    assert ((h_pre > 0) & (h_pre <= 1 + 1e-6)).all()
    assert ((h_post >= 0) & (h_post <= 2)).all()
    assert (h_res >= 0).all()
    torch.testing.assert_close(h_res.sum(-1), torch.ones(4, 16, 4), atol=1e-5, rtol=0)
    # Columns are approximate: 20 iterations leave a visible error on these large logits (the
    # diagnostics report it). It must still be bounded, and clearly larger than the row error.
    column_error = (h_res.sum(-2) - 1).abs().max().item()
    row_error = (h_res.sum(-1) - 1).abs().max().item()
    assert row_error < 1e-5 < column_error < 0.1


def test_mhc_identity_init_is_exactly_doubly_stochastic():
    """base_res = d*I with fn = 0: softmax(d*I) is already doubly stochastic, Sinkhorn adds no error."""
    mixer = make_mixer("mhc", 8, 4, 0, fn_init_std=0.0, res_init_strength=4.0)
    _, h_post, h_res = mixer.coefficients(torch.randn(1, 2, 4, 8))
    diag = torch.e ** 4 / (torch.e ** 4 + 3)
    expected = torch.full((4, 4), (1 - diag) / 3) + torch.eye(4) * (diag - (1 - diag) / 3)
    torch.testing.assert_close(h_res[0, 0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_res.sum(-2), torch.ones(1, 2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(h_post, torch.ones(1, 2, 4))


def test_mhc_pre_inits():
    uniform = make_mixer("mhc", 8, 4, 5, fn_init_std=0.0)
    h_pre, _, _ = uniform.coefficients(torch.randn(1, 1, 4, 8))
    torch.testing.assert_close(h_pre[0, 0], torch.full((4,), 0.5 + 1e-6))
    onehot = make_mixer("mhc", 8, 4, 5, fn_init_std=0.0, pre_init="onehot", pre_init_strength=4.0)
    h_pre, _, _ = onehot.coefficients(torch.randn(1, 1, 4, 8))
    assert h_pre[0, 0].argmax().item() == 5 % 4
    torch.testing.assert_close(h_pre[0, 0, 1], torch.sigmoid(torch.tensor(4.0)) + 1e-6)


def test_mhc_parameter_layout_is_deepseek_v4():
    mixer = make_mixer("mhc", 16, 4, 0)
    shapes = {name: tuple(p.shape) for name, p in mixer.named_parameters()}
    assert shapes == {"fn": ((2 + 4) * 4, 4 * 16), "base": ((2 + 4) * 4,), "scale": (3,)}


def test_hc_at_init_is_the_identity_residual():
    mixer = make_mixer("hc", 8, 4, 6)
    h_pre, h_post, h_res = mixer.coefficients(torch.randn(2, 3, 4, 8))
    torch.testing.assert_close(h_res, torch.eye(4).expand(2, 3, 4, 4))
    torch.testing.assert_close(h_pre, torch.nn.functional.one_hot(torch.tensor(6 % 4), 4).float().expand(2, 3, 4))
    torch.testing.assert_close(h_post, torch.ones(2, 3, 4))


def test_residual_mixer_is_x_plus_f():
    mixer = make_mixer("residual", 8, 1, 0)
    streams = torch.randn(2, 3, 1, 8)
    torch.testing.assert_close(mixer(streams, lambda x: 2 * x), 3 * streams)


@pytest.mark.parametrize("name,n,options,match", [
    ("mhc", 0, {}, "residual.n=0"),
    ("mhc", 4, {"sinkhorn_iters": 0}, "residual.sinkhorn_iters=0"),
    ("mhc", 4, {"sinkhorn_iter": 3}, "residual.sinkhorn_iter=3: not an option of residual=mhc"),
    ("mhc", 4, {"pre_init": "random"}, "residual.pre_init='random'"),
    ("mhc", 4, {"res_init": "eye"}, "residual.res_init='eye'"),
    ("hc", 4, {"kernel": "fused"}, "residual.kernel='fused': unknown kernel choice; allowed: auto, triton, torch"),
    ("residual", 4, {}, "residual.n=4"),
    ("nope", 4, {}, "residual.name='nope'"),
])
def test_bad_mixer_options_name_the_option(name, n, options, match):
    with pytest.raises(ValueError, match=match):
        make_mixer(name, 8, n, 0, **options)


def test_options_dataclass_defaults_are_the_yaml_defaults():
    """conf/residual/<name>.yaml mirrors the variant's options dataclass."""
    import dataclasses
    from pathlib import Path

    import yaml

    from mhc_lm.residual import MODEL_KEYS

    for name in MIXERS:
        path = Path(__file__).resolve().parents[1] / "conf" / "residual" / f"{name}.yaml"
        values = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k not in MODEL_KEYS}
        defaults = {**COMMON_OPTIONS, **dataclasses.asdict(parse_options(name, {}))}
        assert values == {k: defaults[k] for k in values}, name
        assert set(values) == set(defaults), f"{path.name} should list every option of {name}"


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_mixer_takes_the_common_kernel_option(name):
    """`kernel` is accepted by every variant (default auto); on CPU, auto and torch are the same PyTorch path."""
    n = VARIANT_N[name]
    assert make_mixer(name, 8, n, 0).kernel == "auto"
    outputs = []
    for kernel in ("auto", "torch"):
        torch.manual_seed(0)
        mixer = make_mixer(name, 8, n, 0, kernel=kernel)
        assert mixer.kernel == kernel
        outputs.append(mixer(torch.ones(1, 2, n, 8), torch.tanh))
    assert torch.equal(*outputs)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_torch_path_compiles_without_graph_breaks(name):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward without codegen."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    n, dim = VARIANT_N[name], 16
    mixer = make_mixer(name, dim, n, 1, kernel="torch")
    linear = torch.nn.Linear(dim, dim)
    compiled = torch.compile(lambda x: mixer(x, linear), fullgraph=True, backend="aot_eager")
    streams = torch.randn(2, 5, n, dim)
    x_compiled, x_eager = streams.clone().requires_grad_(), streams.clone().requires_grad_()
    out_compiled, out_eager = compiled(x_compiled), mixer(x_eager, linear)
    torch.testing.assert_close(out_compiled, out_eager)
    probe = torch.randn_like(out_eager)
    params = list(mixer.parameters())
    grads_compiled = torch.autograd.grad(out_compiled, [x_compiled, *params], probe)
    grads_eager = torch.autograd.grad(out_eager, [x_eager, *params], probe)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b)
