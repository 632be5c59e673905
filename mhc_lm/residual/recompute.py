"""Activation recompute for the residual streams: `mhc`, the glue recompute of the mHC paper (section 4.3),
and `full`, block checkpointing.

A model runs its residual path as a list of stages (its blocks), each a function streams (B, T, n, C) ->
streams, and calls each sublayer's branch F (its layers after the norm) through `run_branch`:

* `none`: the stages one after another; autograd keeps everything it needs.
* `full`: each stage (a block) under torch's non-reentrant checkpoint: only its input streams stay alive,
  and the whole block runs again in backward.
* `mhc`: the stages in groups (L_r sublayers, as whole blocks), each under torch's non-reentrant checkpoint.
  Only the streams entering a group stay alive, plus what the branches keep: a branch runs under the
  saved-tensor hooks in force outside the checkpoint, so autograd keeps its activations as without
  recompute, and its output is kept too. The glue (the coefficients with their Sinkhorn, the collapse to
  the branch input, the branch's norm, the stream write, all n streams wide) is saved by the checkpoint,
  i.e. recomputed: the backward reruns the group with each branch replaced by its kept output, so only the
  glue runs again. Nothing here knows a variant, and the Triton kernels (custom ops) are glue like any op.
  Traced by torch.compile, the group is a selective checkpoint instead (`_selective_checkpoint`: keep the
  matmul and attention outputs, recompute the rest; the compiler fuses the recomputed element-wise ops).

Recompute runs the same ops on the same inputs, so losses and gradients equal those without it (bitwise on
CPU). It applies only where a backward can follow: training mode, grad enabled, no KV cache.
"""

from __future__ import annotations

import functools
import math
from contextvars import ContextVar
from typing import Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..errors import check_choice, check_min

POLICIES = ("none", "mhc", "full")

Stage = Callable[[torch.Tensor], torch.Tensor]


def check_policy(policy: str, group: int | None, option: str = "activation_checkpointing") -> None:
    check_choice(option, policy, POLICIES)
    if group is not None:
        check_min(option.replace("activation_checkpointing", "recompute_group"), group, 1)


def paper_group(n: int, sublayers: int) -> int:
    """The paper's group size L_r = sqrt(n L / (n + 2)), rounded, at least 1: it balances the streams kept at
    group boundaries (n C per group) against the ones rebuilt inside one group during backward."""
    return max(1, round(math.sqrt(n * sublayers / (n + 2))))


def _chain(stages: list[Stage], streams: torch.Tensor) -> torch.Tensor:
    for stage in stages:
        streams = stage(streams)
    return streams


_GROUP: ContextVar["_Group | None"] = ContextVar("mhc_recompute_group", default=None)


def run_branch(branch: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """branch(*args), a sublayer's branch F. Inside an `mhc` group autograd keeps its activations as without
    recompute, and the group's recompute replays its output instead of running it again."""
    group = None if torch.compiler.is_compiling() else _GROUP.get()  # traced: the selective rule, no group
    return branch(*args) if group is None else group.branch(branch, *args)


def _detach(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach()  # what autograd keeps without hooks; detached so the graph holds no cycle


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _outer_hooks():
    """The saved-tensor hooks in force here (a caller's offloading, say), for the branches to save under
    inside the checkpoint. torch has no public reader: without its private one (a future torch), the
    branches save plainly, which changes nothing unless the caller installed hooks."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


class _Group:
    """One `mhc` group's stages, the function torch's checkpoint runs. Its first call is the forward: each
    branch runs under the saved-tensor hooks in force outside the checkpoint (none: plain saving), and its
    output is kept. Later calls are the checkpoint's recomputes: each branch returns its kept output, so
    only the glue runs again."""

    def __init__(self, stages: list[Stage]):
        self.stages, self.outputs, self.replay, self.calls = stages, [], False, 0
        self.hooks = _outer_hooks() or (_detach, _same)

    def __call__(self, streams: torch.Tensor) -> torch.Tensor:
        self.calls, token = 0, _GROUP.set(self)
        try:
            streams = _chain(self.stages, streams)
        finally:
            _GROUP.reset(token)
        self.replay = True
        return streams

    def branch(self, branch, *args) -> torch.Tensor:
        if self.replay:  # a fresh leaf with the output's values: the glue saves what it saved in the forward
            out, requires_grad = self.outputs[self.calls]
            self.calls += 1
            return out.detach().requires_grad_(requires_grad)
        with torch.autograd.graph.saved_tensors_hooks(*self.hooks):
            out = branch(*args)
        self.outputs.append((out.detach(), out.requires_grad))  # detached: the group holds no graph
        return out


def _glue_checkpoint(stages: list[Stage], streams: torch.Tensor) -> torch.Tensor:
    """One `mhc` group: the branches kept, the glue recomputed; traced by torch.compile, the selective rule."""
    if torch.compiler.is_compiling():
        return _selective_checkpoint(stages, streams)
    return checkpoint(_Group(stages), streams, use_reentrant=False)


# Ops whose outputs the selective rule keeps: the branch's matmuls and attention (the glue's own matmul,
# x @ fn^T, is also an mm; its output is (B, T, 2n + k), a few numbers per token). Everything else is recomputed.
_KEPT_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def _selective_checkpoint(stages: list[Stage], streams: torch.Tensor) -> torch.Tensor:
    """A group under torch's selective checkpoint: only matmul and attention outputs kept (`_KEPT_OPS`)."""
    return checkpoint(functools.partial(_chain, stages), streams, use_reentrant=False,
                      context_fn=_selective_context)


def _block_checkpoint(stages: list[Stage], streams: torch.Tensor) -> torch.Tensor:
    return checkpoint(functools.partial(_chain, stages), streams, use_reentrant=False)


def run_stages(stages: list[Stage], streams: torch.Tensor, policy: str, group: int = 1) -> torch.Tensor:
    """The streams after every stage, under `policy` (`full`: one stage per checkpoint; `mhc`: `group`
    stages per checkpoint)."""
    if policy == "none":
        return _chain(stages, streams)
    group, run_group = (1, _block_checkpoint) if policy == "full" else (group, _glue_checkpoint)
    for start in range(0, len(stages), group):
        streams = run_group(stages[start:start + group], streams)
    return streams
