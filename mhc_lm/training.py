"""The parts of a training run that train.py wires together.

- `make_accelerator`: the Accelerator for this launch (one process, DDP, FSDP or DeepSpeed, read from
  the environment), configured by our rules (`mhc_lm.distributed`).
- `TrainState`: what the loop advances (step, tokens seen, training seconds); saved in every
  checkpoint as `trainer_state.json` through `state_dict()` / `load_state_dict()`.
- `due`: the one rule for every periodic action (logging, validation, diagnostics, checkpoints).
- `Backward` / `DeepSpeedBackward`: how one engine runs backward and where the gradient-norm
  monitor reads the reduced gradients; chosen once at setup by `make_backward`, so `train_step`
  knows no engine.
- `train_step`: one optimizer step over this process's micro-batches.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Optional

import torch

from .config import TrainConfig
from .distributed import check_engine, configure_deepspeed, configure_fsdp, resolve_grad_accum
from .metrics import token_loss_sum

GradNormMonitor = Callable[..., dict]  # (loss_scale=1.0) -> {"grad_norm/<group>": norm}


def resolve_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def autocast_dtype(precision: str):
    """The autocast dtype of a precision name (`bf16`, `fp16`); None for fp32 / `no`."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def make_accelerator(cfg: TrainConfig):
    """The Accelerator for this launch, configured by our rules; returns (accelerator, grad_accum, precision)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    precision = resolve_precision(cfg.trainer.precision)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    grad_accum = resolve_grad_accum(cfg, world_size)
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    # Several CPU processes (torchrun / accelerate launch without GPUs) talk over gloo. Naming a
    # backend in a single process would make accelerate expect a process group, so only then; and
    # DDP on CPU needs cpu=True (else accelerate leaves the model unwrapped), DeepSpeed must not get it.
    distributed_cpu = not torch.cuda.is_available() and world_size > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed_cpu else []
    accelerator = Accelerator(
        # DeepSpeed's own bf16 would cast the connection parameters; it gets torch_autocast instead.
        mixed_precision="no" if precision == "fp32" or deepspeed else precision,
        gradient_accumulation_steps=grad_accum,
        dynamo_backend="inductor" if cfg.trainer.compile else None,
        kwargs_handlers=handlers,
        cpu=distributed_cpu and not deepspeed,
    )
    check_engine(accelerator, world_size)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, cfg, grad_accum, precision)
    elif accelerator.distributed_type == DistributedType.FSDP:
        configure_fsdp(accelerator)
    return accelerator, grad_accum, precision


@dataclass
class TrainState:
    """Where the run is: optimizer steps taken, tokens trained on (all ranks), seconds spent in steps."""

    step: int = 0
    tokens_seen: int = 0
    train_time: float = 0.0

    def advance(self, tokens: int, seconds: float) -> None:
        self.step += 1
        self.tokens_seen += tokens
        self.train_time += seconds

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen, self.train_time = state["step"], state["tokens_seen"], state["train_time"]


def due(step: int, every: int, last: int) -> bool:
    """Whether a periodic action runs after `step`: every `every` steps and at the last one; never if `every` is 0."""
    return every > 0 and (step % every == 0 or step == last)


class Backward:
    """One process, DDP or FSDP: accelerate's backward; at the accumulation boundary the monitor reads
    the gradients before clipping (an fp16 loss scale divided out)."""

    def __init__(self, accelerator, monitor: Optional[GradNormMonitor] = None):
        self.accelerator = accelerator
        self.monitor = monitor  # measures the per-group norms; the step's clipped total is `grad_norm`

    def __call__(self, loss: torch.Tensor) -> dict:
        self.accelerator.backward(loss)
        if self.monitor is None or not self.accelerator.sync_gradients:
            return {}
        scaler = self.accelerator.scaler
        return self.monitor(scaler.get_scale() if scaler else 1.0)


class DeepSpeedBackward(Backward):
    """DeepSpeed: accelerate's backward also runs the engine's step (clipping, update, zero_grad), which
    leaves no gradient to read. At the boundary, with a monitor, we drive the engine ourselves and read
    the reduced gradients between its backward and its step."""

    def __call__(self, loss: torch.Tensor) -> dict:
        if self.monitor is None or not self.accelerator.sync_gradients:
            self.accelerator.backward(loss)
            return {}
        engine = self.accelerator.deepspeed_engine_wrapped.engine
        engine.set_gradient_accumulation_boundary(is_boundary=True)
        engine.backward(loss)
        group_norms = self.monitor()
        engine.step()
        return group_norms


def make_backward(accelerator, model: torch.nn.Module, monitor: bool) -> Backward:
    """The backward of this run's engine, with the gradient-norm monitor (`logger.grad_norms`) when asked."""
    from accelerate.utils import DistributedType

    from .diagnostics import GradNorms

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    grad_norm_monitor = GradNorms(model, "deepspeed" if deepspeed else None) if monitor else None
    return (DeepSpeedBackward if deepspeed else Backward)(accelerator, grad_norm_monitor)


class StepResult(NamedTuple):
    loss: float  # per token, over the whole step on all ranks
    grad_norm: float  # of all gradients, before clipping
    tokens: int  # trained on in this step, all ranks
    group_norms: dict  # the monitor's per-group norms; {} without one


def train_step(model, optimizer, batches: list[torch.Tensor], accelerator, grad_clip: float,
               backward: Optional[Backward] = None) -> StepResult:
    """One optimizer step over this process's micro-batches.

    The loss is normalized by the tokens of the whole step on all ranks. accelerate divides each
    micro-batch loss by grad_accum and DDP averages over ranks: we undo both, so the gradient is
    (sum of token losses) / (tokens in the step), whatever the accumulation and the world size.
    """
    backward = backward or Backward(accelerator)
    device, world = accelerator.device, accelerator.num_processes
    local_tokens = torch.tensor(sum(b[:, 1:].numel() for b in batches), device=device)
    step_tokens = accelerator.reduce(local_tokens, reduction="sum").item()
    scale = len(batches) * world / step_tokens
    loss_sum = torch.zeros((), device=device)
    grad_norm, group_norms = torch.zeros(()), {}
    for batch in batches:
        with accelerator.accumulate(model):
            with accelerator.autocast():
                micro_loss, _ = token_loss_sum(model, batch)
            group_norms = backward(micro_loss * scale) or group_norms
            loss_sum += micro_loss.detach()
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    loss = accelerator.reduce(loss_sum, reduction="sum").item() / step_tokens
    return StepResult(loss, float(grad_norm), step_tokens, group_norms)
