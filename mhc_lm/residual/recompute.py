"""Activation recompute for the residual streams: `mhc`, the glue recompute of the mHC paper (section 4.3),
and `full`, block checkpointing.

A model runs its residual path as a list of stages (its blocks), each a function streams (B, T, n, C) ->
streams:

* `none`: the stages one after another; autograd keeps everything it needs.
* `full`: each stage (a block) under torch's non-reentrant checkpoint: only its input streams stay alive,
  and the whole block runs again in backward.
* `mhc`: the stages in groups (L_r sublayers, as whole blocks). Only the streams entering a group stay
  alive. Inside the group the branches' matmul and attention outputs are kept (what costs
  FLOPs to recompute); the glue (coefficients, the collapse to the branch input, the stream write, all
  n streams wide) and the cheap element-wise ops are recomputed in backward. This is torch's selective
  checkpoint: the policy below decides per op, so the same code covers every variant and the Triton
  kernels (custom ops, recomputed like any glue op).

Recompute runs the same ops on the same inputs, so losses and gradients equal those without it (bitwise on
CPU). It applies only where a backward can follow: training mode, grad enabled, no KV cache.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..errors import check_choice, check_min

POLICIES = ("none", "mhc", "full")

Stage = Callable[[torch.Tensor], torch.Tensor]

# Ops whose outputs `mhc` keeps: the branch's matmuls and attention (the glue's own matmul, x @ fn^T, is
# also an mm; its output is (B, T, 2n + k), a few numbers per token). Everything else is recomputed.
_KEPT_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def check_policy(policy: str, group: int | None, option: str = "activation_checkpointing") -> None:
    check_choice(option, policy, POLICIES)
    if group is not None:
        check_min(option.replace("activation_checkpointing", "recompute_group"), group, 1)


def paper_group(n: int, sublayers: int) -> int:
    """The paper's group size L_r = sqrt(n L / (n + 2)), rounded, at least 1: it balances the streams kept at
    group boundaries (n C per group) against the ones rebuilt inside one group during backward."""
    return max(1, round(math.sqrt(n * sublayers / (n + 2))))


def _glue_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _glue_context():
    return create_selective_checkpoint_contexts(_glue_policy)


def _chain(stages: list[Stage], streams: torch.Tensor) -> torch.Tensor:
    for stage in stages:
        streams = stage(streams)
    return streams


def run_stages(stages: list[Stage], streams: torch.Tensor, policy: str, group: int = 1) -> torch.Tensor:
    """The streams after every stage, under `policy` (`full`: one stage per checkpoint; `mhc`: `group`
    stages per selective checkpoint)."""
    if policy == "none":
        return _chain(stages, streams)
    if policy == "full":
        group = 1
    context = _glue_context if policy == "mhc" else None
    for start in range(0, len(stages), group):
        part = stages[start:start + group]
        kwargs = {"context_fn": context} if context else {}
        streams = checkpoint(functools.partial(_chain, part), streams, use_reentrant=False, **kwargs)
    return streams
