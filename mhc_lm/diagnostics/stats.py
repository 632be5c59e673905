"""The math of the diagnostics on H_res and the streams (docs/diagnostics.md says what each number means).

Every function takes per-token tensors, (N, n, n) matrices or (N, n, C) streams with N tokens, and
computes in float64. Nothing here knows a mixer or a model.
"""

from __future__ import annotations

from typing import Any

import torch

LOGIT_RANGE_LIMIT = 15.0  # a res_logit range above this risks Sinkhorn non-convergence
NEGATIVE_ENTRY = -1e-6  # entries below this are negative by design, not by rounding (e.g. "what is left" of a row)



# The math on H_res (per token, shapes (N, n, n) with N tokens); everything in float64.


def amax_gains(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward, backward) Amax gain of (..., n, n) matrices: the max abs row sum and the max abs column sum."""
    a = h.abs()
    return a.sum(-1).amax(-1), a.sum(-2).amax(-1)


def composites(h_res: list[torch.Tensor]) -> list[torch.Tensor]:
    """The maps from each sublayer to the output: out[l] = H_res[L-1] @ ... @ H_res[l] (per token)."""
    out: list[torch.Tensor] = []
    acc = None
    for h in reversed(h_res):
        acc = h if acc is None else acc @ h
        out.append(acc)
    return out[::-1]


def effective_rank(singular_values: torch.Tensor) -> torch.Tensor:
    """exp(entropy of the normalized singular values) over the last dimension (Roy & Vetterli, 2007)."""
    p = singular_values / singular_values.sum(-1, keepdim=True).clamp_min(1e-300)
    return torch.exp(-torch.special.xlogy(p, p).sum(-1))


def row_entropy(h: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of |H| normalized to sum 1: (..., n, n) -> (..., n). log n is uniform."""
    a = h.abs()
    p = a / a.sum(-1, keepdim=True).clamp_min(1e-300)
    return -torch.special.xlogy(p, p).sum(-1)


def _mean_max(prefix: str, values: torch.Tensor) -> dict[str, float]:
    return {f"{prefix}_mean": values.mean().item(), f"{prefix}_max": values.max().item()}


def h_res_stats(h: torch.Tensor) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Statistics of one sublayer's H_res, (N, n, n) float64 per token; and the per-token values to histogram."""
    n = h.shape[-1]
    fwd, bwd = amax_gains(h)
    sv = torch.linalg.svdvals(h)  # (N, n), descending
    mean_matrix = h.mean(0)
    col_sums, row_sums = h.sum(-2), h.sum(-1)
    abs_diag = h.diagonal(dim1=-2, dim2=-1).abs().sum(-1)
    stats = {
        **_mean_max("gain_fwd", fwd), **_mean_max("gain_bwd", bwd), **_mean_max("spectral_norm", sv[:, 0]),
        "sigma_min_min": sv[:, -1].min().item(),
        "h_res_mean": mean_matrix.tolist(),
        "svals_mean_matrix": torch.linalg.svdvals(mean_matrix).tolist(),
        "row_sum_min": row_sums.min().item(), "row_sum_max": row_sums.max().item(),
        "col_sum_min": col_sums.min().item(), "col_sum_max": col_sums.max().item(),
        # A column sum <= 0 has no logarithm: it counts as 1e-12 (|log| = 27.6), far past any healthy value.
        "log_col_sum_absmax": col_sums.clamp_min(1e-12).log().abs().max().item(),
        "identity_dist_mean": (h - torch.eye(n, dtype=h.dtype)).norm(dim=(-2, -1)).mean().item(),
        "diag_mass_mean": (abs_diag / h.abs().sum((-2, -1)).clamp_min(1e-300)).mean().item(),
        "row_entropy_mean": row_entropy(h).mean().item(),
        "min_entry": h.min().item(),
    }
    if n > 1:
        stats["sigma2_mean"] = sv[:, 1].mean().item()
    return stats, {"h_res": h.flatten(), "spectral_norm": sv[:, 0]}


def composite_stats(c: torch.Tensor) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Gains and spectral norm of the composite map from a sublayer to the output, (N, n, n) per token;
    and the per-token values to histogram."""
    fwd, bwd = amax_gains(c)
    stats = {**_mean_max("comp_gain_fwd", fwd), **_mean_max("comp_gain_bwd", bwd),
             **_mean_max("comp_spectral_norm", torch.linalg.svdvals(c)[:, 0])}
    return stats, {"comp_gain_fwd": fwd}


def stream_stats(streams: torch.Tensor) -> dict[str, Any]:
    """Per-stream RMS, pairwise cosine similarity and effective rank of the n streams, (N, n, C)."""
    x = streams.float()
    n, width = x.shape[-2:]
    gram = (x @ x.transpose(-1, -2)).double()  # (N, n, n): one pass over the streams serves everything
    squares = gram.diagonal(dim1=-2, dim2=-1)  # (N, n) squared norms of the streams
    norms = squares.clamp_min(1e-300).sqrt()
    cos = gram / (norms.unsqueeze(-1) * norms.unsqueeze(-2))
    singular = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()  # singular values of the (n, C) stream matrix
    stats = {
        "stream_rms": (squares / width).sqrt().mean(0).tolist(),
        "stream_cos": cos.mean(0).tolist(),
        "stream_eff_rank_mean": effective_rank(singular).mean().item(),
    }
    if n > 1:
        off_diagonal = ~torch.eye(n, dtype=torch.bool)
        stats["stream_cos_offdiag_mean"] = cos[:, off_diagonal].mean().item()
    return stats


def range_stats(prefix: str, values: torch.Tensor) -> dict[str, float]:
    return {f"{prefix}_mean": values.mean().item(), f"{prefix}_min": values.min().item(),
            f"{prefix}_max": values.max().item()}


def logit_stats(res_logit: torch.Tensor) -> dict[str, float]:
    """Per-token range (max - min) of the Sinkhorn logits (N, k) and the fraction of tokens above the limit."""
    spread = res_logit.amax(-1) - res_logit.amin(-1)
    return {**_mean_max("res_logit_range", spread),
            "res_logit_frac_above_15": (spread > LOGIT_RANGE_LIMIT).double().mean().item()}


