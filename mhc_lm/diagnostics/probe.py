"""The probe: one forward pass over a fixed batch with a forward pre-hook on every `Mixer` of the model.

Each hook sees its sublayer's input streams (B, T, n, C) and asks the mixer, through the `Mixer`
interface only, for `coefficients(streams)` = (H_pre, H_post, H_res) in paper orientation, its
`gate_scales()` and its `sinkhorn_logits(streams)`. Nothing here knows a variant by name. Sublayers
are numbered in the order their hooks fire (depth order: attention, then MLP, of each block) and
named `attn.<block>` / `mlp.<block>`. The report gathers the statistics of `stats.py` per sublayer,
the composites from each sublayer to the output, and a summary (the worst sublayer of each).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..data import eval_batches
from ..residual import Mixer
from ..run_dir import REPORT_FORMAT, REPORT_VERSION, RunDir
from .stats import (NEGATIVE_ENTRY, composite_stats, composites, h_res_stats, logit_stats, range_stats,
                    stream_stats)


def sublayer_name(module_name: str, depth: int) -> str:
    """model.layers.3.attn_hc -> attn.3; a mixer elsewhere -> sublayer.<depth>."""
    match = re.search(r"layers\.(\d+)\.(\w+?)_hc$", module_name)
    return f"{match.group(2)}.{match.group(1)}" if match else f"sublayer.{depth}"


@dataclasses.dataclass
class SublayerProbe:
    """What one mixer saw on the probe batch. Per-token tensors are (N, ...) float64 on the CPU."""

    module: str
    variant: str
    signed: bool  # the variant's H_res may have negative entries by design (`Mixer.signed`)
    h_res: torch.Tensor  # (N, n, n), paper orientation
    stats: dict[str, Any]  # everything that does not need the other sublayers


@torch.no_grad()
def measure_mixer(module_name: str, mixer: Mixer, streams: torch.Tensor) -> SublayerProbe:
    h_pre, h_post, h_res = mixer.coefficients(streams)
    n = h_res.shape[-1]
    h_res = h_res.reshape(-1, n, n).double().cpu()
    stats = {**stream_stats(streams.reshape(-1, *streams.shape[-2:])),
             **range_stats("h_pre", h_pre.double()), **range_stats("h_post", h_post.double()),
             **mixer.gate_scales()}
    res_logit = mixer.sinkhorn_logits(streams)
    if res_logit is not None:
        stats.update(logit_stats(res_logit.reshape(-1, res_logit.shape[-1]).double()))
    return SublayerProbe(module_name, getattr(mixer, "variant", type(mixer).__name__), mixer.signed, h_res, stats)


@torch.no_grad()
def probe_mixers(model: nn.Module, input_ids: torch.Tensor) -> list[SublayerProbe]:
    """Run the model once on `input_ids` and measure every mixer, in the order they run."""
    probes: list[SublayerProbe] = []

    def hook_for(name: str):
        return lambda mixer, args: probes.append(measure_mixer(name, mixer, args[0]))

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in model.named_modules()
               if isinstance(m, Mixer)]
    if not handles:
        raise ValueError(f"{type(model).__name__} has no residual mixer (mhc_lm.residual.Mixer) to diagnose")
    try:
        model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return probes


# ---------------------------------------------------------------------------------------------
# The report

# Summary over sublayers: the worst value of each (max, or min for a floor).
SUMMARY = {"gain_fwd_max": max, "gain_bwd_max": max, "comp_gain_fwd_max": max, "comp_gain_bwd_max": max,
           "spectral_norm_max": max, "comp_spectral_norm_max": max, "col_sum_min": min,
           "log_col_sum_absmax": max, "res_logit_range_max": max, "res_logit_frac_above_15": max}

REDUCTIONS = ("Per-token quantities are reduced over the probe's tokens: *_mean is the token mean, *_max the "
              "token max (*_min the token min). Plots: solid = token mean, dashed = token max. comp_* is the "
              "composite H_res[L-1] ... H_res[l] from sublayer l to the output. summary: worst over sublayers.")


@dataclasses.dataclass
class DiagnosticsReport:
    """`report`: the JSON-able numbers; `histograms`: per-token values for W&B histograms (and an .npz)."""

    report: dict[str, Any]
    histograms: dict[str, np.ndarray]

    def scalars(self) -> dict[str, float]:
        return report_scalars(self.report)

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """diagnostics.json, histograms.npz and one PNG per plot in `out_dir`; returns {plot name: PNG path}."""
        from ..plots import draw_all  # matplotlib: loaded only where a report is drawn

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "diagnostics.json").write_text(json.dumps(self.report, indent=1))
        np.savez_compressed(out_dir / "histograms.npz", **self.histograms)
        return draw_all(self.report, out_dir)


@torch.no_grad()
def run_diagnostics(model: nn.Module, input_ids: torch.Tensor, step: Optional[int] = None) -> DiagnosticsReport:
    """Probe every mixer of `model` on `input_ids` (B, T) and assemble the report."""
    probes = probe_mixers(model, input_ids)
    sublayers, histograms = [], {}
    for depth, (probe, comp) in enumerate(zip(probes, composites([p.h_res for p in probes]))):
        name = sublayer_name(probe.module, depth)
        (single, single_tokens), (composite, composite_tokens) = h_res_stats(probe.h_res), composite_stats(comp)
        sublayers.append({"name": name, "module": probe.module, "depth": depth, **single, **composite,
                          **probe.stats})
        histograms.update({f"{name}/{k}": v.numpy() for k, v in {**single_tokens, **composite_tokens}.items()})
    negative = any(s["min_entry"] < NEGATIVE_ENTRY for s in sublayers)
    summary = {key: pick(s[key] for s in sublayers) for key, pick in SUMMARY.items() if key in sublayers[0]}
    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "step": step,
        "variant": probes[0].variant,
        "n": int(probes[0].h_res.shape[-1]),
        "probe": {"sequences": int(input_ids.shape[0]), "seq_len": int(input_ids.shape[1]),
                  "tokens": int(input_ids.numel())},
        "reductions": REDUCTIONS,
        # With negative entries (seen, or allowed by the variant) abs row/column sums overstate the gain:
        # the spectral norm is the bound that matters.
        "negative_entries": negative,
        "bound": "spectral_norm" if negative or any(p.signed for p in probes) else "amax_gain",
        "summary": summary,
        "sublayers": sublayers,
    }
    return DiagnosticsReport(report, histograms)


def report_scalars(report: dict[str, Any]) -> dict[str, float]:
    """Flat W&B scalars: diag/<sublayer>/<key>, diag/summary/<key>, lists as <key>.<i>; matrices stay in JSON."""
    scalars = {"diag/negative_entries": float(report["negative_entries"])}
    scalars.update({f"diag/summary/{k}": float(v) for k, v in report["summary"].items()})
    for sub in report["sublayers"]:
        for key, value in sub.items():
            if isinstance(value, bool) or key == "depth":
                continue
            if isinstance(value, (int, float)):
                scalars[f"diag/{sub['name']}/{key}"] = float(value)
            elif isinstance(value, list) and value and not isinstance(value[0], list):
                scalars.update({f"diag/{sub['name']}/{key}.{i}": float(v) for i, v in enumerate(value)})
    return scalars


# ---------------------------------------------------------------------------------------------
# In the training loop


def probe_batch(tokens: np.ndarray, seq_len: int, batch_size: int) -> torch.Tensor:
    """The fixed probe: the inputs (B, seq_len) of the first `batch_size` blocks of a token stream."""
    return next(eval_batches(tokens, seq_len, batch_size, 1))[:, :-1]


def log_diagnostics(model: nn.Module, input_ids: torch.Tensor, step: int, run_dir: str | Path,
                    tracker) -> DiagnosticsReport:
    """Probe, write RUN/diagnostics/step_N/ (JSON, .npz, PNGs) and send scalars, histograms, images to the tracker."""
    result = run_diagnostics(model, input_ids.to(next(model.parameters()).device), step)
    images = result.write(RunDir(run_dir).diagnostics_at(step))
    tracker.log(result.scalars(), step)
    tracker.log_media({f"diag_plots/{k}": v for k, v in images.items()},
                      {f"diag_hist/{k}": v for k, v in result.histograms.items()}, step)
    return result
