"""Typed configuration of a training run and of an evaluation, and their validation.

Each component owns a dataclass here; the YAML groups in `conf/` mirror them. The root schemas are
registered with Hydra's ConfigStore as `train_schema` (train.py) and `eval_schema` (eval.py), so a
typo in an override or a YAML is an error at composition. The `residual` group is the exception: its keys depend on the variant, and
`validate` checks them against that variant's options dataclass (`mhc_lm.residual`).

`validate` and `validate_eval` run before any work (no tokenizing, no model) and raise `ConfigError` whose message
names the option, the value and what is allowed.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from .data import DataConfig, source_of, validate_data
from .errors import ConfigError, check_choice, check_min, check_range, fail
from .residual import validate_residual as check_residual
from .residual.recompute import check_policy


@dataclass
class ModelConfig:
    name: str = "small"  # the preset's name, used in run names
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: multi-head attention; fewer: grouped-query attention
    ffn_hidden: Optional[int] = None  # None: 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    vocab_size: Optional[int] = None  # None: the tokenizer's size, rounded up to vocab_multiple
    vocab_multiple: int = 64


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices only: never on norms, biases or connection parameters
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    grad_clip: float = 1.0  # 0 disables


@dataclass
class TrainerConfig:
    max_steps: int = 300
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1
    global_batch_size: Optional[int] = None  # sequences per optimizer step on all processes: derives grad_accum
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100  # 0: only the final checkpoint
    keep_last: int = 2
    resume: Optional[str] = "auto"  # auto | none | PATH (a checkpoint or a run directory)
    seed: int = 1337
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | bf16 | fp16 | fp32
    compile: bool = False
    log_every: int = 10
    output_dir: str = "runs"
    run_name: str = MISSING
    export: bool = True  # write a Hugging Face model (with the tokenizer) at the end
    num_threads: Optional[int] = None  # torch CPU threads; None: torch's default
    stop_at_step: Optional[int] = None  # checkpoint and stop here, as a preemption would (the schedule keeps max_steps)
    activation_checkpointing: str = "none"  # none | mhc (the paper's glue recompute) | full (every block)
    recompute_group: Optional[int] = None  # sublayers per `mhc` group; None: the paper's sqrt(nL / (n + 2))


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | none
    project: str = "mhc-lm"
    entity: Optional[str] = None
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    tags: list[str] = field(default_factory=list)
    diag_every: int = 250  # mixing diagnostics (mhc_lm.diagnostics) every N steps and at the end; 0: never
    diag_batch_size: int = 4  # probe sequences: the first blocks of the validation split
    grad_norms: bool = True  # gradient norms per block and parameter group, every step


@dataclass
class HubConfig:
    push: bool = False  # upload the final export (with a model card) to the Hub at the end of training
    repo: Optional[str] = None  # USER/NAME or ORG/NAME
    private: bool = False  # create the repository private (an existing one keeps its visibility)
    revision: Optional[str] = None  # branch of the final model; None: main
    push_checkpoints: bool = False  # also push every checkpoint to its own branch step-N


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    residual: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    hub: HubConfig = field(default_factory=HubConfig)


@dataclass
class LmEvalConfig:
    tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness task names; empty: skip
    include_path: Optional[str] = None  # a directory of extra task YAMLs (searched before the built-in tasks)
    num_fewshot: Optional[int] = None  # None: each task's default
    limit: Optional[float] = None  # documents per task (a fraction if < 1); None: all
    batch_size: int = 8
    seed: int = 0


@dataclass
class GenerateConfig:
    prompts: list[str] = field(default_factory=lambda: ["ROMEO:", "The king"])  # empty: no samples
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0: greedy
    top_k: Optional[int] = 50  # None: sample from the whole distribution
    seed: int = 0


@dataclass
class EvalConfig:
    models: list[str] = MISSING  # checkpoints, run directories, exported folders or Hub ids
    checkpoints: str = "last"  # for a run directory: last (its newest checkpoint) | all (every checkpoint)
    data: DataConfig = field(default_factory=DataConfig)  # the documents and seq_len; the tokenizer is the model's
    split: str = "validation"  # validation | train
    max_tokens: int = 65536  # token budget of the loss, rounded down to whole blocks of data.seq_len
    batch_size: int = 8
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | bf16 | fp16 | fp32
    trust_remote_code: bool = False  # for Hub ids and folders whose code is not mhc-lm's
    num_threads: Optional[int] = None  # torch CPU threads; None: torch's default
    output_dir: str = "evals"
    run_name: str = MISSING


def register_configs() -> None:
    """The root schema for Hydra, and the `rank_zero_or` resolver: `${rank_zero_or:a,b}` is `a` on
    rank 0 and `b` elsewhere (only rank 0 writes .hydra/ and the log file)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
    if not OmegaConf.has_resolver("rank_zero_or"):
        OmegaConf.register_new_resolver(
            "rank_zero_or", lambda value, other: value if int(os.environ.get("RANK", "0")) == 0 else other)
    if not OmegaConf.has_resolver("group_options"):  # `${group_options:data}`: "bundled, hub, ..." for --help
        OmegaConf.register_new_resolver("group_options", group_options)


