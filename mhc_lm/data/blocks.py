"""Packed blocks of a finite token stream: the map-style loader (bundled, local, shards) and validation batches.

A token stream is anything with `len()` and contiguous slicing that returns a numpy array: an
in-memory or memory-mapped array, or `ShardedTokens` (many memory-mapped shards read as one). Block i is
tokens[i*L : i*L + L + 1]: blocks overlap by one token, so every token after the first is a target
exactly once.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .state import STATE_VERSION, check_state


def num_blocks(tokens, seq_len: int) -> int:
    return (len(tokens) - 1) // seq_len


def gather_blocks(tokens, indices, seq_len: int) -> torch.Tensor:
    """Blocks i -> tokens[i*L : i*L + L + 1], stacked as int64 (len(indices), L + 1)."""
    rows = [np.asarray(tokens[i * seq_len: i * seq_len + seq_len + 1], dtype=np.int64) for i in indices]
    return torch.from_numpy(np.stack(rows))


class BlockLoader:
    """Shuffled micro-batches of packed blocks, sharded across ranks; resumes exactly.

    Epoch e visits the blocks in the order of randperm(seed + e) (in order with shuffle=False). Each
    step takes batch_size * world_size consecutive blocks of that order; rank r takes its slice. The
    tail that does not fill a whole step is dropped for this epoch (it is in a different place next
    epoch), so within an epoch no block is seen twice on any rank. State (see `state.py`): the epoch
    and the offset into its order, the same on every rank and independent of the world size.
    """

    def __init__(self, tokens, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.blocks = num_blocks(tokens, seq_len)
        self.per_step = batch_size * world_size
        if self.blocks < self.per_step:
            raise ConfigError(f"trainer.batch_size={batch_size}: the train split has {self.blocks} blocks of "
                              f"{seq_len} tokens, fewer than one step of {self.per_step}; "
                              f"allowed: <= {self.blocks // world_size}")
        self.steps_per_epoch = self.blocks // self.per_step
        self.epoch, self.offset = 0, 0
        self._order_epoch, self._order = -1, None

    def _order_for(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = torch.randperm(self.blocks, generator=torch.Generator().manual_seed(self.seed + epoch))
            else:
                self._order = torch.arange(self.blocks)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> torch.Tensor:
        """The next (batch_size, seq_len + 1) int64 micro-batch of this rank."""
        if self.offset + self.per_step > self.blocks:
            self.epoch, self.offset = self.epoch + 1, 0
        start = self.offset + self.rank * self.batch_size
        indices = self._order_for(self.epoch)[start: start + self.batch_size].tolist()
        self.offset += self.per_step
        return gather_blocks(self.tokens, indices, self.seq_len)

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "kind": "blocks", "epoch": self.epoch, "offset": self.offset,
                "seed": self.seed, "shuffle": self.shuffle, "blocks": self.blocks, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "world_size": self.world_size, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        check_state(state, "blocks", {"seed": self.seed, "shuffle": self.shuffle, "blocks": self.blocks,
                                      "seq_len": self.seq_len})
        self.epoch, self.offset = state["epoch"], state["offset"]


def eval_batches(tokens, seq_len: int, batch_size: int, max_batches: int, rank: int = 0, world_size: int = 1):
    """The fixed validation micro-batches of this rank: the first blocks of the split, in order."""
    total = min(num_blocks(tokens, seq_len), max_batches * batch_size * world_size)
    mine = list(range(rank, total, world_size))
    for start in range(0, len(mine), batch_size):
        yield gather_blocks(tokens, mine[start: start + batch_size], seq_len)
