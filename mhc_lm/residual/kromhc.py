"""KromHC (arXiv 2601.21579): H_res = U_1 ⊗ ... ⊗ U_K with 2x2 doubly stochastic factors.

U_k = a_k I + (1 - a_k) S, S the 2x2 swap, (a_k, 1 - a_k) = softmax of two logits. n = 2^K. Exactly
doubly stochastic (a Kronecker product of doubly stochastic matrices is one), but a sub-family of
the Birkhoff polytope with only 2 * log2(n) logits. Every factor is symmetric, so H_res = comb.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .base import GeneratedMixer, ResOptions
from .registry import register


@dataclasses.dataclass
class KromHcOptions(ResOptions):
    """res_init identity: each factor's logits (d, 0), so a_k = sigmoid(d) with d = res_init_strength."""


def num_factors(n: int) -> int:
    return int(math.log2(n))


@register("kromhc", KromHcOptions)
class KromHcMixer(GeneratedMixer):
    @staticmethod
    def res_logits(n: int) -> int:
        return 2 * num_factors(n)

    @staticmethod
    def res_flops(n: int) -> int:
        k = num_factors(n)
        kron = sum((2 ** i) ** 2 * 4 for i in range(k))  # each product multiplies (2^i)^2 by 4 entries
        return 8 * k + kron

    def __init__(self, dim: int, n: int, layer_index: int, options: KromHcOptions):
        if n < 2 or n & (n - 1):
            raise ValueError(f"residual.n={n}: kromhc needs a power of 2; allowed: 2, 4, 8, 16, ...")
        super().__init__(dim, n, layer_index, options)
        self.reset_parameters()

    def res_base_init(self) -> torch.Tensor:
        factor = torch.tensor([self.options.res_init_strength if self.options.res_init == "identity" else 0.0, 0.0])
        return factor.repeat(num_factors(self.n))

    def project(self, res_logit: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(res_logit.unflatten(-1, (-1, 2)), dim=-1)[..., 0]  # (..., K)
        h_res = torch.ones_like(a[..., :1]).unsqueeze(-1)  # (..., 1, 1)
        for k in range(a.shape[-1]):
            ak = a[..., k, None, None]
            factor = torch.cat([torch.cat([ak, 1 - ak], -1), torch.cat([1 - ak, ak], -1)], -2)  # (..., 2, 2)
            m = h_res.shape[-1]
            # kron(h_res, factor)[(i, p), (j, q)] = h_res[i, j] * factor[p, q]
            h_res = (h_res[..., :, None, :, None] * factor[..., None, :, None, :]).reshape(*a.shape[:-1], 2 * m, 2 * m)
        return h_res  # symmetric: comb = H_res^T = H_res
