"""Atomic, resumable training checkpoints.

A checkpoint is a directory `RUN/checkpoints/step_000123/` holding:
  - what `accelerator.save_state` writes: model weights, optimizer state, every process's RNG state;
  - `trainer_state.json`: step, tokens seen, elapsed training time;
  - `data_state_rank{r}.json`: each rank's data position (format: `mhc_lm/data/state.py`);
  - `run_config.json`: the model and residual configuration, to refuse an incompatible resume;
  - `config.json` and the tokenizer files: enough, with the weights, to load the model on its own
    (`load_model_from_checkpoint`, used by eval.py and the Hub upload);
  - `manifest.json`: every other file's size and sha256 (format `MANIFEST_FORMAT`, version
    `MANIFEST_VERSION`), written last.

Every rank writes into `checkpoints/.tmp-step_000123/`; once all are done, rank 0 writes the manifest
and renames the directory. A crash mid-save leaves only a `.tmp-` directory, which resume ignores and
the next start removes. A checkpoint damaged later (a truncated or overwritten file, a missing one)
fails its manifest: `trainer.resume=auto` skips it for the newest intact one and says so; naming it
explicitly is a one-line error. All of this is checked before any data is prepared (`prepare_resume`).
A full disk during a save is said as such (`DiskFullError`), and the partial directory removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from transformers import AutoTokenizer

from .data import DataConfig, load_data_tokenizer
from .errors import ConfigError, DiskFullError
from .model import MhcConfig, MhcForCausalLM
from .run_dir import MANIFEST, PARTIAL_PREFIX, RUN_CONFIG, TRAINER_STATE, RunDir, step_of

MANIFEST_FORMAT = "mhc-lm-checkpoint-manifest"
MANIFEST_VERSION = 1

log = logging.getLogger(__name__)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return RunDir(run_dir).list_checkpoints()


def resolve_resume(resume: Optional[str], run_dir: str | Path) -> Optional[Path]:
    """The checkpoint to resume from: None for a fresh start. Only intact checkpoints (`checkpoint_damage`):
    from a run directory (`auto`, or a path to one) the newest intact one, saying which damaged ones were
    skipped; a checkpoint named explicitly that is damaged is a ConfigError naming the file."""
    if resume in (None, "none"):
        return None
    explicit = resume != "auto" and ((Path(resume) / TRAINER_STATE).exists() or step_of(Path(resume)) is not None)
    if explicit:
        damage = checkpoint_damage(Path(resume))
        if damage:
            raise ConfigError(f"trainer.resume={resume!r}: damaged checkpoint, {damage}; allowed: an intact "
                              "checkpoint, its run directory (the newest intact one), auto or none")
        return Path(resume)
    found = list_checkpoints(run_dir if resume == "auto" else resume)
    if not found:
        if resume == "auto":
            return None
        raise ConfigError(f"trainer.resume={resume!r}: neither a checkpoint nor a run directory with "
                          "checkpoints; allowed: auto, none, RUN_DIR or RUN_DIR/checkpoints/step_N")
    return newest_intact(found, resume)


def newest_intact(found: list[Path], resume: str) -> Path:
    """The newest of `found` (oldest first) that passes its manifest; one logged line per damaged one skipped."""
    for checkpoint in reversed(found):
        damage = checkpoint_damage(checkpoint)
        if not damage:
            return checkpoint
        if int(os.environ.get("RANK", "0")) == 0:
            log.warning(f"trainer.resume={resume}: skipped the damaged checkpoint {checkpoint} ({damage})")
    raise ConfigError(f"trainer.resume={resume!r}: every checkpoint in {found[-1].parent} is damaged (the newest: "
                      f"{checkpoint_damage(found[-1])}); allowed: trainer.resume=none to start over")


def prepare_resume(resume: Optional[str], run_dir: str | Path, run_config: dict, world_size: int) -> Optional[Path]:
    """Before any work: remove what crashed saves left (rank 0), pick the checkpoint to resume from
    (`resolve_resume`), and refuse one this run cannot continue (its model, its ZeRO partitioning)."""
    if int(os.environ.get("RANK", "0")) == 0:
        remove_stale_tmp(run_dir)
    checkpoint = resolve_resume(resume, run_dir)
    if checkpoint is not None:
        check_compatible(checkpoint, run_config)
        check_process_count(checkpoint, world_size)
    return checkpoint


def remove_stale_tmp(run_dir: str | Path) -> None:
    """Partial checkpoints (`.tmp-step_*`) are saves that never finished; no run will complete them."""
    for tmp in RunDir(run_dir).list_partial_checkpoints():
        shutil.rmtree(tmp, ignore_errors=True)


def check_process_count(checkpoint: Path, world_size: int) -> None:
    saved_ranks = len(list(checkpoint.glob("data_state_rank*.json")))
    if (checkpoint / DEEPSPEED_TAG).is_dir() and saved_ranks != world_size:
        raise ConfigError(f"trainer.resume={str(checkpoint)!r}: a DeepSpeed ZeRO checkpoint partitions the optimizer "
                          f"over the {saved_ranks} process(es) that saved it, this run has {world_size}; "
                          f"allowed: resume with {saved_ranks} process(es)")


# ---------------------------------------------------------------------------------------------
# The manifest: every file's size and sha256


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_files(folder: Path) -> list[Path]:
    """Every file below `folder` except the manifest, as paths relative to it, sorted."""
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    files = {str(rel): {"size": (folder / rel).stat().st_size, "sha256": file_sha256(folder / rel)}
             for rel in checkpoint_files(folder)}
    _write_json(folder / MANIFEST, {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": files})


def checkpoint_damage(folder: Path) -> Optional[str]:
    """What is wrong with a checkpoint against its manifest (`FILE: what`), None if it is intact."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return f"{MANIFEST}: missing (the save did not finish)"
    except (OSError, ValueError) as err:
        return f"{MANIFEST}: unreadable ({type(err).__name__})"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return f"{MANIFEST}: not a checkpoint manifest"
    if manifest.get("version") != MANIFEST_VERSION:
        return f"{MANIFEST}: format version {manifest.get('version')!r}, this mhc-lm reads {MANIFEST_VERSION}"
    for rel, expected in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            return f"{rel}: missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{rel}: {size} bytes, the manifest says {expected['size']} (truncated or overwritten)"
        if file_sha256(path) != expected["sha256"]:
            return f"{rel}: its sha256 differs from the manifest's (corrupted)"
    return None


