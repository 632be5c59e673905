"""Orthogonal mixing (Cayley-based mixers such as EΔ-MHC-Geo, arXiv 2605.06729): H_res = Q.

Q is the Cayley transform of a skew-symmetric n x n matrix A whose n(n-1)/2 upper-triangle entries
are the res logits of the token:

    Q = (I + A)^{-1} (I - A),   A = -A^T

Why this chart. A is skew, so I + A is always invertible (its eigenvalues are 1 + i*lambda, never 0)
and Q^T Q = I holds exactly for every logit value, with nothing to iterate or clamp; zero logits give
Q = I, the identity-leaning start with no extra bias. The image is every rotation without an
eigenvalue -1 (an open, dense part of SO(n)): reflections are excluded, which costs nothing for a
residual map that should start at I and move continuously.

Q Q^T = I makes every singular value 1: the forward and the backward gain are exactly 1 in the
spectral norm, every stream's energy is preserved, and entries may be negative (no row-sum
constraint), so the diagnostics bound the gain by the spectral norm, not by abs row sums.
"""

from __future__ import annotations

import dataclasses

import torch

from .base import GeneratedMixer, GeneratorOptions
from .registry import register
from .shc import cayley, cayley_flops


@dataclasses.dataclass
class CayleyOptions(GeneratorOptions):
    """No res_init: the res bias starts at 0, which is Q = I exactly (the Cayley transform of A = 0)."""


class CayleyMixer(GeneratedMixer):
    """The shared part of the Cayley variants: n(n-1)/2 logits per token, Q = cayley(A), any n >= 2."""

    @staticmethod
    def res_logits(n: int) -> int:
        return n * (n - 1) // 2

    def __init__(self, dim: int, n: int, layer_index: int, options: CayleyOptions):
        if n < 2:
            raise ValueError(f"residual.n={n}: {self.variant} mixes streams with an n x n rotation; allowed: n >= 2")
        super().__init__(dim, n, layer_index, options)
        self.reset_parameters()

    def res_base_init(self) -> torch.Tensor:
        return torch.zeros(self.num_res_logits)

    def rotation(self, res_logit: torch.Tensor) -> torch.Tensor:
        """Q (..., n, n) in float64 (see `cayley`); the caller rounds once to the logits' dtype."""
        return cayley(res_logit, self.n, dtype=torch.float64)


@register("orthogonal", CayleyOptions)
class OrthogonalMixer(CayleyMixer):
    signed = True  # entries can be negative: the spectral norm (exactly 1), not the row sums, bounds the gain

    @staticmethod
    def res_flops(n: int) -> int:
        return cayley_flops(n)

    def project(self, res_logit: torch.Tensor) -> torch.Tensor:
        return self.rotation(res_logit).transpose(-1, -2).to(res_logit.dtype)  # comb = H_res^T = Q^T
