"""Engines (DDP, FSDP, DeepSpeed ZeRO), their checks against our config, and preemption.

The engine comes from how the run was launched (`accelerate launch --config_file launch/accelerate/*.yaml`,
`torchrun`, SLURM): Accelerate reads it from the environment. This module makes each engine follow
our rules rather than its own defaults:

* the learning rate is `lr_at(step)`, set on the optimizer every step: no engine scheduler;
* the optimizer is ours (AdamW with our parameter groups): a DeepSpeed JSON with an `optimizer`
  or `scheduler` key is refused;
* the connection parameters (`fn`, `base`, `scale`, ...) stay fp32 under bf16: DeepSpeed runs
  with `torch_autocast` (parameters and master weights fp32, matmuls in bf16) instead of its bf16
  mode (which casts every parameter), and FSDP keeps fp32 parameters with autocast compute;
* micro-batch, accumulation and clipping come from the Hydra config; a DeepSpeed JSON that sets
  them to something else is refused with both values named.

Preemption: SIGTERM or SIGUSR1 sets a flag; at the end of the step every rank learns whether any
rank was signalled (one all-reduce), all save a checkpoint, and the run exits cleanly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .errors import EXIT_PREEMPTED, ConfigError
from .run_dir import RunDir

RENDEZVOUS_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")


def strip_local_rank_flag(argv: list[str]) -> list[str]:
    """Remove the `--local_rank=N` (or `--local_rank N`) the `deepspeed` launcher appends, which
    Hydra would reject, keeping it in LOCAL_RANK where torch and accelerate look for it."""
    kept, skip_next = [], False
    for i, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip_next = True
        else:
            kept.append(arg)
    return kept


def process_rank() -> int:
    """The global rank from the launcher's environment (0 when not launched distributed)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The launcher's WORLD_SIZE (1 when not launched distributed); ConfigError if it is not a count."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"environment WORLD_SIZE={value!r}: not a process count; allowed: an integer >= 1 "
                          "(set by torchrun, accelerate launch or SLURM), or unset")
    return int(value)


def check_rendezvous_env() -> None:
    """A distributed launch (WORLD_SIZE > 1) must say where to meet; name what is missing."""
    if world_size() <= 1:
        return
    missing = [v for v in RENDEZVOUS_VARS if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"environment {missing[0]}=<unset>: WORLD_SIZE={os.environ['WORLD_SIZE']} asks for a "
                          f"distributed run, which also needs {', '.join(RENDEZVOUS_VARS)}; launch with "
                          "torchrun, accelerate launch or launch/slurm/train.sbatch, which set them")
    for var in ("RANK", "LOCAL_RANK", "MASTER_PORT"):
        if not os.environ[var].isdigit():
            raise ConfigError(f"environment {var}={os.environ[var]!r}: not an integer; allowed: an integer "
                              "(set by the launcher)")
    if int(os.environ["RANK"]) >= world_size():
        raise ConfigError(f"environment RANK={os.environ['RANK']}: not below WORLD_SIZE={world_size()}; allowed: "
                          f"0..{world_size() - 1}")


