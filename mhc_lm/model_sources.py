"""What a user can name as a model, and how it loads.

A source is one of:
  - a training checkpoint `RUN/checkpoints/step_N/` (accelerate's `model.safetensors`, `trainer_state.json`,
    `run_config.json`);
  - a run directory `RUN/`: its export (the final model), else its newest checkpoint; or every checkpoint;
  - an exported folder (`RUN/export/`, or any Hugging Face model folder);
  - a Hugging Face Hub id (`USER/NAME`, loaded with `from_pretrained`).

`resolve_sources` checks the names against the file system before any work and returns one
`ModelSource` subclass per kind (`CheckpointSource`, `ExportSource`, `HubSource`), which knows how it
loads, its context length, how it becomes a publishable export and where its diagnostics go.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from .checkpoint import checkpoint_damage, has_weights, load_model_from_checkpoint, read_trainer_state
from .export import has_bundled_code, save_export
from .run_dir import RUN_CONFIG, TRAINER_STATE, RunDir, step_of
from .errors import ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass
class ModelSource:
    """A model a user named; each kind (below) knows how it loads, exports and where its reports go."""

    location: str  # a directory, or a Hub id
    label: str  # how tables and plots name it
    run_dir: Optional[Path] = None  # the training run it belongs to, when known
    step: Optional[int] = None
    tokens_seen: Optional[int] = None
    kind: ClassVar[str] = ""
    report_prefix: ClassVar[str] = ""  # RUN/diagnostics/<prefix><folder name>: apart from the training probe's step_N

    def load(self, trust_remote_code: bool = False):
        """(model in eval mode, tokenizer) on the CPU, with `from_pretrained`."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from . import model as _registers_the_architecture  # noqa: F401

        model = AutoModelForCausalLM.from_pretrained(self.location, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(self.location, trust_remote_code=trust_remote_code)
        return model.eval(), tokenizer

    def context(self) -> Optional[int]:
        """The model's context length read from its files without loading it."""
        config = Path(self.location) / "config.json"
        return json.loads(config.read_text()).get("max_position_embeddings") if config.exists() else None

    def export_folder(self, scratch: Path) -> Path:
        """A complete export carrying its modeling code: this folder itself."""
        if not has_bundled_code(self.location):
            raise ConfigError(f"source={self.location!r}: an export without its modeling code (modeling_mhc.py, "
                              "auto_map), which mhc-lm has written since 0.1.0; allowed: an export of mhc-lm >= "
                              "0.1.0, or the run's checkpoint")
        return Path(self.location)

    def diagnostics_dir(self) -> Path:
        """Where `python -m mhc_lm.diagnostics` writes by default: under the run's diagnostics/ when the model
        belongs to a run (RUN/diagnostics/export, RUN/diagnostics/checkpoint_step_N: never inside the export
        or checkpoint that gets pushed), else beside the model (FOLDER/diagnostics)."""
        if self.run_dir is not None:
            return RunDir(self.run_dir).diagnostics / f"{self.report_prefix}{Path(self.location).name}"
        return Path(self.location) / "diagnostics"


class ExportSource(ModelSource):
    """An exported folder (`RUN/export/` or any Hugging Face model folder)."""

    kind = "export"


class CheckpointSource(ModelSource):
    """A training checkpoint `RUN/checkpoints/step_N/`."""

    kind = "checkpoint"
    report_prefix = "checkpoint_"

    def load(self, trust_remote_code: bool = False):
        return load_model_from_checkpoint(self.location)

    def export_folder(self, scratch: Path) -> Path:
        """The checkpoint exported to `scratch`."""
        model, tokenizer = self.load()
        return save_export(model, tokenizer, scratch / "export", trainer_state=read_trainer_state(self.location))


class HubSource(ModelSource):
    """A Hugging Face Hub id `USER/NAME`."""

    kind = "hub"

    def context(self) -> Optional[int]:
        return None  # known only once downloaded

    def diagnostics_dir(self) -> Path:
        return Path("diagnostics") / self.location.replace("/", "--")


def is_checkpoint(path: Path) -> bool:
    """A training checkpoint (an export also has trainer_state.json, but never run_config.json)."""
    return all((path / name).exists() for name in (TRAINER_STATE, RUN_CONFIG)) and has_weights(path)


def is_export(path: Path) -> bool:
    return (path / "config.json").exists() and not is_checkpoint(path)


def run_label(run_dir: Path, suffix: str) -> str:
    return f"{run_dir.name}/{suffix}"


def checkpoint_source(path: Path, option: str = "models") -> ModelSource:
    """A training checkpoint, checked against its manifest before anything reads it."""
    damage = checkpoint_damage(path)
    if damage:
        raise ConfigError(f"{option}={str(path)!r}: damaged checkpoint, {damage}; allowed: an intact checkpoint, "
                          "an exported folder or a Hub id")
    state = read_trainer_state(path)
    run_dir = path.parent.parent if RunDir(path.parent.parent).checkpoints == path.parent else None
    label = run_label(run_dir, path.name) if run_dir is not None else str(path)
    return CheckpointSource(str(path), label, run_dir, state.get("step"), state.get("tokens_seen"))


def export_source(path: Path) -> ModelSource:
    state_file = path / TRAINER_STATE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    run_dir = path.parent if RunDir(path.parent).looks_like_a_run() else None
    label = run_label(run_dir, path.name) if run_dir is not None else str(path)
    return ExportSource(str(path), label, run_dir, state.get("step"), state.get("tokens_seen"))


def resolve_sources(spec: str, checkpoints: str = "last", option: str = "models") -> list[ModelSource]:
    """The model(s) that `spec` names; ConfigError if it names none.

    checkpoints: what a run directory stands for: last (its export, else its newest checkpoint) or all
    (every checkpoint)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if is_checkpoint(path):
            return [checkpoint_source(path, option)]
        if is_export(path):
            return [export_source(path)]
        found = RunDir(path).list_checkpoints()
        if checkpoints == "all" and found:
            return [checkpoint_source(p, option) for p in found]
        if is_export(RunDir(path).export):
            return [export_source(RunDir(path).export)]
        if found:
            return [checkpoint_source(found[-1], option)]
        raise ConfigError(f"{option}={spec!r}: a directory with neither a checkpoint (trainer_state.json, "
                          "run_config.json, weights), a model (config.json), checkpoints/step_N nor export/; allowed: "
                          "a checkpoint, a run directory, an exported folder or a Hub id")
    local_parent = path.parent != Path(".") and path.parent.is_dir()  # runs/typo is a path, not a Hub id
    if path.exists() or local_parent or step_of(path) is not None or not HUB_ID.match(spec):
        raise ConfigError(f"{option}={spec!r}: no such directory, and not a Hub id; allowed: a checkpoint, "
                          "a run directory, an exported folder or a Hub id USER/NAME")
    return [HubSource(spec, spec)]


def local_context(source: ModelSource) -> Optional[int]:
    """The model's context length read from its files without loading it (None for a Hub id)."""
    return source.context()


def load_source(source: ModelSource, trust_remote_code: bool = False):
    """(model in eval mode, tokenizer) on the CPU."""
    return source.load(trust_remote_code)
