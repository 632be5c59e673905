"""Metrics out: a JSON-lines file in the run directory (always) and Weights & Biases (optional).

Scalars go to both; pictures and histograms (`log_media`) only to W&B: the diagnostics write the same
pictures as PNG files into the run directory themselves.

W&B runs offline when no API key is configured (mode=auto), so `python train.py` works anywhere;
the run can be uploaded later with `wandb sync`. A resumed run continues the same W&B run (its id is
kept in the run directory). Only the main process logs.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from .config import LoggerConfig
from .run_dir import RunDir


def resolve_wandb_mode(mode: str) -> str:
    """auto -> WANDB_MODE if set, else online when an API key is configured, else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    import wandb

    try:
        has_key = bool(os.environ.get("WANDB_API_KEY")) or wandb.login(prompt=False, verify=False)
    except Exception:  # wandb.login raises on a malformed netrc or a missing host: treat as no key
        has_key = False
    return "online" if has_key else "offline"


class Tracker:
    def __init__(self, cfg: LoggerConfig, run_dir: str | Path, config: dict[str, Any], enabled: bool):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.wandb_run = None
        self.metrics_file = None
        if not enabled:
            return
        self.metrics_file = open(RunDir(self.run_dir).metrics, "a")
        if cfg.backend == "wandb":
            self.wandb_run = self._init_wandb(cfg, config)

    def _init_wandb(self, cfg: LoggerConfig, config: dict[str, Any]):
        import wandb

        mode = resolve_wandb_mode(cfg.mode)
        if mode == "disabled":
            return None
        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        # No banner and no run-history table at the end (dozens of lines): we say where the run is ourselves.
        # Online runs keep W&B's warnings; offline, W&B's three-line header is all it would say (silent).
        settings = wandb.Settings(quiet=True, silent=mode == "offline")
        run = wandb.init(project=cfg.project, entity=cfg.entity, name=self.run_dir.name, id=run_id, resume="allow",
                         dir=str(self.run_dir), config=config, mode=mode, tags=list(cfg.tags), settings=settings)
        if mode == "offline":
            print(f"W&B is logging offline; upload later with: wandb sync {Path(run.dir).parent}")
        else:
            print(f"W&B run: {run.url}")
        return run

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics_file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def log_media(self, images: dict[str, Path], histograms: dict[str, Any], step: int) -> None:
        """PNG files as W&B images and arrays of values as W&B histograms, at `step`."""
        if not self.enabled or self.wandb_run is None:
            return
        import wandb

        media = {key: wandb.Image(str(path)) for key, path in images.items()}
        media.update({key: wandb.Histogram(values) for key, values in histograms.items()})
        self.wandb_run.log(media, step=step)

    def finish(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
