"""The command line: the diagnostics report of a checkpoint, a run, an export or a Hub model.

    python -m mhc_lm.diagnostics runs/<run>/checkpoints/step_000600 [--out DIR]   # RUN/diagnostics/checkpoint_step_000600
    python -m mhc_lm.diagnostics runs/<run>                                       # RUN/diagnostics/export
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from ..checkpoint import run_data_config, run_hydra_config
from ..data import DataConfig, prepare_data
from ..errors import ConfigError
from ..model_sources import load_source, resolve_sources
from .probe import DiagnosticsReport, probe_batch, run_diagnostics

DESCRIPTION = "Diagnostics of the residual mixing: gains, spectra, constraint health, streams, gradients."


def diagnose_source(spec: str, out: Optional[Path] = None, batch_size: Optional[int] = None,
                    seq_len: Optional[int] = None, data: str = "run", device: str = "cpu",
                    trust_remote_code: bool = False) -> tuple[DiagnosticsReport, Path]:
    """The report of a checkpoint, a run (its export, else its newest checkpoint), an export or a Hub id,
    written to `out` (default: `source.diagnostics_dir()`); ConfigError on a bad name or option.

    The probe is the training run's own where the run is known: its data config (RUN/.hydra/config.yaml,
    data="run") in the model's tokenizer, its data.seq_len and logger.diag_batch_size; else the bundled
    corpus, 256 tokens (at most the model's context) and 4 sequences.
    """
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
    out = out or source.diagnostics_dir()
    result.write(out)
    return result, out


def main(argv: Optional[list[str]] = None) -> int:
    from ..plots import DRAWERS  # matplotlib: loaded only where a report is drawn

    parser = argparse.ArgumentParser(prog="python -m mhc_lm.diagnostics", description=DESCRIPTION)
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
