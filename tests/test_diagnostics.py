"""Diagnostics (docs/diagnostics.md): the math against hand-built matrices, the probe on every variant, the
HC-vs-mHC composite gain signature, gradient norms, and the files and W&B keys a run leaves behind."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROOT
from mhc_lm.config import LoggerConfig, validate_logger
from mhc_lm.errors import ConfigError
from mhc_lm.diagnostics import (GradNorms, amax_gains, composite_stats, composites, effective_rank, h_res_stats,
                                logit_stats, probe_mixers, run_diagnostics, stream_stats)
from mhc_lm.model import MhcConfig, MhcForCausalLM
from mhc_lm.plots import SPECTRAL_NOTE, plot_gain_vs_depth
from mhc_lm.residual import MIXERS, Mixer
from mhc_lm.residual.base import GeneratedMixer

VARIANT_N = {name: (1 if name == "residual" else 4) for name in MIXERS}


def tiny_model(name: str, n: int, layers: int = 2, **options) -> MhcForCausalLM:
    config = MhcConfig(vocab_size=61, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                       max_position_embeddings=32, residual={"name": name, "n": n, **options})
    return MhcForCausalLM(config).eval()


def f64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def rotation_off_the_ones(n: int = 3, angle: float = math.pi / 2) -> torch.Tensor:
    """An sHC-like H_res: J/n + U R U^T with U an orthonormal basis orthogonal to the ones vector.

    Orthogonal (every singular value 1), rows and columns sum to 1, and it has negative entries.
    """
    basis = torch.linalg.qr(torch.cat([torch.ones(n, 1), torch.eye(n)[:, : n - 1]], 1).double())[0][:, 1:]
    c, s = math.cos(angle), math.sin(angle)
    return torch.full((n, n), 1.0 / n, dtype=torch.float64) + basis @ f64([[c, -s], [s, c]]) @ basis.T


# ---------------------------------------------------------------------------------------------
# The math, on matrices whose answers are known by hand


def test_amax_gains_read_rows_forward_and_columns_backward():
    # Rows sum (abs) to 3, 0.5 -> forward 3; columns to 1, 2.5 -> backward 2.5.
    h = f64([[1.0, 2.0], [0.0, -0.5]])
    fwd, bwd = amax_gains(h)
    assert (fwd.item(), bwd.item()) == (3.0, 2.5)
    fwd_t, bwd_t = amax_gains(h.T)  # the transposed reading swaps them: the test tells the two apart
    assert (fwd_t.item(), bwd_t.item()) == (2.5, 3.0)


def test_hand_built_matrices_give_known_spectra_and_health():
    n = 4
    uniform = torch.full((1, n, n), 1.0 / n, dtype=torch.float64)
    stats = h_res_stats(uniform)[0]
    assert stats["gain_fwd_max"] == pytest.approx(1) and stats["gain_bwd_max"] == pytest.approx(1)
    assert stats["svals_mean_matrix"] == pytest.approx([1, 0, 0, 0], abs=1e-12)
    assert stats["spectral_norm_max"] == pytest.approx(1) and stats["sigma2_mean"] == pytest.approx(0, abs=1e-12)
    assert stats["row_entropy_mean"] == pytest.approx(math.log(n))
    assert stats["diag_mass_mean"] == pytest.approx(1 / n)
    assert stats["identity_dist_mean"] == pytest.approx(math.sqrt(n - 1))  # ||J/n - I||_F
    assert stats["col_sum_min"] == pytest.approx(1) and stats["log_col_sum_absmax"] == pytest.approx(0, abs=1e-12)

    identity = torch.eye(n, dtype=torch.float64).unsqueeze(0)
    stats = h_res_stats(identity)[0]
    assert (stats["row_entropy_mean"], stats["diag_mass_mean"], stats["identity_dist_mean"]) == (0, 1, 0)

    # diag(3, 0.5) scaled permutation: singular values 3 and 0.5, column sums 0.5 and 3.
    scaled_swap = f64([[[0.0, 3.0], [0.5, 0.0]]])
    stats = h_res_stats(scaled_swap)[0]
    assert stats["svals_mean_matrix"] == pytest.approx([3.0, 0.5])
    assert stats["sigma_min_min"] == pytest.approx(0.5) and stats["sigma2_mean"] == pytest.approx(0.5)
    assert stats["col_sum_min"] == 0.5 and stats["log_col_sum_absmax"] == pytest.approx(math.log(3))
    assert stats["diag_mass_mean"] == 0.0


def test_token_mean_and_token_max_are_reported_separately():
    tokens = torch.stack([torch.eye(2, dtype=torch.float64), 2 * torch.eye(2, dtype=torch.float64)])
    stats = h_res_stats(tokens)[0]
    assert (stats["gain_fwd_mean"], stats["gain_fwd_max"]) == (1.5, 2.0)
    assert (stats["spectral_norm_mean"], stats["spectral_norm_max"]) == (1.5, 2.0)
    assert stats["h_res_mean"] == [[1.5, 0.0], [0.0, 1.5]]


def test_negative_entries_make_amax_overstate_what_the_spectral_norm_bounds():
    h = rotation_off_the_ones().unsqueeze(0)
    stats = h_res_stats(h)[0]
    assert stats["min_entry"] < 0
    assert stats["svals_mean_matrix"] == pytest.approx([1, 1, 1])
    assert stats["row_sum_min"] == pytest.approx(1) and stats["col_sum_max"] == pytest.approx(1)
    assert stats["gain_fwd_max"] > 1.1  # abs row sums exceed 1 although the map is an isometry


def test_composites_multiply_from_each_sublayer_to_the_output():
    torch.manual_seed(0)
    a, b, c = (torch.randn(5, 3, 3, dtype=torch.float64) for _ in range(3))
    maps = composites([a, b, c])
    torch.testing.assert_close(maps[0], c @ b @ a)
    torch.testing.assert_close(maps[1], c @ b)
    torch.testing.assert_close(maps[2], c)
    assert not torch.allclose(maps[0], a @ b @ c)  # the order matters for these matrices
    eye = torch.eye(3, dtype=torch.float64)
    scaled = composite_stats(torch.stack([2 * eye, eye]))[0]
    assert (scaled["comp_gain_fwd_mean"], scaled["comp_gain_fwd_max"], scaled["comp_spectral_norm_max"]) == (1.5, 2, 2)


def test_effective_rank_and_stream_statistics():
    assert effective_rank(f64([1.0, 1.0, 0.0, 0.0])).item() == pytest.approx(2)
    assert effective_rank(f64([5.0, 0.0, 0.0])).item() == pytest.approx(1)
    # Three streams in 2-d: e1, -e1, 2 e2. Singular values of the stream matrix: sqrt(2), 2.
    streams = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]]])
    stats = stream_stats(streams)
    assert stats["stream_rms"] == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2), math.sqrt(2)])
    np.testing.assert_allclose(stats["stream_cos"], [[1, -1, 0], [-1, 1, 0], [0, 0, 1]], atol=1e-7)
    p = np.array([math.sqrt(2), 2.0]) / (math.sqrt(2) + 2)
    assert stats["stream_eff_rank_mean"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert stats["stream_cos_offdiag_mean"] == pytest.approx(-1 / 3, abs=1e-7)


def test_sinkhorn_logit_range_and_the_fraction_above_15():
    stats = logit_stats(f64([[0.0, 20.0, 3.0], [1.0, 6.0, 2.0]]))
    assert (stats["res_logit_range_mean"], stats["res_logit_range_max"]) == (12.5, 20.0)
    assert stats["res_logit_frac_above_15"] == 0.5


# ---------------------------------------------------------------------------------------------
# The probe on real models


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_probe_sees_every_sublayer_in_depth_order_for_every_variant(name):
    """With the branches' output projections zeroed, the model maps the embedding copies through the
    composite H_res map alone: the captured H_res multiply back to the final streams."""
    torch.manual_seed(0)
    n = VARIANT_N[name]
    model = tiny_model(name, n, layers=3)
    with torch.no_grad():
        for block in model.model.layers:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    final = {}
    model.model.hc_head.register_forward_pre_hook(lambda module, args: final.setdefault("streams", args[0]))
    ids = torch.randint(0, 61, (2, 7))
    probes = probe_mixers(model, ids)
    assert [p.module for p in probes] == [f"model.layers.{b}.{k}_hc" for b in range(3) for k in ("attn", "mlp")]
    start = model.model.embed_tokens(ids).unsqueeze(-2).expand(2, 7, n, 16).reshape(-1, n, 16).double()
    through = composites([p.h_res for p in probes])[0] @ start
    torch.testing.assert_close(through, final["streams"].reshape(-1, n, 16).double(), rtol=1e-5, atol=1e-6)

    report = run_diagnostics(model, ids, step=7).report
    assert [s["name"] for s in report["sublayers"]] == ["attn.0", "mlp.0", "attn.1", "mlp.1", "attn.2", "mlp.2"]
    assert report["variant"] == name and report["n"] == n and report["step"] == 7
    last = report["sublayers"][-1]
    assert last["comp_gain_fwd_max"] == pytest.approx(last["gain_fwd_max"])  # the last composite is H_res itself
    mixer = model.model.layers[0].attn_hc
    assert ("res_logit_range_max" in last) == (name == "mhc")  # the one Sinkhorn variant; absent, never faked
    assert (mixer.sinkhorn_logits(torch.zeros(1, 1, n, 16)) is not None) == (name == "mhc")
    assert ("scale_res" in last) == (isinstance(mixer, GeneratedMixer) or hasattr(mixer, "alpha"))
    assert ("stream_cos_offdiag_mean" in last) == (n > 1)


def set_static_res(model: MhcForCausalLM, h_res: torch.Tensor) -> None:
    with torch.no_grad():
        for block in model.model.layers:
            for mixer in (block.attn_hc, block.mlp_hc):
                mixer.static_res.copy_(h_res.T)  # stored as comb = H_res^T


def test_hc_composite_gain_grows_geometrically_while_mhc_stays_non_expansive():
    torch.manual_seed(0)
    n, layers, growth = 4, 4, 1.5
    mixing = 0.6 * torch.eye(n) + 0.4 * torch.roll(torch.eye(n), 1, dims=1)  # doubly stochastic, asymmetric
    hc = tiny_model("hc", n, layers=layers)
    set_static_res(hc, growth * mixing)  # dynamic weights are zero at init: H_res = 1.5 * mixing exactly
    ids = torch.randint(0, 61, (2, 9))
    subs = run_diagnostics(hc, ids).report["sublayers"]
    depth = 2 * layers
    for l, sub in enumerate(subs):
        assert sub["comp_gain_fwd_max"] == pytest.approx(growth ** (depth - l), rel=1e-6)
        assert sub["comp_gain_bwd_mean"] == pytest.approx(growth ** (depth - l), rel=1e-6)
        assert sub["gain_fwd_max"] == pytest.approx(growth, rel=1e-6)
    assert subs[0]["comp_gain_fwd_max"] == pytest.approx(growth ** 8, rel=1e-6)  # about 25.6

    mhc = tiny_model("mhc", n, layers=layers, fn_init_std=1.0, scale_init=1.0, res_init="uniform")
    report = run_diagnostics(mhc, ids).report
    assert all(s["identity_dist_mean"] > 0.3 for s in report["sublayers"])  # far from the identity: a real test
    assert all(s["comp_gain_fwd_max"] <= 1 + 1e-3 for s in report["sublayers"])
    assert all(s["gain_fwd_max"] <= 1 + 1e-3 for s in report["sublayers"])
    assert not report["negative_entries"] and report["bound"] == "amax_gain"


def test_shc_is_judged_by_its_spectral_norm_which_stays_at_one():
    """sHC's entries may be negative by design (class attribute `signed`): the bound is the spectral norm,
    even where no entry is negative yet, and off its init the Amax gain exceeds 1 while every spectral norm
    stays 1."""
    torch.manual_seed(0)
    ids = torch.randint(0, 61, (2, 9))
    at_init = run_diagnostics(tiny_model("shc", 4, fn_init_std=0.0), ids).report  # s I + (1 - s) J/n: no sign
    assert at_init["bound"] == "spectral_norm" and not at_init["negative_entries"]
    trained_like = run_diagnostics(tiny_model("shc", 4, layers=3, fn_init_std=1.0, scale_init=1.0,
                                              res_init="uniform"), ids).report
    assert trained_like["negative_entries"] and trained_like["bound"] == "spectral_norm"
    assert trained_like["summary"]["comp_gain_fwd_max"] > 1.05
    for sub in trained_like["sublayers"]:
        assert sub["spectral_norm_max"] == pytest.approx(1, abs=1e-5)
        assert sub["comp_spectral_norm_max"] == pytest.approx(1, abs=1e-5)


def test_cayley_variants_report_their_bound():
    """orthogonal is signed (Q Q^T = I): judged by the spectral norm, 1 for every single and composite map,
    while its Amax gain exceeds 1. orthostochastic is exactly doubly stochastic: Amax gains 1 at every depth."""
    torch.manual_seed(0)
    ids = torch.randint(0, 61, (2, 9))
    options = {"fn_init_std": 1.0, "scale_init": 1.0}
    orthogonal = run_diagnostics(tiny_model("orthogonal", 4, layers=3, **options), ids).report
    assert orthogonal["bound"] == "spectral_norm" and orthogonal["negative_entries"]
    assert orthogonal["summary"]["comp_gain_fwd_max"] > 1.05
    for sub in orthogonal["sublayers"]:
        assert sub["identity_dist_mean"] > 0.3  # far from the identity: a real test
        assert sub["spectral_norm_max"] == pytest.approx(1, abs=1e-5)
        assert sub["comp_spectral_norm_max"] == pytest.approx(1, abs=1e-5)
        assert sub["sigma_min_min"] == pytest.approx(1, abs=1e-5)
    stochastic = run_diagnostics(tiny_model("orthostochastic", 4, layers=3, **options), ids).report
    assert stochastic["bound"] == "amax_gain" and not stochastic["negative_entries"]
    for sub in stochastic["sublayers"]:
        assert sub["identity_dist_mean"] > 0.3
        for key in ("gain_fwd_max", "gain_bwd_max", "comp_gain_fwd_max", "comp_gain_bwd_max"):
            assert sub[key] == pytest.approx(1, abs=1e-5), key


class FixedMixer(Mixer):
    """A mixer with one fixed H_res for every token, and a stack of them called like a model."""

    def __init__(self, h_res: torch.Tensor):
        super().__init__()
        self.n = h_res.shape[0]
        self.register_buffer("h_res", h_res.float())

    def mixing(self, streams):
        lead = streams.shape[:-2]
        ones = streams.new_ones(*lead, self.n, dtype=torch.float32)
        return ones, ones, self.h_res.T.expand(*lead, self.n, self.n)


class MixerStack(nn.Module):
    def __init__(self, mixers):
        super().__init__()
        self.mixers = nn.ModuleList(mixers)

    def forward(self, input_ids):  # here the "ids" are the streams themselves (B, T, n, C)
        for mixer in self.mixers:
            input_ids = mixer(input_ids, torch.zeros_like)
        return input_ids


def test_negative_entries_switch_the_bound_and_the_plot_says_so(tmp_path):
    rotation = rotation_off_the_ones()
    stack = MixerStack([FixedMixer(rotation) for _ in range(3)])
    result = run_diagnostics(stack, torch.randn(2, 5, 3, 8))
    report = result.report
    assert report["negative_entries"] and report["bound"] == "spectral_norm"
    assert [s["name"] for s in report["sublayers"]] == ["sublayer.0", "sublayer.1", "sublayer.2"]
    for sub in report["sublayers"]:
        assert sub["comp_spectral_norm_max"] == pytest.approx(1, abs=1e-6)  # an isometry, composed
    assert report["sublayers"][0]["comp_gain_fwd_max"] > 1.05
    figure = plot_gain_vs_depth(report, tmp_path / "gain.png")
    assert SPECTRAL_NOTE in figure.get_suptitle()
    assert "the bound that matters" in figure.axes[1].get_title()

    rounding = torch.eye(3) + torch.tensor([[1e-8, -1e-8, 0], [0, 0, 0], [0, 0, 0]])  # a rounding-level negative
    plain = run_diagnostics(MixerStack([FixedMixer(rounding)]), torch.randn(1, 2, 3, 4)).report
    assert plain["sublayers"][0]["min_entry"] < 0 and not plain["negative_entries"]
    assert plain["bound"] == "amax_gain"
    assert SPECTRAL_NOTE not in plot_gain_vs_depth(plain, tmp_path / "plain.png").get_suptitle()


def test_files_hold_the_numbers_returned_in_memory(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("mhc", 4, fn_init_std=0.5, scale_init=1.0)
    result = run_diagnostics(model, torch.randint(0, 61, (2, 11)), step=5)
    images = result.write(tmp_path)
    assert json.loads((tmp_path / "diagnostics.json").read_text()) == result.report  # exactly, floats included
    with np.load(tmp_path / "histograms.npz") as saved:
        assert sorted(saved.files) == sorted(result.histograms)
        for key, values in result.histograms.items():
            np.testing.assert_array_equal(saved[key], values)
    assert sorted(images) == ["gain_vs_depth", "h_res_heatmaps", "spectra"]
    for path in images.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    scalars = result.scalars()
    first = result.report["sublayers"][0]
    assert scalars["diag/attn.0/comp_gain_fwd_max"] == first["comp_gain_fwd_max"]
    assert scalars["diag/mlp.1/stream_rms.3"] == result.report["sublayers"][3]["stream_rms"][3]
    assert scalars["diag/summary/comp_gain_fwd_max"] == max(s["comp_gain_fwd_max"] for s in result.report["sublayers"])
    assert not any("h_res_mean" in k or "stream_cos." in k for k in scalars)  # matrices live in the JSON


# ---------------------------------------------------------------------------------------------
# Gradient norms


def test_gradient_norms_by_group_match_direct_sums_over_the_modules():
    torch.manual_seed(0)
    model = tiny_model("mhc", 4, layers=2)
    model(torch.randint(0, 61, (2, 8)), labels=torch.randint(0, 61, (2, 8))).loss.backward()
    norms = GradNorms(model)(loss_scale=2.0)

    def norm_of(params):
        return math.sqrt(sum(p.grad.double().square().sum().item() for p in params if p.grad is not None)) / 2

    layers = model.model.layers
    expected = {
        "global": norm_of(model.parameters()),
        "attention": norm_of(p for b in layers for p in b.attn.parameters()),
        "mlp": norm_of(p for b in layers for p in b.mlp.parameters()),
        "embeddings": norm_of([model.model.embed_tokens.weight]),
        "norms": norm_of([*(p for b in layers for p in (b.attn_norm.weight, b.mlp_norm.weight)),
                          model.model.norm.weight]),
        "connection": norm_of([*(p for b in layers for m in (b.attn_hc, b.mlp_hc) for p in m.parameters()),
                               *model.model.hc_head.parameters()]),
        "connection.fn": norm_of(m.fn for b in layers for m in (b.attn_hc, b.mlp_hc)),
        "connection.scale": norm_of(m.scale for b in layers for m in (b.attn_hc, b.mlp_hc)),
        "connection.other": norm_of(model.model.hc_head.parameters()),
        "block.0": norm_of(layers[0].parameters()),
        "block.1": norm_of(layers[1].parameters()),
    }
    for key, value in expected.items():
        assert norms[f"grad_norm/{key}"] == pytest.approx(value, rel=1e-5), key
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]).item()
    assert norms["grad_norm/global"] == pytest.approx(total / 2, rel=1e-6)


@pytest.mark.slow
def test_gradient_norms_from_fsdp2_shards_equal_those_of_the_whole_gradients(tmp_path):
    """FSDP2 (fully_shard) on two CPU processes over gloo: each rank holds DTensor shards of the gradients;
    the squares of the local shards summed over the ranks give the unsharded model's norms."""
    out = tmp_path / "norms.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests" / "grad_norms_worker.py"), str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.exists(), done.stderr[-3000:]  # judged by what rank 0 wrote (gloo may abort at exit)
    result = json.loads(out.read_text())
    assert (result["grad_type"], result["mode"]) == ("DTensor", "dtensor")
    assert set(result["sharded"]) == set(result["whole"])
    for key, value in result["whole"].items():
        assert result["sharded"][key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize("option,value", [("diag_every", -1), ("diag_batch_size", 0)])
def test_bad_diagnostics_options_are_refused(option, value):
    with pytest.raises(ConfigError, match=f"logger.{option}={value}"):
        validate_logger(LoggerConfig(**{option: value}))


# ---------------------------------------------------------------------------------------------
# End to end: a short offline W&B run, its files, and the command line on its checkpoint and export


def wandb_history(capture: Path) -> dict[int, dict]:
    """Rows {step: {key: value}} as W&B's `Run.log` received them in the run (tests/wandb_capture), merged per step."""
    rows: dict[int, dict] = {}
    for line in capture.read_text().splitlines():
        call = json.loads(line)
        rows.setdefault(call["step"], {}).update(call["data"])
    return rows


@pytest.mark.slow
def test_offline_wandb_run_and_the_run_directory_hold_the_diagnostics(train_cli, tmp_path):
    capture = tmp_path / "wandb_log.jsonl"
    env = {"WANDB_MODE": "offline", "HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path),
           "WANDB_DIR": str(tmp_path), "WANDB_CACHE_DIR": str(tmp_path / "cache"), "MHC_WANDB_CAPTURE": str(capture),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "wandb_capture"), os.environ.get("PYTHONPATH", "")])}
    result = train_cli("logger=wandb", "trainer.max_steps=3", "logger.diag_every=2", "trainer.run_name=diag",
                       env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "diag"
    assert sorted(p.name for p in (run_dir / "diagnostics").iterdir()) == ["step_000002", "step_000003"]  # + the end
    report = json.loads((run_dir / "diagnostics" / "step_000002" / "diagnostics.json").read_text())
    assert report["step"] == 2 and report["variant"] == "mhc" and len(report["sublayers"]) == 4

    assert next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")).stat().st_size > 0  # W&B's own offline run
    history = wandb_history(capture)
    assert {1, 2, 3} <= set(history)
    for step in (1, 2, 3):  # gradient norms every step
        assert {"grad_norm/global", "grad_norm/attention", "grad_norm/mlp", "grad_norm/embeddings",
                "grad_norm/connection.fn", "grad_norm/connection.base", "grad_norm/connection.scale",
                "grad_norm/block.0", "grad_norm/block.1"} <= set(history[step])
    assert not any(k.startswith("diag") for k in history[1])
    row = history[2]
    for sub in report["sublayers"]:
        for key in ("gain_fwd_mean", "gain_fwd_max", "comp_gain_fwd_max", "comp_gain_bwd_mean",
                    "spectral_norm_max", "res_logit_frac_above_15", "scale_res", "stream_eff_rank_mean"):
            assert row[f"diag/{sub['name']}/{key}"] == pytest.approx(sub[key], rel=1e-12)
    assert row["diag/summary/comp_gain_fwd_max"] == pytest.approx(report["summary"]["comp_gain_fwd_max"], rel=1e-12)
    for plot in ("gain_vs_depth", "h_res_heatmaps", "spectra"):
        assert row[f"diag_plots/{plot}"] == "Image"
    assert row["diag_hist/attn.0/comp_gain_fwd"] == "Histogram"

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in metrics if "train/grad_norm" in m]
    assert logged and all(m["grad_norm/global"] == pytest.approx(m["train/grad_norm"], rel=1e-5) for m in logged)


