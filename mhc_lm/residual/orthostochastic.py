"""Orthostochastic mixing (go-mHC, arXiv 2604.02309): H_res = Q ∘ Q, the entrywise square of an orthogonal Q.

Q is the Cayley rotation of `orthogonal.py` (n(n-1)/2 logits per token, Q = I at zero logits). Each row
and each column of an orthogonal matrix is a unit vector, so the squares of its entries are >= 0 and
sum to 1 along every row and every column: Q ∘ Q is exactly doubly stochastic, for any n >= 2 and any
logits, with no iteration. The set it reaches (the orthostochastic matrices) is a proper part of the
Birkhoff polytope for n >= 3 (e.g. the centre J/n is in it only where an n x n Hadamard-like Q
exists), but it contains I and every permutation-like neighbourhood the Cayley chart reaches.

A first-order caveat, stated where it bites: at Q = I the map A -> Q ∘ Q has zero derivative (an
off-diagonal entry of Q is linear in A, its square quadratic), so a res bias that sits exactly at 0
gets no gradient from H_res. The dynamic part (`fn`, `fn_init_std` > 0) moves the per-token logits
off 0 from the first step, and the gradient grows with them.
"""

from __future__ import annotations

import torch

from .orthogonal import CayleyMixer, CayleyOptions
from .registry import register
from .shc import cayley_flops


@register("orthostochastic", CayleyOptions)
class OrthostochasticMixer(CayleyMixer):
    @staticmethod
    def res_flops(n: int) -> int:
        return cayley_flops(n) + n * n  # the rotation, then one multiply per entry

    def project(self, res_logit: torch.Tensor) -> torch.Tensor:
        q = self.rotation(res_logit)
        return q.square().transpose(-1, -2).to(res_logit.dtype)  # squared in float64, rounded once
