"""The layout of a run directory, spelled in one place; every other module asks `RunDir`.

    RUN/
      .hydra/config.yaml            the composed config, as Hydra saved it
      metrics.jsonl                 every logged scalar, one JSON object per line (mhc_lm.tracking)
      checkpoints/step_000123/      a complete checkpoint (mhc_lm.checkpoint), holding among others
        trainer_state.json          the loop's TrainState
        run_config.json             the model and residual sections, checked on resume
        manifest.json               every other file's size and sha256, written last
      checkpoints/.tmp-step_000123/ a checkpoint being written (renamed when complete)
      diagnostics/step_000123/      the mixing probe's JSON, arrays and pictures (mhc_lm.diagnostics)
      export/                       the final Hugging Face export (with its own trainer_state.json)
      stopped.json                  why and at which step a run stopped early (launch/supervise.sh reads it)
      continue.sh                   the command that continues a run that stopped early
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TRAINER_STATE = "trainer_state.json"
RUN_CONFIG = "run_config.json"
MANIFEST = "manifest.json"
PARTIAL_PREFIX = ".tmp-"
REPORT_FORMAT = "mhc-lm-diagnostics"  # diagnostics.json: format and version, checked by its readers
REPORT_VERSION = 1
STEP_DIR = re.compile(r"^step_(\d+)$")


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def step_dirs(root: Path) -> list[Path]:
    """The `step_N` directories under `root`, oldest first ([] if `root` is absent)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def step_of(path: Path) -> int | None:
    """N of a `step_N` directory, None for any other name."""
    match = STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class RunDir:
    """A training run's directory: where each of its files lives."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def diagnostics(self) -> Path:
        return self.path / "diagnostics"

    @property
    def export(self) -> Path:
        return self.path / "export"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def hydra_config(self) -> Path:
        return self.path / ".hydra" / "config.yaml"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    def partial_checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{PARTIAL_PREFIX}{step_name(step)}"

    def list_partial_checkpoints(self) -> list[Path]:
        """Checkpoints being written, or left half-written by a crash."""
        return sorted(self.checkpoints.glob(PARTIAL_PREFIX + "*")) if self.checkpoints.is_dir() else []

    @property
    def stopped(self) -> Path:
        return self.path / "stopped.json"

    @property
    def continue_script(self) -> Path:
        return self.path / "continue.sh"

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return step_dirs(self.checkpoints)

    def diagnostics_at(self, step: int) -> Path:
        return self.diagnostics / step_name(step)

    def list_diagnostics(self) -> list[Path]:
        return step_dirs(self.diagnostics)

    def looks_like_a_run(self) -> bool:
        """Has checkpoints or logged metrics (an export's parent folder may be a run)."""
        return bool(self.list_checkpoints()) or self.metrics.exists()
