"""Stream expansion and the final collapse of the n streams before the last norm (docs/residual.md, section 1)."""

from __future__ import annotations

import torch
from torch import nn

COLLAPSE_MODES = ("head", "sum", "mean")


def expand_streams(hidden: torch.Tensor, n: int) -> torch.Tensor:
    """Copy the token embedding into all n streams: (B, T, C) -> (B, T, n, C)."""
    return hidden.unsqueeze(-2).expand(*hidden.shape[:-1], n, hidden.shape[-1])


class HyperHead(nn.Module):
    """DeepSeek-V4's HyperHead: w = sigmoid(scale * (rms(flat) @ hc_fn^T) + hc_base) + eps, y = sum_j w_j x_j.

    Parameter names and layout follow `transformers`' DeepseekV4HyperHead (hc_fn, hc_base, hc_scale).
    """

    def __init__(self, dim: int, n: int, eps: float = 1e-6, rms_eps: float = 1e-6, scale_init: float = 0.01,
                 fn_init_std: float = 0.02):
        super().__init__()
        self.n, self.eps, self.rms_eps = n, eps, rms_eps
        self.scale_init, self.fn_init_std = scale_init, fn_init_std
        self.hc_fn = nn.Parameter(torch.empty(n, n * dim))
        self.hc_base = nn.Parameter(torch.empty(n))
        self.hc_scale = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.hc_fn, std=self.fn_init_std)
        self.hc_base.zero_()
        self.hc_scale.fill_(self.scale_init)

    def weights(self, streams: torch.Tensor) -> torch.Tensor:
        """The per-token collapse weights (B, T, n), fp32."""
        flat = streams.flatten(-2).float()  # (B, T, n*C)
        r = torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.rms_eps)
        mixes = torch.nn.functional.linear(flat, self.hc_fn.float()) * r
        return torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.eps

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        return (self.weights(streams).unsqueeze(-1) * streams).sum(dim=-2).to(streams.dtype)


class FixedCollapse(nn.Module):
    """Parameter-free collapse: the sum or the mean of the streams."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        return streams.sum(dim=-2) if self.mode == "sum" else streams.mean(dim=-2)


def make_collapse(mode: str, dim: int, n: int, eps: float = 1e-6) -> nn.Module:
    if mode not in COLLAPSE_MODES:
        raise ValueError(f"residual.collapse={mode!r}: allowed: {', '.join(COLLAPSE_MODES)}")
    if mode == "head" and n > 1:
        return HyperHead(dim, n, eps=eps)
    return FixedCollapse(mode if n > 1 else "sum")