def check_compatible(checkpoint: Path, run_config: dict[str, Any]) -> None:
    """Refuse a checkpoint whose model or residual configuration differs from this run's."""
    saved = json.loads((checkpoint / RUN_CONFIG).read_text())
    old_name, new_name = saved.get("residual", {}).get("name"), run_config.get("residual", {}).get("name")
    if old_name != new_name:  # the variant decides every other residual key: name it, not a key it implies
        raise ConfigError(f"residual.name={new_name!r}: the checkpoint {checkpoint} was trained with "
                          f"residual={old_name}; allowed: residual={old_name}, or trainer.resume=none")
    for section in ("model", "residual"):
        keys = sorted(set(saved.get(section, {})) | set(run_config.get(section, {})))
        for key in keys:
            if (section, key) in (("model", "name"), ("residual", "kernel")):  # not part of the model's math
                continue
            old, new = saved.get(section, {}).get(key), run_config.get(section, {}).get(key)
            if old != new:
                raise ConfigError(f"{section}.{key}={new!r}: the checkpoint {checkpoint} was trained with "
                                  f"{section}.{key}={old!r}; allowed: the checkpoint's value, or trainer.resume=none")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def save_checkpoint(accelerator, run_dir: str | Path, step: int, trainer_state: dict, data_state: dict,
                    run_config: dict, keep_last: int, model_config=None, tokenizer=None) -> Path:
    """Write a checkpoint for `step` atomically, on every rank; prune to the newest `keep_last`.

    `model_config` (a PretrainedConfig) and `tokenizer`, when given, are saved alongside so the
    checkpoint loads as a model without the training config. A full disk raises DiskFullError after
    removing the partial directory."""
    final, tmp = RunDir(run_dir).checkpoint(step), RunDir(run_dir).partial_checkpoint(step)
    try:
        write_checkpoint(accelerator, tmp, trainer_state, data_state, run_config, model_config, tokenizer)
    except Exception as err:  # noqa: BLE001  (torch, safetensors and DeepSpeed each wrap a full disk their own way)
        full = disk_full(err, tmp, run_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        if full is None:
            raise
        raise full from None
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again (e.g. the final step after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def write_checkpoint(accelerator, tmp: Path, trainer_state: dict, data_state: dict, run_config: dict,
                     model_config, tokenizer) -> None:
    """Every rank's files into `tmp`, then (rank 0, once all are written) the manifest."""
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a previous crash mid-save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    _write_json(tmp / f"data_state_rank{accelerator.process_index}.json", data_state)
    if accelerator.is_main_process:
        _write_json(tmp / TRAINER_STATE, trainer_state)
        _write_json(tmp / RUN_CONFIG, run_config)
        if model_config is not None:
            model_config.to_json_file(tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(tmp)


def disk_full(err: BaseException, tmp: Path, run_dir: str | Path) -> Optional[DiskFullError]:
    """A DiskFullError if `err` came from a full disk: ENOSPC itself, or (torch's writer wraps it in a
    RuntimeError about positions, safetensors in its own SafetensorError) less space left than the
    checkpoint needs; None for any other error."""
    written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.is_dir() else 0
    previous = list_checkpoints(run_dir)
    needed = sum(p.stat().st_size for p in previous[-1].rglob("*") if p.is_file()) if previous else written
    where = tmp.parent if tmp.parent.exists() else Path(run_dir)
    free = shutil.disk_usage(where).free
    enospc = isinstance(err, OSError) and err.errno == errno.ENOSPC
    if not enospc and free >= max(needed, written) + (1 << 20):
        return None
    basis = "the previous checkpoint's size" if previous else "written before it failed"
    return DiskFullError(f"disk full: the checkpoint {tmp.name.removeprefix(PARTIAL_PREFIX)} in {tmp.parent} needs about "
                         f"{needed:,} bytes ({basis}), {free:,} are free; removed the partial {tmp.name}; the previous "
                         f"checkpoints are intact; free space, or set trainer.output_dir on a larger disk, and resume")


def load_checkpoint(accelerator, checkpoint: Path) -> tuple[dict, list[dict]]:
    """Restore model, optimizer and RNG in place; return (trainer_state, the data state of every saved rank).

    The data states are indexed by the rank that saved them; `mhc_lm.data.state_for_rank` picks the one
    this rank resumes from (or refuses a world size the data source cannot be resumed with). The
    checkpoint was checked by `prepare_resume`.
    """
    saved_ranks = len(list(checkpoint.glob("data_state_rank*.json")))
    data_states = [json.loads((checkpoint / f"data_state_rank{r}.json").read_text()) for r in range(saved_ranks)]
    accelerator.load_state(str(checkpoint))
    trainer_state = json.loads((checkpoint / TRAINER_STATE).read_text())
    return trainer_state, data_states


def read_trainer_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())


def load_model_from_checkpoint(checkpoint: str | Path):
    """(model in eval mode, tokenizer) from a training checkpoint's weights, on the CPU in fp32.

    The architecture comes from the checkpoint's `config.json` (every checkpoint since 0.1.0 has one).
    The tokenizer comes from the checkpoint, else from the run's export, else from the run's Hydra
    config (the cached BPE).
    """
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").exists():
        raise ConfigError(f"{checkpoint}: no config.json, which every checkpoint of mhc-lm >= 0.1.0 has; allowed: "
                          "a checkpoint written by mhc-lm >= 0.1.0")
    state = {strip_wrapper_prefix(k): v for k, v in checkpoint_weights(checkpoint).items()}
    tokenizer = checkpoint_tokenizer(checkpoint)
    config = MhcConfig.from_pretrained(checkpoint)
    model = MhcForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{checkpoint}: weights do not match the model: missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")
    model.tie_weights()
    return model.eval(), tokenizer


DEEPSPEED_TAG = "pytorch_model"  # the folder accelerate's save_state gives DeepSpeed's engine.save_checkpoint


def has_weights(checkpoint: Path) -> bool:
    """Weights as accelerate writes them: model.safetensors, or DeepSpeed's (ZeRO-sharded) folder."""
    return (checkpoint / "model.safetensors").exists() or (checkpoint / DEEPSPEED_TAG).is_dir()


def checkpoint_weights(checkpoint: Path) -> dict:
    """The full fp32 state dict of a checkpoint, consolidated from ZeRO shards when DeepSpeed wrote it."""
    if (checkpoint / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(checkpoint / "model.safetensors")
    if (checkpoint / DEEPSPEED_TAG).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG)
    raise ValueError(f"{checkpoint}: no model.safetensors and no DeepSpeed {DEEPSPEED_TAG}/ folder")


def strip_wrapper_prefix(key: str) -> str:
    """State-dict keys as the bare model names them (DDP's `module.`, torch.compile's `_orig_mod.`)."""
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def run_hydra_config(run_dir: str | Path):
    """The run's composed config as Hydra saved it (RUN/.hydra/config.yaml), an OmegaConf node; None if absent."""
    path = RunDir(run_dir).hydra_config
    return OmegaConf.load(path) if path.exists() else None


def run_data_config(run_dir: str | Path):
    """The run's `data` section as a DataConfig, from its saved Hydra config; None if absent."""
    saved = run_hydra_config(run_dir)
    return None if saved is None else DataConfig(**OmegaConf.to_container(saved.data, resolve=True))


def checkpoint_tokenizer(checkpoint: Path):
    run_dir = checkpoint.parent.parent
    for folder in (checkpoint, RunDir(run_dir).export):
        if (folder / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(folder))
    data_cfg = run_data_config(run_dir)
    if data_cfg is None:
        raise ValueError(f"{checkpoint}: no tokenizer in the checkpoint, the run's export or its .hydra/config.yaml")
    return load_data_tokenizer(data_cfg)
