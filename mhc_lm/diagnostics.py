"""Diagnostics of the residual mixing (SPEC section 6): gains, spectra, constraint health, streams, gradients.

Two parts:

* **The probe** (`run_diagnostics`): one forward pass over a fixed batch with a forward pre-hook on every
  `Mixer` of the model. Each hook sees its sublayer's input streams (B, T, n, C) and asks the mixer for
  `coefficients(streams)` = (H_pre, H_post, H_res), paper orientation. Nothing here knows a variant by
  name: any `Mixer` works. Sublayers are numbered in the order their hooks fire (depth order: attention,
  then MLP, of each block) and named `attn.<block>` / `mlp.<block>`.
* **Gradient norms** (`GradNorms`): global, per block and per parameter group, every optimizer step, in
  one pass over the gradients.

Reductions over tokens: every per-token quantity is reported as its mean over the probe's tokens
(`*_mean`) and its maximum (`*_max`, or `*_min` where the small end matters). The plots draw the token
mean as solid lines and the token max as dashed lines, and say so.

Run as a program, it writes the report of a checkpoint or an exported model:

    python -m mhc_lm.diagnostics runs/<run>/checkpoints/step_000600 [--out DIR]   # RUN/diagnostics/checkpoint_step_000600
    python -m mhc_lm.diagnostics runs/<run>                                       # RUN/diagnostics/export
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

from .residual import Mixer
from .residual.base import GeneratedMixer
from .residual.hc import HcMixer

LOGIT_RANGE_LIMIT = 15.0  # a res_logit range above this risks Sinkhorn non-convergence (SPEC section 6)
NEGATIVE_ENTRY = -1e-6  # entries below this are negative by design, not by rounding (e.g. "what is left" of a row)


# ---------------------------------------------------------------------------------------------
# The math on H_res (per token, shapes (N, n, n) with N tokens); everything in float64.


def amax_gains(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward, backward) Amax gain of (..., n, n) matrices: the max abs row sum and the max abs column sum."""
    a = h.abs()
    return a.sum(-1).amax(-1), a.sum(-2).amax(-1)


def composites(h_res: list[torch.Tensor]) -> list[torch.Tensor]:
    """The maps from each sublayer to the output: out[l] = H_res[L-1] @ ... @ H_res[l] (per token)."""
    out: list[torch.Tensor] = []
    acc = None
    for h in reversed(h_res):
        acc = h if acc is None else acc @ h
        out.append(acc)
    return out[::-1]


def effective_rank(singular_values: torch.Tensor) -> torch.Tensor:
    """exp(entropy of the normalized singular values) over the last dimension (Roy & Vetterli, 2007)."""
    p = singular_values / singular_values.sum(-1, keepdim=True).clamp_min(1e-300)
    return torch.exp(-torch.special.xlogy(p, p).sum(-1))


