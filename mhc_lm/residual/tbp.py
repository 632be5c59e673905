"""TBP-mHC (arXiv 2605.21724): transportation-polytope charts of the doubly stochastic matrices.

`tbp` fills H_res entry by entry (docs/residual.md). Start with row masses r_i = 1 and column masses
c_j = 1; for i, j < n - 1 in row-major order

    L = max(0, r_i - sum_{k>j} c_k, c_j - sum_{k>i} r_k),   U = min(r_i, c_j)
    X[i, j] = L + (U - L) * sigmoid(t_ij),   r_i -= X[i, j],   c_j -= X[i, j]

and the last row and column take what is left. The bounds keep the rest feasible, so every row and
column sums to exactly 1, entries are >= 0, and the (n-1)^2 logits chart the whole polytope.
Zero logits give the centre-ish fill, not the identity; the identity-leaning init puts
+res_init_strength on the diagonal logits.

`rtbp` is the recursive form for n a power of 2, with the same (n-1)^2 logits and the same exactness.
For an n x n transportation problem with margins (r, c), split rows and columns in halves; one chart
fills the 2 x 2 block masses, four charts split each half's margins between the two blocks it meets
(an (n/2) x 2 and a 2 x (n/2) problem per side), and the four blocks recurse with those margins:
1 + 4 (n/2 - 1) + 4 (n/2 - 1)^2 = (n - 1)^2 logits, nesting depth log2(n) instead of one chain of
(n-1)^2 sequential entries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from .base import GeneratedMixer, ResOptions
from .registry import register


def transport_fill(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The p x q matrix with row sums `rows` (..., p), column sums `cols` (..., q) charted by
    `logits` (..., (p-1)*(q-1)) in row-major order. The margins must have equal totals."""
    p, q = rows.shape[-1], cols.shape[-1]
    t = logits.unflatten(-1, (p - 1, q - 1)) if p > 1 and q > 1 else None
    r = list(rows.unbind(-1))  # remaining row masses
    c = list(cols.unbind(-1))  # remaining column masses
    filled = [[None] * q for _ in range(p)]
    zero = torch.zeros_like(rows[..., 0])
    for i in range(p - 1):
        rows_below = rows[..., i + 1:].sum(-1)  # rows after i are still untouched
        for j in range(q - 1):
            cols_right = torch.stack(c[j + 1:], -1).sum(-1)
            lower = torch.maximum(torch.maximum(zero, r[i] - cols_right), c[j] - rows_below)
            upper = torch.minimum(r[i], c[j])
            x = lower + (upper - lower).clamp_min(0) * torch.sigmoid(t[..., i, j])
            filled[i][j] = x
            r[i], c[j] = (r[i] - x).clamp_min(0), (c[j] - x).clamp_min(0)
        filled[i][q - 1] = r[i]  # the last column takes the rest of the row
        c[q - 1] = (c[q - 1] - r[i]).clamp_min(0)
    filled[p - 1] = c  # the last row takes the rest of every column
    return torch.stack([torch.stack(row, -1) for row in filled], -2)


def transport_fill_flops(p: int, q: int) -> int:
    # per charted entry: the suffix sum, 3 max/min, the sigmoid (~4), 4 adds/multiplies, 2 subtractions
    return (p - 1) * (q - 1) * (q + 12) + 2 * (p + q)


