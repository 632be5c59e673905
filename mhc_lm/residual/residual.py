"""The plain pre-norm residual, x + F(x), as a one-stream mixer (the baseline every variant is judged against)."""

from __future__ import annotations

import dataclasses

import torch

from .base import Mixer
from .registry import register


@dataclasses.dataclass
class ResidualOptions:
    pass


@register("residual", ResidualOptions)
class ResidualMixer(Mixer):
    def __init__(self, dim: int, n: int, layer_index: int, options: ResidualOptions):
        super().__init__()
        if n != 1:
            raise ValueError(f"residual.n={n}: the plain residual has a single stream; allowed: 1")
        self.n = 1

    def reset_parameters(self) -> None:
        pass

    def forward(self, streams, branch):
        return streams + branch(streams[..., 0, :]).unsqueeze(-2)

    def flops_per_token(self) -> int:
        return 0  # x + F(x): one add per channel, left out as 6N leaves out the plain residual

    def mixing(self, streams):
        ones = streams.new_ones(*streams.shape[:-1], dtype=torch.float32)  # (B, T, 1)
        return ones, ones, ones.unsqueeze(-1)