def row_entropy(h: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of |H| normalized to sum 1: (..., n, n) -> (..., n). log n is uniform."""
    a = h.abs()
    p = a / a.sum(-1, keepdim=True).clamp_min(1e-300)
    return -torch.special.xlogy(p, p).sum(-1)


def _mean_max(prefix: str, values: torch.Tensor) -> dict[str, float]:
    return {f"{prefix}_mean": values.mean().item(), f"{prefix}_max": values.max().item()}


def h_res_stats(h: torch.Tensor) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Statistics of one sublayer's H_res, (N, n, n) float64 per token; and the per-token values to histogram."""
    n = h.shape[-1]
    fwd, bwd = amax_gains(h)
    sv = torch.linalg.svdvals(h)  # (N, n), descending
    mean_matrix = h.mean(0)
    col_sums, row_sums = h.sum(-2), h.sum(-1)
    abs_diag = h.diagonal(dim1=-2, dim2=-1).abs().sum(-1)
    stats = {
        **_mean_max("gain_fwd", fwd), **_mean_max("gain_bwd", bwd), **_mean_max("spectral_norm", sv[:, 0]),
        "sigma_min_min": sv[:, -1].min().item(),
        "h_res_mean": mean_matrix.tolist(),
        "svals_mean_matrix": torch.linalg.svdvals(mean_matrix).tolist(),
        "row_sum_min": row_sums.min().item(), "row_sum_max": row_sums.max().item(),
        "col_sum_min": col_sums.min().item(), "col_sum_max": col_sums.max().item(),
        # A column sum <= 0 has no logarithm: it counts as 1e-12 (|log| = 27.6), far past any healthy value.
        "log_col_sum_absmax": col_sums.clamp_min(1e-12).log().abs().max().item(),
        "identity_dist_mean": (h - torch.eye(n, dtype=h.dtype)).norm(dim=(-2, -1)).mean().item(),
        "diag_mass_mean": (abs_diag / h.abs().sum((-2, -1)).clamp_min(1e-300)).mean().item(),
        "row_entropy_mean": row_entropy(h).mean().item(),
        "min_entry": h.min().item(),
    }
    if n > 1:
        stats["sigma2_mean"] = sv[:, 1].mean().item()
    return stats, {"h_res": h.flatten(), "spectral_norm": sv[:, 0]}


def composite_stats(c: torch.Tensor) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Gains and spectral norm of the composite map from a sublayer to the output, (N, n, n) per token;
    and the per-token values to histogram."""
    fwd, bwd = amax_gains(c)
    stats = {**_mean_max("comp_gain_fwd", fwd), **_mean_max("comp_gain_bwd", bwd),
             **_mean_max("comp_spectral_norm", torch.linalg.svdvals(c)[:, 0])}
    return stats, {"comp_gain_fwd": fwd}


def stream_stats(streams: torch.Tensor) -> dict[str, Any]:
    """Per-stream RMS, pairwise cosine similarity and effective rank of the n streams, (N, n, C)."""
    x = streams.float()
    n, width = x.shape[-2:]
    gram = (x @ x.transpose(-1, -2)).double()  # (N, n, n): one pass over the streams serves everything
    squares = gram.diagonal(dim1=-2, dim2=-1)  # (N, n) squared norms of the streams
    norms = squares.clamp_min(1e-300).sqrt()
    cos = gram / (norms.unsqueeze(-1) * norms.unsqueeze(-2))
    singular = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()  # singular values of the (n, C) stream matrix
    stats = {
        "stream_rms": (squares / width).sqrt().mean(0).tolist(),
        "stream_cos": cos.mean(0).tolist(),
        "stream_eff_rank_mean": effective_rank(singular).mean().item(),
    }
    if n > 1:
        off_diagonal = ~torch.eye(n, dtype=torch.bool)
        stats["stream_cos_offdiag_mean"] = cos[:, off_diagonal].mean().item()
    return stats


def _range_stats(prefix: str, values: torch.Tensor) -> dict[str, float]:
    return {f"{prefix}_mean": values.mean().item(), f"{prefix}_min": values.min().item(),
            f"{prefix}_max": values.max().item()}


def logit_stats(res_logit: torch.Tensor) -> dict[str, float]:
    """Per-token range (max - min) of the Sinkhorn logits (N, k) and the fraction of tokens above the limit."""
    spread = res_logit.amax(-1) - res_logit.amin(-1)
    return {**_mean_max("res_logit_range", spread),
            "res_logit_frac_above_15": (spread > LOGIT_RANGE_LIMIT).double().mean().item()}


# ---------------------------------------------------------------------------------------------
# The probe: hooks on every mixer


def projects_with_sinkhorn(mixer: Mixer) -> bool:
    """Whether the mixer's H_res is a Sinkhorn projection of generated logits (its options name the iteration)."""
    return isinstance(mixer, GeneratedMixer) and getattr(mixer.options, "sinkhorn_iters", None) is not None


def gate_scales(mixer: Mixer) -> dict[str, float]:
    """The three gating factors (pre, post, res): `scale` of the generator family, HC's alpha/beta; else none."""
    if isinstance(mixer, GeneratedMixer):
        return dict(zip(("scale_pre", "scale_post", "scale_res"), mixer.scale.detach().float().tolist()))
    if isinstance(mixer, HcMixer) and mixer.options.dynamic:
        alpha, beta = mixer.alpha.item(), mixer.beta.item()
        return {"scale_pre": alpha, "scale_post": beta, "scale_res": alpha}
    return {}


def sublayer_name(module_name: str, depth: int) -> str:
    """model.layers.3.attn_hc -> attn.3; a mixer elsewhere -> sublayer.<depth>."""
    match = re.search(r"layers\.(\d+)\.(\w+?)_hc$", module_name)
    return f"{match.group(2)}.{match.group(1)}" if match else f"sublayer.{depth}"


@dataclasses.dataclass
class SublayerProbe:
    """What one mixer saw on the probe batch. Per-token tensors are (N, ...) float64 on the CPU."""

    module: str
    variant: str
    signed: bool  # the variant's H_res may have negative entries by design (class attribute `signed`)
    h_res: torch.Tensor  # (N, n, n), paper orientation
    stats: dict[str, Any]  # everything that does not need the other sublayers


@torch.no_grad()
def measure_mixer(module_name: str, mixer: Mixer, streams: torch.Tensor) -> SublayerProbe:
    h_pre, h_post, h_res = mixer.coefficients(streams)
    n = h_res.shape[-1]
    h_res = h_res.reshape(-1, n, n).double().cpu()
    stats = {**stream_stats(streams.reshape(-1, *streams.shape[-2:])),
             **_range_stats("h_pre", h_pre.double()), **_range_stats("h_post", h_post.double()),
             **gate_scales(mixer)}
    if projects_with_sinkhorn(mixer):
        res_logit = mixer.generate(streams)[2]
        stats.update(logit_stats(res_logit.reshape(-1, res_logit.shape[-1]).double()))
    kind = type(mixer)
    return SublayerProbe(module_name, getattr(kind, "variant", kind.__name__), getattr(kind, "signed", False), h_res,
                         stats)


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
        from .plots import draw_all

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "diagnostics.json").write_text(json.dumps(self.report, indent=1))
        np.savez_compressed(out_dir / "histograms.npz", **self.histograms)
        return draw_all(self.report, out_dir)