def recursive_fill(logits: Iterator[torch.Tensor], rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rtbp: the n x n (n a power of 2) transportation matrix with margins (rows, cols); `logits`
    yields the charts' logit blocks in order of use."""
    n = rows.shape[-1]
    if n == 1:
        return rows.unsqueeze(-1)  # (..., 1, 1): the only entry is the (shared) margin
    m = n // 2
    top, bottom, left, right = rows[..., :m], rows[..., m:], cols[..., :m], cols[..., m:]
    block = transport_fill(next(logits), torch.stack([top.sum(-1), bottom.sum(-1)], -1),
                           torch.stack([left.sum(-1), right.sum(-1)], -1))  # (..., 2, 2) block masses
    top_split = transport_fill(next(logits), top, block[..., 0, :])  # (..., m, 2): each top row's left/right mass
    bottom_split = transport_fill(next(logits), bottom, block[..., 1, :])
    left_split = transport_fill(next(logits), block[..., :, 0], left)  # (..., 2, m): each left column's top/bottom
    right_split = transport_fill(next(logits), block[..., :, 1], right)
    quadrants = [
        [recursive_fill(logits, top_split[..., 0], left_split[..., 0, :]),
         recursive_fill(logits, top_split[..., 1], right_split[..., 0, :])],
        [recursive_fill(logits, bottom_split[..., 0], left_split[..., 1, :]),
         recursive_fill(logits, bottom_split[..., 1], right_split[..., 1, :])],
    ]
    return torch.cat([torch.cat(row, -1) for row in quadrants], -2)


def recursive_logit_sizes(n: int) -> list[int]:
    """Sizes of the logit blocks `recursive_fill` consumes, in order."""
    if n == 1:
        return []
    m = n // 2
    sizes = [1, m - 1, m - 1, m - 1, m - 1]
    for _ in range(4):
        sizes += recursive_logit_sizes(m)
    return sizes


def recursive_flops(n: int) -> int:
    if n == 1:
        return 0
    m = n // 2
    return transport_fill_flops(2, 2) + 4 * transport_fill_flops(m, 2) + 4 * recursive_flops(m) + 6 * m


@dataclasses.dataclass
class TbpOptions(ResOptions):
    """res_init identity: +res_init_strength on the diagonal logits (tbp) or on every logit (rtbp,
    where each chart's first entry is the diagonal block); uniform: all 0."""


@register("tbp", TbpOptions)
class TbpMixer(GeneratedMixer):
    @staticmethod
    def res_logits(n: int) -> int:
        return (n - 1) ** 2

    @staticmethod
    def res_flops(n: int) -> int:
        return transport_fill_flops(n, n)

    def __init__(self, dim: int, n: int, layer_index: int, options: TbpOptions):
        if n < 2:
            raise ValueError(f"residual.n={n}: tbp charts an n x n polytope; allowed: n >= 2")
        super().__init__(dim, n, layer_index, options)
        self.reset_parameters()

    def res_base_init(self) -> torch.Tensor:
        if self.options.res_init == "uniform":
            return torch.zeros(self.num_res_logits)
        return self.options.res_init_strength * torch.eye(self.n - 1)

    def project(self, res_logit: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(*res_logit.shape[:-1], self.n, dtype=res_logit.dtype, device=res_logit.device)
        return transport_fill(res_logit, ones, ones).transpose(-1, -2)  # the chart is H_res; comb = H_res^T


@register("rtbp", TbpOptions)
class RtbpMixer(GeneratedMixer):
    @staticmethod
    def res_logits(n: int) -> int:
        return (n - 1) ** 2

    @staticmethod
    def res_flops(n: int) -> int:
        return recursive_flops(n)

    def __init__(self, dim: int, n: int, layer_index: int, options: TbpOptions):
        if n < 2 or n & (n - 1):
            raise ValueError(f"residual.n={n}: rtbp halves the matrix recursively; allowed: 2, 4, 8, 16, ...")
        super().__init__(dim, n, layer_index, options)
        self.sizes = recursive_logit_sizes(n)
        self.reset_parameters()

    def res_base_init(self) -> torch.Tensor:
        strength = self.options.res_init_strength if self.options.res_init == "identity" else 0.0
        return torch.full((self.num_res_logits,), strength)

    def project(self, res_logit: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(*res_logit.shape[:-1], self.n, dtype=res_logit.dtype, device=res_logit.device)
        blocks = iter(res_logit.split(self.sizes, dim=-1))
        return recursive_fill(blocks, ones, ones).transpose(-1, -2)