def resolve_grad_accum(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step: trainer.grad_accum, or derived from trainer.global_batch_size."""
    trainer = cfg.trainer
    if trainer.global_batch_size is None:
        return trainer.grad_accum
    per_pass = trainer.batch_size * world_size
    if trainer.global_batch_size % per_pass:
        raise ConfigError(f"trainer.global_batch_size={trainer.global_batch_size}: not divisible by trainer.batch_size="
                          f"{trainer.batch_size} x {world_size} process(es) = {per_pass}; allowed: a multiple of "
                          f"{per_pass}")
    derived = trainer.global_batch_size // per_pass
    if trainer.grad_accum not in (1, derived):
        raise ConfigError(f"trainer.grad_accum={trainer.grad_accum}: trainer.global_batch_size="
                          f"{trainer.global_batch_size} with {per_pass} sequences per pass needs {derived}; "
                          f"allowed: {derived}, or leave grad_accum at 1 to derive it")
    return derived


# ---------------------------------------------------------------------------------------------
# DeepSpeed

DS_PRECISION = {"bf16": "bfloat16", "fp16": "float16"}


def _check_ds_value(ds_config: dict, key: str, ours: Any, option: str) -> None:
    """A DeepSpeed key must be "auto", absent, or equal to our value."""
    node, *rest = key.split(".")
    value = ds_config.get(node, "auto")
    for part in rest:
        value = value.get(part, "auto") if isinstance(value, dict) else "auto"
    if value != "auto" and value != ours:
        raise ConfigError(f"{option}={ours!r}: the DeepSpeed config sets {key}={value!r}; allowed: make them agree "
                          f"(or set {key} to \"auto\" in the JSON)")


def configure_deepspeed(accelerator, cfg: TrainConfig, grad_accum: int, precision: str) -> dict:
    """Check the DeepSpeed JSON against the Hydra config and fill in what the engine needs from it."""
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"deepspeed config key {key!r}={ds[key]!r}: mhc-lm builds its own {key} (AdamW with its "
                              "parameter groups, lr_at(step)); allowed: remove the key from the JSON")
    for dtype in ("bf16", "fp16"):
        if str(ds.get(dtype, {}).get("enabled", False)).lower() == "true":
            raise ConfigError(f"deepspeed config {dtype}.enabled=true: it casts every parameter, the connection "
                              f"parameters included, to {dtype}; allowed: remove it and set trainer.precision "
                              f"(mhc-lm runs DeepSpeed with torch_autocast)")
    _check_ds_value(ds, "train_micro_batch_size_per_gpu", cfg.trainer.batch_size, "trainer.batch_size")
    _check_ds_value(ds, "gradient_accumulation_steps", grad_accum, "trainer.grad_accum")
    _check_ds_value(ds, "gradient_clipping", float(cfg.optim.grad_clip), "optim.grad_clip")
    _check_ds_value(ds, "train_batch_size", cfg.trainer.batch_size * grad_accum * accelerator.num_processes,
                    "trainer.batch_size x grad_accum x processes")
    autocast = ds.get("torch_autocast", {})
    wanted = DS_PRECISION.get(precision)
    if autocast.get("enabled") and autocast.get("dtype", "bfloat16") != wanted:
        raise ConfigError(f"trainer.precision={precision!r}: the DeepSpeed config asks for torch_autocast in "
                          f"{autocast.get('dtype')}; allowed: make them agree")
    ds["train_micro_batch_size_per_gpu"] = cfg.trainer.batch_size
    ds["gradient_accumulation_steps"] = grad_accum
    ds["gradient_clipping"] = float(cfg.optim.grad_clip)
    ds["train_batch_size"] = cfg.trainer.batch_size * grad_accum * accelerator.num_processes
    ds["torch_autocast"] = {"enabled": wanted is not None, **({"dtype": wanted} if wanted else {})}
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:  # the export needs the full weights gathered on save
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return ds


def configure_fsdp(accelerator) -> None:
    """FSDP keeps fp32 parameters (connection parameters included) and computes in autocast."""
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) == 2:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    else:
        from torch.distributed.fsdp import MixedPrecision

        plugin.mixed_precision_policy = MixedPrecision(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                                       buffer_dtype=torch.float32)


def check_engine(accelerator, world_size: int) -> None:
    """Refuse launches that would silently train something else than asked: independent replicas
    instead of data parallelism, or plain DDP where FSDP was configured."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if world_size > 1 and (kind == DistributedType.NO or accelerator.num_processes != world_size):
        raise ConfigError(f"environment WORLD_SIZE={world_size}: accelerate set up {kind.value} with "
                          f"{accelerator.num_processes} process(es); allowed: a launch accelerate recognises "
                          "(accelerate launch --config_file launch/accelerate/*.yaml, or torchrun)")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and kind != DistributedType.FSDP:
        raise ConfigError(f"accelerate config distributed_type=FSDP: this launch runs as {kind.value} (FSDP "
                          "needs CUDA devices); allowed: launch/accelerate/ddp.yaml or a DeepSpeed config here")


def engine_name(accelerator) -> str:
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return f"deepspeed-zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if kind == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def engine_shards_parameters(accelerator) -> bool:
    """FSDP or ZeRO-3: no rank holds the whole model between steps."""
    return engine_name(accelerator) in ("fsdp", "deepspeed-zero3")


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the whole model, also when ZeRO-3 has partitioned them (ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Preemption


class Preemption:
    """SIGTERM / SIGUSR1 -> checkpoint at the end of the step, on every rank, then exit cleanly.

    `received` is the signal this rank got; `cause` the signal any rank got, the same on every rank once
    `requested` has said True (a rank that was not signalled still names the real cause)."""

    def __init__(self, signals: tuple[str, ...] = PREEMPT_SIGNALS):
        self.signals = signals
        self.received: str | None = None
        self.cause: str | None = None
        for name in signals:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        print(f"[rank {process_rank()}] received {self.received}: checkpointing at the end of this step",
              file=sys.stderr, flush=True)

    def requested(self, accelerator) -> bool:
        """True on every rank when any rank was signalled (one all-reduce of a flag per signal)."""
        flags = torch.tensor([float(self.received == name) for name in self.signals], device=accelerator.device)
        counts = accelerator.reduce(flags, reduction="sum").tolist()
        caught = [name for name, count in zip(self.signals, counts) if count > 0]
        self.cause = self.cause or (caught[0] if caught else None)
        return bool(caught)


# ---------------------------------------------------------------------------------------------
# Stopping early: how the run ends, and how to continue it

RUN_SPECIFIC = ("hydra.run.dir", "trainer.run_name", "trainer.resume", "trainer.stop_at_step")


def under_elastic_agent() -> bool:
    """Launched by torchrun or accelerate launch: the agent counts a non-zero exit as a failure."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def launcher_prefix() -> list[str]:
    """The command up to and including the training script: the elastic agent's own command line (torchrun,
    accelerate launch) when there is one, else this interpreter."""
    script = os.path.abspath(sys.argv[0])
    if under_elastic_agent():
        with contextlib.suppress(OSError):
            parent = open(f"/proc/{os.getppid()}/cmdline", "rb").read().split(b"\0")
            argv = [a.decode() for a in parent if a]
            at = next((i for i, a in enumerate(argv) if os.path.basename(a) == os.path.basename(script)), None)
            if at is not None:
                return [*argv[:at], script]
    return [sys.executable, script]


SUPERVISOR_ENV = "MHC_LM_SUPERVISE"  # set by launch/supervise.sh to its own path


def continue_command(run_dir: Path) -> list[str]:
    """This run's command line with its own overrides, continuing in `run_dir` from its newest checkpoint;
    under launch/supervise.sh again, when the run was, so a second preemption also ends with exit 75."""
    kept = [a for a in sys.argv[1:] if a.split("=", 1)[0].lstrip("+~") not in RUN_SPECIFIC]
    supervisor = os.environ.get(SUPERVISOR_ENV)
    prefix = [supervisor, str(run_dir)] if supervisor and under_elastic_agent() else []
    return [*prefix, *launcher_prefix(), *kept, f"hydra.run.dir={run_dir}", "trainer.resume=auto"]


def node_count() -> int:
    """Nodes of this launch: the elastic agent's WORLD_SIZE over its LOCAL_WORLD_SIZE (1 without an agent)."""
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    return max(1, world // local) if local else 1


def continue_note() -> str:
    """What continue.sh's reader must know beyond the command: on several nodes, where to run it."""
    nodes = node_count()
    if nodes == 1:
        return ""
    if "SLURM_JOB_ID" in os.environ:
        return (f"# {nodes} nodes under SLURM: resubmit the sbatch script (it resumes this run by itself), or run\n"
                f"# this script on every node of a new allocation at once.\n")
    return f"# {nodes} nodes: run this script on every node at once (the same command on each, as at the start).\n"


CARRIED_ENV = ("PET_SIGNALS_TO_HANDLE", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "MHC_LM_CACHE", "CUDA_VISIBLE_DEVICES",
               "HF_HOME", "WANDB_MODE")


def write_stop_record(run_dir: Path, step: int, cause: str) -> Path:
    """RUN/continue.sh (the exact command, run from the same directory with the same launcher) and
    RUN/stopped.json; rank 0 calls it when the run stops before trainer.max_steps."""
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in CARRIED_ENV if k in os.environ]
    script = RunDir(run_dir).continue_script
    script.write_text("#!/bin/bash\n# Continue this run from its newest intact checkpoint (written when it stopped).\n"
                      f"{continue_note()}cd {shlex.quote(os.getcwd())}\nexec {' '.join(['env', *env]) + ' ' if env else ''}"
                      f"{shlex.join(continue_command(Path(run_dir)))}\n")
    script.chmod(0o755)
    record = {"step": step, "cause": cause, "continue": str(script)}
    RunDir(run_dir).stopped.write_text(json.dumps(record, indent=2) + "\n")
    return script


def clear_stop_record(run_dir: Path) -> None:
    """A run that goes on is no longer stopped (rank 0, at the start)."""
    RunDir(run_dir).stopped.unlink(missing_ok=True)


def report_stop(accelerator, run_dir: Path, step: int, max_steps: int, preemption: Preemption) -> None:
    """Say why the run stopped early (the same cause on every rank), write RUN/continue.sh, and on a preemption
    end with EXIT_PREEMPTED, except under an elastic agent (a non-zero worker is a failure to it: the launch
    scripts read RUN/stopped.json instead)."""
    cause = preemption.cause or "trainer.stop_at_step"
    if accelerator.is_main_process:
        write_stop_record(run_dir, step, cause)
    accelerator.wait_for_everyone()
    why = f"on {cause}" if preemption.cause else "at trainer.stop_at_step"
    accelerator.print(f"run dir: {run_dir} | stopped {why} at step {step} of {max_steps}, checkpoint saved; "
                      f"continue with: bash {RunDir(run_dir).continue_script}")
    if preemption.cause and not under_elastic_agent():
        raise SystemExit(EXIT_PREEMPTED)
