"""Gradient norms by group from FSDP2's sharded (DTensor) gradients, on CPU over gloo.

    torchrun --standalone --nproc_per_node 2 tests/grad_norms_worker.py OUT.json [POLICY]

Each rank computes the norms of a tiny mHC model's whole gradients (no sharding, no recompute), then
shards the model with `fully_shard` and computes them again from its local shards, with the activation
recompute POLICY (none | mhc | full; default none); rank 0 writes both.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh


def main(out: str, policy: str = "none") -> None:
    from torch.distributed.fsdp import fully_shard

    from mhc_lm.diagnostics import GradNorms
    from mhc_lm.model import MhcConfig, MhcForCausalLM

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = MhcForCausalLM(MhcConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     max_position_embeddings=16, residual={"name": "mhc", "n": 4}))
    batch = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    whole = GradNorms(model)
    model(batch, labels=batch).loss.backward()
    expected = whole()
    model.zero_grad(set_to_none=True)

    model.config.activation_checkpointing = policy
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = GradNorms(model)
    model(batch, labels=batch).loss.backward()
    found = sharded()
    if dist.get_rank() == 0:
        grad_type = type(next(model.parameters()).grad).__name__
        with open(out, "w") as f:
            json.dump({"whole": expected, "sharded": found, "grad_type": grad_type, "mode": sharded.sharded}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