def group_options(group: str) -> str:
    """The options of a config group, as --help lists them: the YAML files of conf/<group>/."""
    return ", ".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the checkout's config tree (installed editable)


def compose_config(overrides: list[str], config_name: str = "config"):
    """The config object Hydra composes from `conf/` with these overrides, as train.py (`config`, a
    TrainConfig) or eval.py (`eval`, an EvalConfig) would receive it; not validated."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return OmegaConf.to_object(compose(config_name=config_name, overrides=list(overrides)))


# ---------------------------------------------------------------------------------------------
# Validation


def validate_model(model: ModelConfig) -> None:
    for key in ("d_model", "n_layers", "n_heads", "max_seq_len"):
        check_min(f"model.{key}", getattr(model, key), 1)
    if model.d_model % model.n_heads:
        divisors = [h for h in range(1, min(model.d_model, 64) + 1) if model.d_model % h == 0]
        fail("model.n_heads", model.n_heads,
              f"model.d_model={model.d_model} must be divisible by it; allowed: {', '.join(map(str, divisors))}")
    if (model.d_model // model.n_heads) % 2:
        fail("model.n_heads", model.n_heads,
              f"the head dimension d_model / n_heads = {model.d_model // model.n_heads} must be even for RoPE")
    if model.n_kv_heads is not None and (model.n_kv_heads < 1 or model.n_heads % model.n_kv_heads):
        fail("model.n_kv_heads", model.n_kv_heads, f"allowed: a divisor of model.n_heads={model.n_heads}, or null")
    if model.ffn_hidden is not None:
        check_min("model.ffn_hidden", model.ffn_hidden, 1)
    if model.vocab_size is not None:
        check_min("model.vocab_size", model.vocab_size, 2)
    check_min("model.vocab_multiple", model.vocab_multiple, 1)
    for key in ("rope_theta", "norm_eps", "init_std"):  # a base, a term under rsqrt, a standard deviation
        check_range(f"model.{key}", getattr(model, key), 0, math.inf, low_open=True, high_open=True)


OPTIMIZERS = ("adamw",)
SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
LOGGER_BACKENDS = ("wandb", "none")
WANDB_MODES = ("auto", "online", "offline", "disabled")


def validate_optim(optim: OptimConfig) -> None:
    check_choice("optim.name", optim.name, OPTIMIZERS)
    check_choice("optim.schedule", optim.schedule, SCHEDULES)
    if not 0 < optim.lr < math.inf:
        fail("optim.lr", optim.lr, "allowed: a number > 0")
    check_range("optim.min_lr_ratio", optim.min_lr_ratio, 0, 1)
    if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
        fail("optim.betas", list(optim.betas), "allowed: two numbers in [0, 1)")
    check_min("optim.warmup_steps", optim.warmup_steps, 0)
    check_min("optim.weight_decay", optim.weight_decay, 0)
    check_min("optim.grad_clip", optim.grad_clip, 0)
    check_min("optim.eps", optim.eps, 0)
    if not 0 < optim.decay_fraction <= 1:
        fail("optim.decay_fraction", optim.decay_fraction, "allowed: a fraction in (0, 1]")


SEED_MAX = 2**32 - 1  # numpy's seeds (accelerate's set_seed seeds numpy, torch and random)


def validate_trainer(trainer: TrainerConfig) -> None:
    for key in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "log_every", "keep_last"):
        check_min(f"trainer.{key}", getattr(trainer, key), 1)
    check_min("trainer.ckpt_every", trainer.ckpt_every, 0)
    check_choice("trainer.precision", trainer.precision, PRECISIONS)
    check_range("trainer.seed", trainer.seed, 0, SEED_MAX)
    check_policy(trainer.activation_checkpointing, trainer.recompute_group, "trainer.activation_checkpointing")
    for key in ("num_threads", "stop_at_step", "global_batch_size"):
        if getattr(trainer, key) is not None:
            check_min(f"trainer.{key}", getattr(trainer, key), 1)
    resume = trainer.resume
    if resume not in (None, "auto", "none") and not os.path.exists(resume):
        fail("trainer.resume", resume, "no such path; allowed: auto, none, or a checkpoint or run directory")


def validate_logger(logger: LoggerConfig) -> None:
    check_choice("logger.backend", logger.backend, LOGGER_BACKENDS)
    check_choice("logger.mode", logger.mode, WANDB_MODES)
    check_min("logger.diag_every", logger.diag_every, 0)
    check_min("logger.diag_batch_size", logger.diag_batch_size, 1)


REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
BRANCH = re.compile(r"^(?!.*\.\.)(?!/)(?!.*/$)[\w./-]+$")


def check_repo_id(option: str, repo: Optional[str]) -> None:
    if repo is None or not REPO_ID.match(repo) or len(repo) > 96:
        fail(option, repo, "allowed: a Hub repository id USER/NAME or ORG/NAME (letters, digits, '-', '_', '.')")


def check_revision(option: str, revision: Optional[str]) -> None:
    if revision is not None and not BRANCH.match(revision):
        fail(option, revision, "allowed: a branch name such as step-1000 (letters, digits, '-', '_', '.', '/')")


def validate_hub(hub: HubConfig) -> None:
    if hub.push or hub.push_checkpoints:
        check_repo_id("hub.repo", hub.repo)
    check_revision("hub.revision", hub.revision)


def validate_residual(residual: dict[str, Any]) -> None:
    """The residual package's check (it raises ValueError, being part of every export) as a ConfigError."""
    try:
        check_residual(residual)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def validate(cfg: TrainConfig) -> None:
    """Check every option of a run; raise ConfigError on the first bad one."""
    validate_model(cfg.model)
    validate_residual(cfg.residual)
    validate_data(cfg.data, cfg.model.max_seq_len)
    validate_optim(cfg.optim)
    validate_trainer(cfg.trainer)
    validate_logger(cfg.logger)
    validate_hub(cfg.hub)


