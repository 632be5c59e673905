"""What train.py checks before any work (no tokenizing, no model): the options, the checkpoint it resumes
from, and the launch environment. `mhc_lm.cli.run` runs the options' check before Hydra starts; train.py
runs `check_train` first thing in its task. Every failure is a ConfigError (one line, exit 2)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from .checkpoint import prepare_resume
from .config import TrainConfig, validate
from .distributed import check_rendezvous_env, clear_stop_record, process_rank, resolve_grad_accum, world_size


def run_config(cfg: TrainConfig) -> dict:
    """What a checkpoint records of its run to refuse an incompatible resume: the model and residual sections."""
    return {"model": dataclasses.asdict(cfg.model), "residual": dict(cfg.residual)}


def check_train(cfg: TrainConfig, run_dir: str | Path) -> Optional[Path]:
    """Everything checkable before work; returns the intact checkpoint to resume from (None: a fresh start)."""
    validate(cfg)
    check_rendezvous_env()
    resolve_grad_accum(cfg, world_size())
    checkpoint = prepare_resume(cfg.trainer.resume, run_dir, run_config(cfg), world_size())
    if process_rank() == 0:
        clear_stop_record(run_dir)  # this run goes on
    return checkpoint
