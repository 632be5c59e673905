"""Every residual variant of docs/residual.md: its constraint set, its gradients, its training, its table."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from mhc_lm.residual import MIXERS, make_mixer

from conftest import ROOT, TINY_RUN, run_cli

BIRKHOFF = ("mhc_lite", "kromhc", "tbp", "rtbp")
GENERATED = ("mhc", "mhc_lite", "kromhc", "tbp", "rtbp", "shc", "orthostochastic", "orthogonal", "ihc")
CAYLEY = ("orthostochastic", "orthogonal")


def allowed(name: str, n: int) -> bool:
    if name == "mhc_lite":
        return n <= 6
    if name in ("kromhc", "rtbp"):
        return n & (n - 1) == 0
    return True


def cases(names):
    return [(name, n) for name in names for n in (2, 4, 8) if allowed(name, n)]


def logit_sets(mixer, dtype, seed=0):
    """Random, extreme (|x| up to 50) and near-permutation res logits for `mixer`."""
    g = torch.Generator().manual_seed(seed)
    k, n = mixer.num_res_logits, mixer.n
    random = torch.randn(256, k, generator=g, dtype=torch.float64) * 3
    extreme = (torch.rand(256, k, generator=g, dtype=torch.float64) * 2 - 1) * 50
    if mixer.variant == "mhc_lite":  # one permutation's logit far above the others
        near = torch.zeros(256, k, dtype=torch.float64)
        near[torch.arange(256), torch.randint(k, (256,), generator=g)] = 50.0
    elif mixer.variant == "mhc":  # 50 * a permutation matrix in the comb layout
        perms = torch.stack([torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=g)] for _ in range(256)])
        near = 50 * perms.flatten(1)
    else:  # saturated signs: every chart entry at a bound, the fills are vertices
        near = torch.sign(torch.randn(256, k, generator=g, dtype=torch.float64)) * 50
    return {"random": random.to(dtype), "extreme": extreme.to(dtype), "near-permutation": near.to(dtype)}


def assert_gradients_reach_everything(mixer, streams, out):
    """Backward from a random projection of `out`: every parameter of the mixer gets a finite, non-zero
    gradient, and the streams a finite one."""
    (out * torch.randn_like(out)).sum().backward()
    for pname, param in mixer.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, pname
    assert torch.isfinite(streams.grad).all()


@pytest.mark.parametrize("name,n", cases(BIRKHOFF))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_birkhoff_variants_are_exactly_doubly_stochastic(name, n, dtype):
    mixer = make_mixer(name, 8, n, 0)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for kind, logits in logit_sets(mixer, dtype).items():
        h_res = mixer.project(logits).transpose(-1, -2)
        assert h_res.dtype == dtype
        assert (h_res >= 0).all(), kind
        assert (h_res.sum(-1) - 1).abs().max() <= tol, (kind, "rows")
        assert (h_res.sum(-2) - 1).abs().max() <= tol, (kind, "columns")


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mhc_rows_exact_columns_reported(n, dtype, record_property):
    mixer = make_mixer("mhc", 8, n, 0)
    for kind, logits in logit_sets(mixer, dtype).items():
        h_res = mixer.project(logits).transpose(-1, -2)
        assert (h_res >= 0).all()
        assert (h_res.sum(-1) - 1).abs().max() <= 1e-5, kind
        column_error = (h_res.sum(-2) - 1).abs().max().item()
        record_property(f"mhc_n{n}_{kind}_column_error", column_error)
        print(f"mhc n={n} {dtype} {kind}: max column-sum error {column_error:.2e}")
        expected = numpy_sinkhorn_column_sums(logits.double().numpy(), n)  # (tokens, n), float64
        torch.testing.assert_close(h_res.sum(-2).double(), torch.from_numpy(expected),
                                   atol=2e-5 if dtype == torch.float32 else 1e-12, rtol=0)
        assert column_error == pytest.approx(abs(expected - 1).max(), abs=2e-5 if dtype == torch.float32 else 1e-12)


def numpy_sinkhorn_column_sums(logits, n, iters=20, eps=1e-6):
    """The column sums of H_res from an independent NumPy Sinkhorn (docs/sinkhorn.md) on flat logits (tokens, n*n)
    in the comb layout: softmax over each row of comb, + eps, then columns and rows of comb in turn, columns last.
    H_res = comb^T, so its column sums are comb's row sums."""
    import numpy as np

    x = logits.reshape(-1, n, n)
    comb = np.exp(x - x.max(-1, keepdims=True))
    comb = comb / comb.sum(-1, keepdims=True) + eps
    comb = comb / (comb.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdims=True) + eps)
        comb = comb / (comb.sum(-2, keepdims=True) + eps)
    return comb.sum(-1)


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shc_sums_to_one_with_unit_spectral_norm_and_negative_entries(n, dtype):
    mixer = make_mixer("shc", 8, n, 0)
    for kind, logits in logit_sets(mixer, dtype).items():
        h_res = mixer.project(logits).transpose(-1, -2)
        assert (h_res.sum(-1) - 1).abs().max() <= 1e-5, kind
        assert (h_res.sum(-2) - 1).abs().max() <= 1e-5, kind
        spectral = torch.linalg.matrix_norm(h_res, ord=2)
        assert (spectral - 1).abs().max() <= 1e-5, kind
    h_res = mixer.project(logit_sets(mixer, dtype)["random"]).transpose(-1, -2)
    if n >= 3:  # for n = 2 the construction is the 2 x 2 Birkhoff polytope: (1 ± s) / 2
        assert h_res.min() < -0.1