CHECKPOINT_CHOICES = ("last", "all")
EVAL_SPLITS = ("validation", "train")


def validate_eval(cfg: EvalConfig) -> None:
    """Check the options of eval.py that need no model (each model's context is checked when it loads)."""
    if not cfg.models:
        fail("models", list(cfg.models), "allowed: one or more checkpoints, run directories, exports or Hub ids")
    check_choice("checkpoints", cfg.checkpoints, CHECKPOINT_CHOICES)
    check_choice("split", cfg.split, EVAL_SPLITS)
    validate_data(cfg.data, cfg.data.seq_len)  # the models' contexts come later
    if source_of(cfg.data.source).streamed and cfg.split == "train":
        fail("split", cfg.split, f"data={cfg.data.source} streams its training split, there is no fixed train set "
                                 "to evaluate; allowed: validation")
    check_min("max_tokens", cfg.max_tokens, cfg.data.seq_len)
    check_min("batch_size", cfg.batch_size, 1)
    check_choice("precision", cfg.precision, PRECISIONS)
    if cfg.num_threads is not None:
        check_min("num_threads", cfg.num_threads, 1)
    lm = cfg.lm_eval
    check_min("lm_eval.batch_size", lm.batch_size, 1)
    check_range("lm_eval.seed", lm.seed, 0, SEED_MAX)
    if lm.num_fewshot is not None:
        check_min("lm_eval.num_fewshot", lm.num_fewshot, 0)
    if lm.limit is not None and not lm.limit > 0:
        fail("lm_eval.limit", lm.limit, "allowed: a number of documents >= 1, a fraction in (0, 1), or null")
    if lm.include_path is not None and not os.path.isdir(lm.include_path):
        fail("lm_eval.include_path", lm.include_path, "no such directory; allowed: a directory of task YAMLs, or null")
    gen = cfg.generate
    check_min("generate.max_new_tokens", gen.max_new_tokens, 1)
    check_min("generate.temperature", gen.temperature, 0)
    check_range("generate.seed", gen.seed, 0, SEED_MAX)
    if gen.top_k is not None:
        check_min("generate.top_k", gen.top_k, 1)