@torch.no_grad()
def run_diagnostics(model: nn.Module, input_ids: torch.Tensor, step: Optional[int] = None) -> DiagnosticsReport:
    """Probe every mixer of `model` on `input_ids` (B, T) and assemble the report (SPEC section 6)."""
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
    from .data import eval_batches

    return next(eval_batches(tokens, seq_len, batch_size, 1))[:, :-1]


def log_diagnostics(model: nn.Module, input_ids: torch.Tensor, step: int, run_dir: str | Path,
                    tracker) -> DiagnosticsReport:
    """Probe, write RUN/diagnostics/step_N/ (JSON, .npz, PNGs) and send scalars, histograms, images to the tracker."""
    result = run_diagnostics(model, input_ids.to(next(model.parameters()).device), step)
    images = result.write(Path(run_dir) / "diagnostics" / f"step_{step:06d}")
    tracker.log(result.scalars(), step)
    tracker.log_media({f"diag_plots/{k}": v for k, v in images.items()},
                      {f"diag_hist/{k}": v for k, v in result.histograms.items()}, step)
    return result


BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")
CONNECTION_LEAVES = ("fn", "base", "scale")


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names by gradient-norm group: attention, mlp, embeddings, norms, connection (and its
    fn / base / scale / other parts), block.<i>. `global` holds every trainable parameter."""
    from .optim import connection_parameter_names

    connection = connection_parameter_names(model)
    groups: dict[str, list[str]] = {"global": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        keys = ["global"]
        if name in connection:
            leaf = name.rsplit(".", 1)[-1]
            keys += ["connection", f"connection.{leaf if leaf in CONNECTION_LEAVES else 'other'}"]
        elif ".attn." in name:
            keys.append("attention")
        elif ".mlp." in name:
            keys.append("mlp")
        elif "embed" in name or "lm_head" in name:
            keys.append("embeddings")
        else:
            keys.append("norms")
        if block := BLOCK.search(name):
            keys.append(f"block.{block.group(1)}")
        for key in keys:
            groups.setdefault(key, []).append(name)
    return groups


class GradNorms:
    """L2 norms of the gradients by group (`parameter_groups`), as `grad_norm/<group>` scalars.

    One pass: torch._foreach_norm over all gradients, then a (groups x params) 0/1 matrix sums the
    squares, and one transfer brings the results to the host. Call after backward, before clipping;
    `loss_scale` undoes an fp16 loss scale.

    Where the gradients are sharded the squares are summed over this process's pieces and then over
    the processes, one all-reduce of a vector as long as the parameter list: `sharded="deepspeed"`
    (ZeRO 1/2: this rank's fragment of the reduced gradient; ZeRO-3: its partition), and FSDP2's
    DTensor parameters (their gradients' local shards) are recognised by type. Every rank must then
    call it.
    """

    def __init__(self, model: nn.Module, sharded: Optional[str] = None):
        if sharded not in (None, "deepspeed"):
            raise ValueError(f"sharded={sharded!r}: allowed: None, 'deepspeed'")
        groups = parameter_groups(model)
        named = dict(model.named_parameters())
        self.names = groups["global"]
        self.params = [named[n] for n in self.names]
        if sharded is None and any(hasattr(p, "to_local") for p in self.params):  # DTensor (FSDP2)
            sharded = "dtensor"
        self.sharded = sharded
        index = {n: i for i, n in enumerate(self.names)}
        self.keys = [f"grad_norm/{key}" for key in groups]
        self.membership = torch.zeros(len(groups), len(self.names))
        for row, members in enumerate(groups.values()):
            self.membership[row, [index[n] for n in members]] = 1.0

    def _local_grad(self, param: nn.Parameter) -> Optional[torch.Tensor]:
        """This process's piece of the gradient: whole (DDP, one process), a DTensor's local shard
        (FSDP2), or DeepSpeed's fragment (None where this rank holds none of the parameter)."""
        if self.sharded == "deepspeed":
            if hasattr(param, "ds_id"):  # ZeRO-3: the rank's partition of the fp32 gradient
                from deepspeed.utils import safe_get_local_grad

                return safe_get_local_grad(param)
            mapping = getattr(param, "_hp_mapping", None)  # ZeRO 1/2: the fragment this rank's optimizer owns
            return None if mapping is None else mapping.get_lp_grad_fragment(param._index_in_param_group)
        grad = param.grad
        return grad.to_local() if grad is not None and self.sharded == "dtensor" else grad

    @torch.no_grad()
    def __call__(self, loss_scale: float = 1.0) -> dict[str, float]:
        grads = [self._local_grad(p) for p in self.params]
        present = [i for i, g in enumerate(grads) if g is not None and g.numel()]
        if not present and self.sharded is None:
            return {}
        device = grads[present[0]].device if present else self.params[0].device
        squares = torch.zeros(len(self.params), device=device)
        if present:
            norms = torch._foreach_norm([grads[i] for i in present])
            squares[present] = torch.stack([x.float().to(device) for x in norms]).square()
        if self.sharded is not None:
            import torch.distributed as dist

            dist.all_reduce(squares)  # the pieces of each gradient are disjoint: squares add up
        if self.membership.device != squares.device:  # once: the matrix lives where the gradients are
            self.membership = self.membership.to(squares.device)
        totals = (self.membership @ squares).sqrt() / loss_scale
        return dict(zip(self.keys, totals.tolist()))


# ---------------------------------------------------------------------------------------------
# The command line: python -m mhc_lm.diagnostics PATH


def diagnose_source(spec: str, out: Optional[Path] = None, batch_size: Optional[int] = None,
                    seq_len: Optional[int] = None, data: str = "run", device: str = "cpu",
                    trust_remote_code: bool = False) -> tuple[DiagnosticsReport, Path]:
    """The report of a checkpoint, a run (its export, else its newest checkpoint), an export or a Hub id,
    written to `out` (default: `default_report_dir`); ConfigError on a bad name or option.

    The probe is the training run's own where the run is known: its data config (RUN/.hydra/config.yaml,
    data="run") in the model's tokenizer, its data.seq_len and logger.diag_batch_size; else the bundled
    corpus, 256 tokens (at most the model's context) and 4 sequences.
    """
    from .checkpoint import run_data_config, run_hydra_config
    from .data import DataConfig
    from .errors import ConfigError
    from .data import prepare_data
    from .model_sources import load_source, resolve_sources

    for option, value in (("--batch-size", batch_size), ("--seq-len", seq_len)):
        if value is not None and value < 1:
            raise ConfigError(f"{option}={value}: allowed: an integer >= 1")
    source = resolve_sources(spec, option="PATH")[0]
    saved = run_hydra_config(source.run_dir) if source.run_dir is not None else None
    model, tokenizer = load_source(source, trust_remote_code)
    context = model.config.max_position_embeddings
    seq_len = seq_len or (saved.data.seq_len if saved is not None else min(256, context))
    if seq_len > context:
        raise ConfigError(f"--seq-len={seq_len}: longer than the context of {source.label}; allowed: <= {context}")
    batch_size = batch_size or (saved.logger.get("diag_batch_size", 4) if saved is not None else 4)
    data_cfg = (run_data_config(source.run_dir) if saved is not None and data == "run" else None) or DataConfig()
    # The split in the model's own tokenizer, with the run's seq_len: the blocks the training probe used.
    tokens = prepare_data(dataclasses.replace(data_cfg, tokenizer=tokenizer.name_or_path, seq_len=seq_len))
    result = run_diagnostics(model.to(device), probe_batch(tokens.validation, seq_len, batch_size).to(device),
                             source.step)
    result.report["source"] = {"spec": spec, "kind": source.kind, "label": source.label}
    out = out or default_report_dir(source, spec)
    result.write(out)
    return result, out


def default_report_dir(source, spec: str) -> Path:
    """Where the command line writes a report: under the run's diagnostics (RUN/diagnostics/export,
    RUN/diagnostics/checkpoint_step_N), never inside the export or checkpoint that gets pushed;
    FOLDER/diagnostics for a model folder that belongs to no run; diagnostics/USER--NAME for a Hub id."""
    if source.run_dir is not None:
        folder = Path(source.location).name
        return source.run_dir / "diagnostics" / (folder if source.kind == "export" else f"checkpoint_{folder}")
    if source.kind == "hub":
        return Path("diagnostics") / spec.replace("/", "--")
    return Path(source.location) / "diagnostics"


def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    import sys

    from .errors import ConfigError
    from .plots import DRAWERS

    parser = argparse.ArgumentParser(prog="python -m mhc_lm.diagnostics", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="RUN/checkpoints/step_N, a run directory, RUN/export or a Hub id")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: under the run's diagnostics/, never inside the export)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="probe sequences (default: the run's logger.diag_batch_size, else 4)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="probe length (default: the run's data.seq_len, else min(256, the model's context))")
    parser.add_argument("--data", choices=("run", "bundled"), default="run",
                        help="run: the run's own validation split when its config is found (else bundled); "
                             "bundled: the bundled corpus's validation split")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trust-remote-code", action="store_true", help="for Hub models whose code is not mhc-lm's")
    args = parser.parse_args(argv)
    try:
        result, out = diagnose_source(args.path, args.out, args.batch_size, args.seq_len, args.data, args.device,
                                      args.trust_remote_code)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(result.report)
    print(f"wrote {out}: diagnostics.json, histograms.npz, {', '.join(f'{p}.png' for p in DRAWERS)}")
    return 0


def print_summary(report: dict[str, Any]) -> None:
    print(f"{report['variant']} n={report['n']} | probe {report['probe']['tokens']} tokens | "
          f"bound: {report['bound']} | token mean / token max")
    print(f"{'sublayer':<12}{'gain fwd':>18}{'composite fwd':>22}{'composite bwd':>22}{'spectral norm':>18}")
    for s in report["sublayers"]:
        print(f"{s['name']:<12}{s['gain_fwd_mean']:>9.4f}/{s['gain_fwd_max']:<8.4f}"
              f"{s['comp_gain_fwd_mean']:>12.4f}/{s['comp_gain_fwd_max']:<9.4f}"
              f"{s['comp_gain_bwd_mean']:>12.4f}/{s['comp_gain_bwd_max']:<9.4f}"
              f"{s['spectral_norm_mean']:>9.4f}/{s['spectral_norm_max']:<8.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