def test_shc_singular_values_are_one_and_abs_s():
    mixer = make_mixer("shc", 8, 4, 0)
    logits = torch.randn(16, 9, dtype=torch.float64)
    h_res = mixer.project(logits).transpose(-1, -2)
    s = torch.tanh(logits[:, -3:]).abs()
    expected = torch.cat([torch.ones(16, 1, dtype=torch.float64), s], 1).sort(-1, descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(h_res), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", CAYLEY)
@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cayley_variants_meet_their_constraints(name, n, dtype):
    """orthostochastic: >= 0, rows and columns sum to 1; orthogonal: Q Q^T = Q^T Q = I (so spectral norm 1)."""
    mixer = make_mixer(name, 8, n, 0)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    eye = torch.eye(n, dtype=torch.float64)
    for kind, logits in logit_sets(mixer, dtype).items():
        h_res = mixer.project(logits).transpose(-1, -2)
        assert h_res.dtype == dtype and h_res.shape == (256, n, n)
        h = h_res.double()  # check in fp64: the error measured is the stored matrix's, not the check's
        if name == "orthostochastic":
            assert (h >= 0).all(), kind
            assert (h.sum(-1) - 1).abs().max() <= tol, (kind, "rows")
            assert (h.sum(-2) - 1).abs().max() <= tol, (kind, "columns")
        else:
            assert (h @ h.transpose(-1, -2) - eye).abs().max() <= tol, (kind, "Q Q^T")
            assert (h.transpose(-1, -2) @ h - eye).abs().max() <= tol, (kind, "Q^T Q")
            assert (torch.linalg.matrix_norm(h, ord=2) - 1).abs().max() <= tol, kind
    h_res = mixer.project(logit_sets(mixer, dtype)["random"]).transpose(-1, -2)
    if name == "orthogonal":
        assert h_res.min() < -0.1  # signed by design
    else:
        assert (1 - h_res.diagonal(dim1=-2, dim2=-1)).mean() > 0.1  # random logits mix: far from I on average


@pytest.mark.parametrize("name", CAYLEY)
def test_cayley_variants_match_the_hand_computed_2x2_rotation(name):
    """n = 2: A = [[0, a], [-a, 0]] gives Q = [[1 - a^2, -2a], [2a, 1 - a^2]] / (1 + a^2) (H_res = Q, or Q ∘ Q)."""
    a = torch.tensor([[0.0], [0.5], [-2.0], [50.0]], dtype=torch.float64)
    c, s = (1 - a.square()) / (1 + a.square()), 2 * a / (1 + a.square())
    q = torch.stack([torch.cat([c, -s], -1), torch.cat([s, c], -1)], -2)  # (4, 2, 2)
    expected = q if name == "orthogonal" else q.square()
    h_res = make_mixer(name, 8, 2, 0).project(a).transpose(-1, -2)
    torch.testing.assert_close(h_res, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", CAYLEY)
@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_cayley_variants_start_at_the_identity(name, n):
    """Zero logits are Q = I exactly; the default init (fn_init_std 0.02, scale 0.01) stays within 2e-2 of it.

    With RMS-normed inputs over n * 8 features a logit has std 0.01 * 0.02 * sqrt(8n) (0.0016 at n = 8) and Q's
    off-diagonal entries about twice that, so 2e-2 is about six standard deviations."""
    torch.manual_seed(0)
    mixer = make_mixer(name, 8, n, 0)
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.equal(mixer.project(torch.zeros(3, n * (n - 1) // 2, dtype=torch.float64)), eye.expand(3, n, n))
    assert torch.equal(mixer.base[2 * n:], torch.zeros(n * (n - 1) // 2))
    _, _, h_res = mixer.coefficients(torch.randn(2, 5, n, 8))
    assert (h_res - eye.float()).abs().max() < 2e-2
    _, _, h_res = make_mixer(name, 8, n, 0, fn_init_std=0.0).coefficients(torch.randn(2, 5, n, 8) * 50)
    assert torch.equal(h_res, torch.eye(n).expand_as(h_res))


@pytest.mark.parametrize("name", CAYLEY)
@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inputs", ["random", "extreme"])
def test_cayley_variants_send_gradients_to_every_connection_parameter(name, n, dtype, inputs):
    torch.manual_seed(n)
    mixer = make_mixer(name, 8, n, 0, fn_init_std=1.0, scale_init=1.0).to(dtype)
    with torch.no_grad():  # res bias off the identity (where the orthostochastic derivative vanishes)
        mixer.base[2 * n:] = (torch.rand(mixer.num_res_logits) * 2 - 1) * (50 if inputs == "extreme" else 1)
    streams = torch.randn(2, 5, n, 8, dtype=dtype)
    if inputs == "extreme":
        streams = (streams.sign() * 50 * torch.rand_like(streams)).requires_grad_()
    streams.requires_grad_()
    out = mixer(streams, torch.nn.Linear(8, 8, dtype=dtype))
    assert out.dtype == dtype
    assert_gradients_reach_everything(mixer, streams, out)


def test_orthostochastic_gradient_vanishes_only_at_the_identity():
    """The documented first-order caveat: d(Q ∘ Q)/dA = 0 at A = 0, non-zero just off it."""
    mixer = make_mixer("orthostochastic", 8, 3, 0)
    for scale, vanishes in ((0.0, True), (1e-2, False)):
        logits = torch.full((1, 3), scale, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(mixer.project(logits)[0, 0, 1], logits)
        assert (grad.abs().max() == 0) == vanishes, grad


def test_tbp_chart_covers_a_hand_built_matrix():
    """Inverting the chart by hand: the logits that give a known doubly stochastic matrix give it back."""
    target = torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3], [0.4, 0.2, 0.4]], dtype=torch.float64)
    r, c = [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]
    logits = []
    for i in range(2):
        for j in range(2):
            lower = max(0.0, r[i] - sum(c[j + 1:]), c[j] - sum([1.0] * (2 - i)))
            upper = min(r[i], c[j])
            frac = (target[i, j].item() - lower) / (upper - lower)
            logits.append(math.log(frac / (1 - frac)))
            r[i] -= target[i, j].item()
            c[j] -= target[i, j].item()
        c[2] -= r[i]  # the last column takes the rest of the row
    mixer = make_mixer("tbp", 8, 3, 0)
    h_res = mixer.project(torch.tensor([logits], dtype=torch.float64)).transpose(-1, -2)[0]
    torch.testing.assert_close(h_res, target, atol=1e-12, rtol=0)


def test_kromhc_is_the_kronecker_product_of_its_factors():
    mixer = make_mixer("kromhc", 8, 8, 0)
    logits = torch.randn(1, 6, dtype=torch.float64)
    a = torch.softmax(logits.view(3, 2), -1)[:, 0]
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    factors = [ak * torch.eye(2, dtype=torch.float64) + (1 - ak) * swap for ak in a]
    expected = torch.kron(torch.kron(factors[0], factors[1]), factors[2])
    torch.testing.assert_close(mixer.project(logits)[0].T, expected)


def test_mhc_lite_weights_the_permutations():
    mixer = make_mixer("mhc_lite", 8, 3, 0)
    logits = torch.full((1, 6), -float("inf"))
    logits[0, 0], logits[0, 1] = 0.0, math.log(3.0)  # weights 1/4 on the identity, 3/4 on (0, 2, 1)
    h_res = mixer.project(logits)[0].T
    expected = 0.25 * torch.eye(3) + 0.75 * torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]])
    torch.testing.assert_close(h_res, expected)


@pytest.mark.parametrize("name,n", cases(GENERATED))
def test_identity_leaning_init(name, n):
    mixer = make_mixer(name, 8, n, 0, fn_init_std=0.0)
    _, _, h_res = mixer.coefficients(torch.randn(1, 2, n, 8))
    assert (h_res.diagonal(dim1=-2, dim2=-1) > 0.85).all(), h_res[0, 0]


@pytest.mark.parametrize("name,n", cases(GENERATED))
def test_gradients_reach_every_connection_parameter_on_extreme_inputs(name, n):
    torch.manual_seed(n)
    mixer = make_mixer(name, 8, n, 0, fn_init_std=1.0, scale_init=1.0)
    with torch.no_grad():  # push the res bias to magnitude 50
        k = mixer.num_res_logits
        mixer.base[2 * n:] = (torch.rand(k) * 2 - 1) * 50
    streams = (torch.randn(2, 5, n, 8) * 10).requires_grad_()
    out = mixer(streams, torch.nn.Linear(8, 8))
    assert_gradients_reach_everything(mixer, streams, out)


@pytest.mark.parametrize("name,n", cases(tuple(v for v in GENERATED if v != "ihc")))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projection_gradients_are_finite_on_extreme_logits(name, n, dtype):
    mixer = make_mixer(name, 8, n, 0)
    for kind, logits in logit_sets(mixer, dtype, seed=1).items():
        logits = logits[:32].clone().requires_grad_()
        comb = mixer.project(logits)
        (grad,) = torch.autograd.grad((comb * torch.randn_like(comb)).sum(), logits)
        assert torch.isfinite(grad).all(), kind
        if kind != "near-permutation":  # there every logit sits at +-50, where tanh/sigmoid saturate exactly
            assert grad.abs().sum() > 0, kind


@pytest.mark.parametrize("name,n,message", [
    ("mhc_lite", 7, "residual.n=7: mhc_lite mixes all n! permutations"),
    ("kromhc", 6, "residual.n=6: kromhc needs a power of 2"),
    ("rtbp", 3, "residual.n=3: rtbp halves the matrix recursively"),
    ("tbp", 1, "residual.n=1: tbp charts"),
    ("shc", 1, "residual.n=1: shc needs"),
    ("orthogonal", 1, "residual.n=1: orthogonal mixes streams with an n x n rotation; allowed: n >= 2"),
    ("orthostochastic", 1, "residual.n=1: orthostochastic mixes streams with an n x n rotation; allowed: n >= 2"),
])
def test_structural_limits_are_clear_errors(name, n, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_mixer(name, 8, n, 0)


def readme_table() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- variants-table -->")[1]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells
    return rows


def test_readme_table_matches_the_code():
    """Free logits, projection FLOPs and parameter counts in the README come from the modules."""
    rows = readme_table()
    assert set(rows) == set(MIXERS)
    for name, cells in rows.items():
        cls = MIXERS[name][0]
        mixer = make_mixer(name, 768, 1 if name == "residual" else 4, 0)
        params = sum(p.numel() for p in mixer.parameters())
        assert int(cells[-1].replace(",", "")) == params, name
        if hasattr(cls, "res_logits"):
            assert int(cells[4]) == cls.res_logits(4) == mixer.num_res_logits, name
            assert int(cells[5].replace(",", "")) == cls.res_flops(4), name
            assert params == (2 * 4 + mixer.num_res_logits) * (4 * 768 + 1) + 3, name


# Forward FLOPs per token of one mixer, counted by hand for C = 16, n = 4 (n = 1 for the residual).
# read + write: 2nC + (2nC + 2n^2 C) = 128 + 640 = 768.
HAND_MIXER_FLOPS = {
    "residual": 0,  # x + F(x), left out like the plain residual of 6N
    "hc": 2 * 4 * 16 * (4 + 2) + 768,  # xb (n, C) @ W_m, W_r, W_b: n * (1 + n + 1) dot products of length C
    # fn: (2n + n^2) = 24 outputs of n*C = 64 inputs -> 3072; Sinkhorn (20 iterations): softmax and eps
    # 4 n^2 = 64, then 39 normalizations of 2 n^2 = 32 -> 1248
    "mhc": 2 * 24 * 64 + 64 + 39 * 32 + 768,
    # fn: (2n + 2 log2 n) = 12 outputs -> 1536; two 2x2 softmaxes at 8 FLOPs each = 16; Kronecker products:
    # 1x1 by 2x2 (4 multiplies), then 2x2 by 2x2 (16) -> 20
    "kromhc": 2 * 12 * 64 + 16 + 20 + 768,
}


@pytest.mark.parametrize("name", sorted(HAND_MIXER_FLOPS))
def test_mixer_flops_per_token_match_a_hand_count(name):
    mixer = make_mixer(name, 16, 1 if name == "residual" else 4, 0)
    assert mixer.flops_per_token() == HAND_MIXER_FLOPS[name]


def test_mfu_counts_each_variants_own_mixer_flops():
    """flops_per_token (the MFU numerator) = the dense model's count + 3 x two mixers per block, each variant's own."""
    from mhc_lm.metrics import flops_per_token
    from mhc_lm.model import MhcConfig

    def config(name, n, **options):
        return MhcConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                         intermediate_size=64, residual={"name": name, "n": n, **options})

    # By hand: attention 4 * 16^2 = 1024, SwiGLU 3 * 16 * 64 = 3072 per block, head 16 * 50 = 800;
    # attention scores 12 * layers * C * seq_len.
    dense = 6 * (3 * (1024 + 3072) + 800) + 12 * 3 * 16 * 32
    assert flops_per_token(config("residual", 1), 32) == dense
    for name in ("hc", "mhc", "kromhc"):
        assert flops_per_token(config(name, 4), 32) == dense + 3 * 2 * 3 * HAND_MIXER_FLOPS[name], name
    fewer_iterations = flops_per_token(config("mhc", 4, sinkhorn_iters=5), 32)  # 9 normalizations, not 39
    assert fewer_iterations == dense + 3 * 2 * 3 * (HAND_MIXER_FLOPS["mhc"] - 30 * 32), "its own iterations"
    counts = {name: flops_per_token(config(name, 1 if name == "residual" else 4), 32) for name in MIXERS}
    assert len(set(counts.values())) == len(MIXERS), counts  # each variant its own count, not mHC's n^2 for all


@pytest.fixture(scope="module")
def thirty_step_sweep(cache_dir, tmp_path_factory):
    """Every registered variant, 30 steps of the small model, as one multirun (one process start for all);
    returns (sweep directory, the command's result)."""
    sweep = tmp_path_factory.mktemp("thirty_steps")
    overrides = ["model=small", "data.seq_len=64", "trainer.batch_size=8", "trainer.max_steps=30",
                 "trainer.eval_every=30", "trainer.export=false", "optim.warmup_steps=5"]
    given = {o.split("=", 1)[0] for o in overrides}
    defaults = [o for o in TINY_RUN if o.split("=", 1)[0] not in given]
    result = run_cli("train.py", "-m", *defaults, *overrides, f"data.cache_dir={cache_dir}",
                     f"hydra.sweep.dir={sweep}", "trainer.seed=0", f"residual={','.join(sorted(MIXERS))}",
                     timeout=1800)
    return sweep, result


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MIXERS))
def test_thirty_steps_of_the_small_model_lower_the_loss(name, thirty_step_sweep):
    sweep, result = thirty_step_sweep
    run = sweep / f"{name}-s0"
    assert (run / "metrics.jsonl").exists(), result.stderr[-3000:]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(l)["train/loss"] for l in lines if "train/loss" in l]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert any("final/val_loss" in l for l in lines), result.stderr[-3000:]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_variant_round_trips_through_save_pretrained(name, tmp_path):
    from transformers import AutoModelForCausalLM

    from mhc_lm.model import MhcConfig, MhcForCausalLM

    torch.manual_seed(0)
    n = 1 if name == "residual" else 4
    config = MhcConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=32, residual={"name": name, "n": n, "collapse": "sum"})
    model = MhcForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