@pytest.mark.slow
def test_command_line_reproduces_the_training_report_from_a_checkpoint_and_an_export(tiny_run, tmp_path):
    """The shared tiny run (8 steps) wrote its final diagnostics; the command line, on its last checkpoint
    and on its export, finds the same probe and so the same numbers. Outputs go to tmp_path: the shared
    run stays as the other tests expect it."""
    from mhc_lm.diagnostics import diagnose_source

    def run_module(*args):
        return subprocess.run([sys.executable, "-m", "mhc_lm.diagnostics", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)

    trained = json.loads((tiny_run / "diagnostics" / "step_000008" / "diagnostics.json").read_text())
    from_checkpoint = diagnose_source(str(tiny_run / "checkpoints" / "step_000008"), tmp_path / "ckpt")[0].report
    assert from_checkpoint["step"] == 8 and from_checkpoint["source"]["kind"] == "checkpoint"
    assert from_checkpoint["sublayers"] == trained["sublayers"]  # same weights, same probe: the same numbers
    assert json.loads((tmp_path / "ckpt" / "diagnostics.json").read_text()) == from_checkpoint

    cli = run_module(str(tiny_run / "export"), "--out", str(tmp_path / "export"))
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "composite fwd" in cli.stdout and f"wrote {tmp_path / 'export'}" in cli.stdout
    from_export = json.loads((tmp_path / "export" / "diagnostics.json").read_text())
    assert from_export["source"]["kind"] == "export" and from_export["sublayers"] == trained["sublayers"]
    assert (tmp_path / "export" / "gain_vs_depth.png").exists()

    alone = tmp_path / "alone"  # an export without its run: the bundled corpus, written beside the model
    shutil.copytree(tiny_run / "export", alone)
    assert run_module(str(alone), "--batch-size", "2").returncode == 0
    report = json.loads((alone / "diagnostics" / "diagnostics.json").read_text())
    assert report["probe"] == {"sequences": 2, "seq_len": 256, "tokens": 512}

    bad = run_module(str(tiny_run / "checkpoints"))
    assert bad.returncode == 2 and f"error: PATH={str(tiny_run / 'checkpoints')!r}: a directory with" in bad.stderr
    too_long = run_module(str(alone), "--seq-len", "1000")
    assert too_long.returncode == 2 and "error: --seq-len=1000: longer than the context" in too_long.stderr
