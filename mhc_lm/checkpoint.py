"""Atomic, resumable training checkpoints.

A checkpoint is a directory `RUN/checkpoints/step_000123/` holding:
  - what `accelerator.save_state` writes: model weights, optimizer state, every process's RNG state;
  - `trainer_state.json`: step, tokens seen, elapsed training time;
  - `data_state_rank{r}.json`: each rank's data position (format: `mhc_lm/data/state.py`);
  - `run_config.json`: the model and residual configuration, to refuse an incompatible resume;
  - `config.json` and the tokenizer files: enough, with the weights, to load the model on its own
    (`load_model_from_checkpoint`, used by eval.py and the Hub upload).

Every rank writes into `checkpoints/.tmp-step_000123/`; once all are done, rank 0 renames it. A
crash mid-save leaves only a `.tmp-` directory, which resume ignores: the last complete checkpoint
is the newest `step_*` directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from transformers import AutoTokenizer

from .data import DataConfig, load_data_tokenizer
from .errors import ConfigError
from .model import MhcConfig, MhcForCausalLM
from .run_dir import RUN_CONFIG, TRAINER_STATE, RunDir



def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return RunDir(run_dir).list_checkpoints()


def resolve_resume(resume: Optional[str], run_dir: str | Path) -> Optional[Path]:
    """The checkpoint to resume from: None for a fresh start."""
    if resume in (None, "none"):
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if (path / TRAINER_STATE).exists():
        return path
    found = list_checkpoints(path)
    if not found:
        raise ConfigError(f"trainer.resume={resume!r}: neither a checkpoint nor a run directory with "
                          "checkpoints; allowed: auto, none, RUN_DIR or RUN_DIR/checkpoints/step_N")
    return found[-1]


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
    checkpoint loads as a model without the training config."""
    final, tmp = RunDir(run_dir).checkpoint(step), RunDir(run_dir).partial_checkpoint(step)
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
        if final.exists():  # the same step saved again (e.g. the final step after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path) -> tuple[dict, list[dict]]:
    """Restore model, optimizer and RNG in place; return (trainer_state, the data state of every saved rank).

    The data states are indexed by the rank that saved them; `mhc_lm.data.state_for_rank` picks the one
    this rank resumes from (or refuses a world size the data source cannot be resumed with).
    """
    saved_ranks = len(list(checkpoint.glob("data_state_rank*.json")))
    if (checkpoint / DEEPSPEED_TAG).is_dir() and saved_ranks != accelerator.num_processes:
        raise ConfigError(f"trainer.resume={str(checkpoint)!r}: a DeepSpeed ZeRO checkpoint partitions the optimizer "
                          f"over the {saved_ranks} process(es) that saved it, this run has {accelerator.num_processes}; "
                          f"allowed: resume with {saved_ranks} process(es)")
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
