"""mHC-lite (arXiv 2601.05732): H_res is a convex combination of all n! permutation matrices.

H_res = sum_k a_k P_k with a = softmax of n! res logits. Exactly doubly stochastic (Birkhoff-von
Neumann), no iteration, but the res block grows as n!: refused for n > 6.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch

from .base import GeneratedMixer, ResOptions
from .registry import register

MAX_STREAMS = 6


def permutation_matrices(n: int) -> torch.Tensor:
    """All n! permutation matrices (n!, n, n) in lexicographic order (index 0 is the identity).

    P_k[i, perm_k[i]] = 1: row i of H_res reads stream perm_k[i].
    """
    perms = torch.tensor(list(itertools.permutations(range(n))))  # (n!, n)
    return torch.nn.functional.one_hot(perms, n).float()


@dataclasses.dataclass
class MhcLiteOptions(ResOptions):
    """res_init identity: identity permutation logit 0, every other -res_init_strength; uniform: all 0."""

    res_init_strength: float = 8.0


@register("mhc_lite", MhcLiteOptions)
class MhcLiteMixer(GeneratedMixer):
    @staticmethod
    def res_logits(n: int) -> int:
        return math.factorial(n)

    @staticmethod
    def res_flops(n: int) -> int:
        k = math.factorial(n)
        return 3 * k + 2 * k * n * n  # softmax, then the weighted sum of k matrices

    def __init__(self, dim: int, n: int, layer_index: int, options: MhcLiteOptions):
        if n > MAX_STREAMS:
            raise ValueError(f"residual.n={n}: mhc_lite mixes all n! permutations ({math.factorial(n):,} logits "
                             f"per token); allowed: n <= {MAX_STREAMS}")
        super().__init__(dim, n, layer_index, options)
        # A constant, but a persistent buffer: it follows .to(device) and survives loading a checkpoint
        # onto the meta device, where a non-persistent buffer would come back uninitialized.
        self.register_buffer("permutations", permutation_matrices(n).flatten(1))  # (n!, n*n)
        self.reset_parameters()

    def res_base_init(self) -> torch.Tensor:
        base = torch.zeros(self.num_res_logits)
        if self.options.res_init == "identity":
            base[1:] = -self.options.res_init_strength
        return base

    def project(self, res_logit: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(res_logit, dim=-1)  # (..., n!)
        h_res = (weights @ self.permutations.to(weights.dtype)).unflatten(-1, (self.n, self.n))
        return h_res.transpose(-1, -2)  # comb = H_res^T
