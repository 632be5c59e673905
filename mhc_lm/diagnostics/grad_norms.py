"""Gradient norms by parameter group (global, per block, per kind of parameter), every optimizer step."""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..optim import connection_parameter_names

BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")
CONNECTION_LEAVES = ("fn", "base", "scale")


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names by gradient-norm group: attention, mlp, embeddings, norms, connection (and its
    fn / base / scale / other parts), block.<i>. `global` holds every trainable parameter."""
    connection = connection_parameter_names(model)
    groups: dict[str, list[str]] = {"global": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        keys = ["global"]
        if name in connection:
            leaf = name.rsplit(".", 1)[-1]
            keys += ["connection", f"connection.{leaf if leaf in CONNECTION_LEAVES else 'other'}"]
        elif ".attn." in name:
            keys.append("attention")
        elif ".mlp." in name:
            keys.append("mlp")
        elif "embed" in name or "lm_head" in name:
            keys.append("embeddings")
        else:
            keys.append("norms")
        if block := BLOCK.search(name):
            keys.append(f"block.{block.group(1)}")
        for key in keys:
            groups.setdefault(key, []).append(name)
    return groups


class GradNorms:
    """L2 norms of the gradients by group (`parameter_groups`), as `grad_norm/<group>` scalars.

    One pass: torch._foreach_norm over all gradients, then a (groups x params) 0/1 matrix sums the
    squares, and one transfer brings the results to the host. Call after backward, before clipping;
    `loss_scale` undoes an fp16 loss scale.

    Where the gradients are sharded the squares are summed over this process's pieces and then over
    the processes, one all-reduce of a vector as long as the parameter list: `sharded="deepspeed"`
    (ZeRO 1/2: this rank's fragment of the reduced gradient; ZeRO-3: its partition), and FSDP2's
    DTensor parameters (their gradients' local shards) are recognised by type. Every rank must then
    call it.
    """

    def __init__(self, model: nn.Module, sharded: Optional[str] = None):
        if sharded not in (None, "deepspeed"):
            raise ValueError(f"sharded={sharded!r}: allowed: None, 'deepspeed'")
        groups = parameter_groups(model)
        named = dict(model.named_parameters())
        self.names = groups["global"]
        self.params = [named[n] for n in self.names]
        if sharded is None and any(hasattr(p, "to_local") for p in self.params):  # DTensor (FSDP2)
            sharded = "dtensor"
        self.sharded = sharded
        index = {n: i for i, n in enumerate(self.names)}
        self.keys = [f"grad_norm/{key}" for key in groups]
        self.membership = torch.zeros(len(groups), len(self.names))
        for row, members in enumerate(groups.values()):
            self.membership[row, [index[n] for n in members]] = 1.0

    def _local_grad(self, param: nn.Parameter) -> Optional[torch.Tensor]:
        """This process's piece of the gradient: whole (DDP, one process), a DTensor's local shard
        (FSDP2), or DeepSpeed's fragment (None where this rank holds none of the parameter)."""
        if self.sharded == "deepspeed":
            if hasattr(param, "ds_id"):  # ZeRO-3: the rank's partition of the fp32 gradient
                from deepspeed.utils import safe_get_local_grad

                return safe_get_local_grad(param)
            mapping = getattr(param, "_hp_mapping", None)  # ZeRO 1/2: the fragment this rank's optimizer owns
            return None if mapping is None else mapping.get_lp_grad_fragment(param._index_in_param_group)
        grad = param.grad
        return grad.to_local() if grad is not None and self.sharded == "dtensor" else grad

    @torch.no_grad()
    def __call__(self, loss_scale: float = 1.0) -> dict[str, float]:
        grads = [self._local_grad(p) for p in self.params]
        present = [i for i, g in enumerate(grads) if g is not None and g.numel()]
        if not present and self.sharded is None:
            return {}
        device = grads[present[0]].device if present else self.params[0].device
        squares = torch.zeros(len(self.params), device=device)
        if present:
            norms = torch._foreach_norm([grads[i] for i in present])
            squares[present] = torch.stack([x.float().to(device) for x in norms]).square()
        if self.sharded is not None:
            dist.all_reduce(squares)  # the pieces of each gradient are disjoint: squares add up
        if self.membership.device != squares.device:  # once: the matrix lives where the gradients are
            self.membership = self.membership.to(squares.device)
        totals = (self.membership @ squares).sqrt() / loss_scale
        return dict(zip(self.keys, totals.tolist()))


