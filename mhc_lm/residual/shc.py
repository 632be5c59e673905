"""sHC (arXiv 2603.20896): spectral-sphere-constrained hyper-connections.

    H_res = J/n + Uz (U diag(s) V^T) Uz^T

Uz is the n x (n-1) Helmert basis of the complement of the all-ones vector; U and V are orthogonal,
the Cayley transforms (I + A)^{-1} (I - A) of skew-symmetric A and B; s = tanh(logits) in (-1, 1).
Rows and columns sum to exactly 1 (Uz^T 1 = 0), the singular values are {1, |s_i|}, so the spectral
norm is exactly 1 — and entries may be negative, which the Birkhoff variants forbid. The res block
holds [A (m(m-1)/2) | B (m(m-1)/2) | s (m)] with m = n - 1: (n-1)^2 logits.
"""

from __future__ import annotations

import dataclasses

import torch

from .base import GeneratedMixer, ResOptions
from .registry import register


def helmert_basis(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(n, n-1) orthonormal columns, each orthogonal to the all-ones vector.

    Column j is (1, ..., 1, -(j+1), 0, ..., 0) / sqrt((j+1)(j+2)) with j+1 ones. Built from tensor
    ops in the caller's dtype (no buffer: exact in fp64, and nothing to restore after loading).
    """
    i = torch.arange(n, dtype=dtype, device=device).unsqueeze(1)  # (n, 1)
    j = torch.arange(n - 1, dtype=dtype, device=device).unsqueeze(0)  # (1, n-1)
    norm = torch.sqrt((j + 1) * (j + 2))
    return torch.where(i <= j, 1 / norm, torch.where(i == j + 1, -(j + 1) / norm, torch.zeros_like(norm)))


def cayley(params: torch.Tensor, m: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Orthogonal (..., m, m) = (I + A)^{-1} (I - A) from the m(m-1)/2 upper-triangle entries of a
    skew-symmetric A; returned in `dtype` (default: the dtype of `params`).

    Solved in fp64: with entries of A near 50 an fp32 solve leaves 1e-5 of orthogonality error,
    which would show as a spectral norm above 1. The matrices are at most 8 x 8, so this is cheap.
    """
    rows, cols = torch.triu_indices(m, m, offset=1)
    upper = params.new_zeros(*params.shape[:-1], m, m, dtype=torch.float64)
    upper[..., rows, cols] = params.double()
    skew = upper - upper.transpose(-1, -2)
    eye = torch.eye(m, dtype=torch.float64, device=params.device)
    return torch.linalg.solve(eye + skew, eye - skew).to(dtype or params.dtype)


def cayley_flops(m: int) -> int:
    """FLOPs of one m x m `cayley`: build I +- A, the LU of I + A and the solve for m right-hand sides."""
    return 2 * m * m + (8 * m ** 3) // 3


@dataclasses.dataclass
class ShcOptions(ResOptions):
    """res_init identity: U = V = I and s logits = res_init_strength (s = tanh(4) ≈ 1, H_res ≈ I);
    uniform: s logits 0 (H_res = J/n)."""


@register("shc", ShcOptions)
class ShcMixer(GeneratedMixer):
    signed = True  # entries can be negative: the spectral norm, not the row sums, bounds the gain

    @staticmethod
    def res_logits(n: int) -> int:
        return (n - 1) ** 2

    @staticmethod
    def res_flops(n: int) -> int:
        m = n - 1
        return 2 * cayley_flops(m) + 5 * m + m * m + 2 * m ** 3 + 2 * n * m * m + 2 * n * n * m + n * n

    def __init__(self, dim: int, n: int, layer_index: int, options: ShcOptions):
        if n < 2:
            raise ValueError(f"residual.n={n}: shc needs a non-trivial complement of the ones vector; allowed: n >= 2")
        super().__init__(dim, n, layer_index, options)
        self.reset_parameters()

    def res_base_init(self) -> torch.Tensor:
        m = self.n - 1
        base = torch.zeros(self.num_res_logits)
        if self.options.res_init == "identity":
            base[-m:] = self.options.res_init_strength
        return base

    def project(self, res_logit: torch.Tensor) -> torch.Tensor:
        n, m = self.n, self.n - 1
        skew_size = m * (m - 1) // 2
        a, b, s = res_logit.split([skew_size, skew_size, m], dim=-1)
        core = cayley(a, m) * torch.tanh(s).unsqueeze(-2) @ cayley(b, m).transpose(-1, -2)  # U diag(s) V^T
        basis = helmert_basis(n, res_logit.dtype, res_logit.device)
        h_res = basis @ core @ basis.T + 1.0 / n
        return h_res.transpose(-1, -2)
