"""What a user can name as a model, and how it loads.

A source is one of:
  - a training checkpoint `RUN/checkpoints/step_N/` (accelerate's `model.safetensors`, `trainer_state.json`,
    `run_config.json`);
  - a run directory `RUN/`: its export (the final model), else its newest checkpoint; or every checkpoint;
  - an exported folder (`RUN/export/`, or any Hugging Face model folder);
  - a Hugging Face Hub id (`USER/NAME`, loaded with `from_pretrained`).

`resolve_sources` checks the names against the file system before any work; `load_source` loads one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .checkpoint import has_weights, read_trainer_state
from .run_dir import RUN_CONFIG, TRAINER_STATE, RunDir, step_of
from .errors import ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass
class ModelSource:
    kind: str  # checkpoint | export | hub
    location: str  # a directory, or a Hub id
    label: str  # how tables and plots name it
    run_dir: Optional[Path] = None  # the training run it belongs to, when known
    step: Optional[int] = None
    tokens_seen: Optional[int] = None


def is_checkpoint(path: Path) -> bool:
    """A training checkpoint (an export also has trainer_state.json, but never run_config.json)."""
    return all((path / name).exists() for name in (TRAINER_STATE, RUN_CONFIG)) and has_weights(path)


def is_export(path: Path) -> bool:
    return (path / "config.json").exists() and not is_checkpoint(path)


def run_label(run_dir: Path, suffix: str) -> str:
    return f"{run_dir.name}/{suffix}"


def checkpoint_source(path: Path) -> ModelSource:
    state = read_trainer_state(path)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    label = run_label(run_dir, path.name) if run_dir is not None else str(path)
    return ModelSource("checkpoint", str(path), label, run_dir, state.get("step"), state.get("tokens_seen"))


def export_source(path: Path) -> ModelSource:
    state_file = path / TRAINER_STATE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    run_dir = path.parent if RunDir(path.parent).looks_like_a_run() else None
    label = run_label(run_dir, path.name) if run_dir is not None else str(path)
    return ModelSource("export", str(path), label, run_dir, state.get("step"), state.get("tokens_seen"))


def resolve_sources(spec: str, checkpoints: str = "last", option: str = "models") -> list[ModelSource]:
    """The model(s) that `spec` names; ConfigError if it names none.

    checkpoints: what a run directory stands for: last (its export, else its newest checkpoint) or all
    (every checkpoint)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if is_checkpoint(path):
            return [checkpoint_source(path)]
        if is_export(path):
            return [export_source(path)]
        found = RunDir(path).list_checkpoints()
        if checkpoints == "all" and found:
            return [checkpoint_source(p) for p in found]
        if is_export(RunDir(path).export):
            return [export_source(RunDir(path).export)]
        if found:
            return [checkpoint_source(found[-1])]
        raise ConfigError(f"{option}={spec!r}: a directory with neither a checkpoint (trainer_state.json, "
                          "run_config.json, weights), a model (config.json), checkpoints/step_N nor export/; allowed: "
                          "a checkpoint, a run directory, an exported folder or a Hub id")
    local_parent = path.parent != Path(".") and path.parent.is_dir()  # runs/typo is a path, not a Hub id
    if path.exists() or local_parent or step_of(path) is not None or not HUB_ID.match(spec):
        raise ConfigError(f"{option}={spec!r}: no such directory, and not a Hub id; allowed: a checkpoint, "
                          "a run directory, an exported folder or a Hub id USER/NAME")
    return [ModelSource("hub", spec, spec)]


def local_context(source: ModelSource) -> Optional[int]:
    """The model's context length read from its files without loading it (None for a Hub id)."""
    folder = Path(source.location)
    if (folder / "config.json").exists():
        return json.loads((folder / "config.json").read_text()).get("max_position_embeddings")
    if (folder / RUN_CONFIG).exists():
        return json.loads((folder / RUN_CONFIG).read_text())["model"].get("max_seq_len")
    return None


def load_source(source: ModelSource, trust_remote_code: bool = False):
    """(model in eval mode, tokenizer) on the CPU."""
    if source.kind == "checkpoint":
        from .checkpoint import load_model_from_checkpoint

        return load_model_from_checkpoint(source.location)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import model as _registers_the_architecture  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(source.location, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer
