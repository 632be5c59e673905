"""Identity-HC: H_res = I with dynamic H_pre and H_post (the cheapest ablation of the family).

The streams are never mixed; each sublayer reads a learned combination of them and writes back with
learned weights. No res logits, no projection, no stream matmul.
"""

from __future__ import annotations

import dataclasses

import torch

from .base import GeneratedMixer, GeneratorOptions, expand_output, stream_ops, write_streams
from .registry import register


@dataclasses.dataclass
class IhcOptions(GeneratorOptions):
    pass


@register("ihc", IhcOptions)
class IhcMixer(GeneratedMixer):
    @staticmethod
    def res_logits(n: int) -> int:
        return 0

    @staticmethod
    def res_flops(n: int) -> int:
        return 0

    def __init__(self, dim: int, n: int, layer_index: int, options: IhcOptions):
        super().__init__(dim, n, layer_index, options)
        self.reset_parameters()

    def res_base_init(self) -> torch.Tensor:
        return torch.zeros(0)

    def project(self, res_logit: torch.Tensor) -> torch.Tensor:
        """comb = I for every token, from any (..., k) tensor of the tokens' shape."""
        eye = torch.eye(self.n, dtype=res_logit.dtype, device=res_logit.device)
        return eye.expand(*res_logit.shape[:-1], self.n, self.n)

    def forward(self, streams, branch):
        h_pre, h_post, _ = self.generate(streams)
        read, write = stream_ops(self.kernel, streams)
        out = branch(read(h_pre, streams))
        if write is write_streams:  # the PyTorch path: H_res = I needs no stream matmul
            return streams + expand_output(h_post, out, streams)
        return write(h_post, out, self.project(h_post), streams)  # the fused write, comb = I (a constant)
