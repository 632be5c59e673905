"""HC: Hyper-Connections (arXiv 2409.19606), static + dynamic, with an unconstrained H_res.

With xb = norm(x) per stream (B, T, n, C):

    A_m = s_a * tanh(xb W_m) + A_m0       (n,)      H_pre  = A_m^T
    A_r = s_a * tanh(xb W_r) + A_r0       (n, n)    H_res  = A_r^T   (so A_r is exactly `comb`)
    B   = s_b * tanh(xb W_b)^T + B0       (n,)      H_post = B

Init: W = 0, A_m0 = e_(l mod n), A_r0 = I, B0 = 1, s_a = s_b = 0.01. At init every stream carries the
same vector and each sublayer adds F(x) to all of them: the network equals the pre-norm residual model.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .base import Mixer, rms
from .registry import register


@dataclasses.dataclass
class HcOptions:
    dynamic: bool = True  # False: static HC (the A_0, B_0 only)
    scale_init: float = 0.01  # s_a and s_b
    rms_eps: float = 1e-6


@register("hc", HcOptions)
class HcMixer(Mixer):
    def __init__(self, dim: int, n: int, layer_index: int, options: HcOptions):
        super().__init__()
        self.n, self.layer_index, self.options = n, layer_index, options
        self.static_pre = nn.Parameter(torch.empty(n))  # A_m0
        self.static_res = nn.Parameter(torch.empty(n, n))  # A_r0, comb layout
        self.static_post = nn.Parameter(torch.empty(n))  # B0
        if options.dynamic:
            self.dynamic_pre = nn.Parameter(torch.empty(dim))  # W_m
            self.dynamic_res = nn.Parameter(torch.empty(dim, n))  # W_r
            self.dynamic_post = nn.Parameter(torch.empty(dim))  # W_b
            self.alpha = nn.Parameter(torch.empty(1))  # s_a
            self.beta = nn.Parameter(torch.empty(1))  # s_b
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.static_pre.zero_()
        self.static_pre[self.layer_index % self.n] = 1.0
        self.static_res.copy_(torch.eye(self.n))
        self.static_post.fill_(1.0)
        if self.options.dynamic:
            for weight in (self.dynamic_pre, self.dynamic_res, self.dynamic_post):
                weight.zero_()
            self.alpha.fill_(self.options.scale_init)
            self.beta.fill_(self.options.scale_init)

    def mixing(self, streams):
        lead = streams.shape[:-2]
        pre = self.static_pre.float().expand(*lead, self.n)
        comb = self.static_res.float().expand(*lead, self.n, self.n)
        post = self.static_post.float().expand(*lead, self.n)
        if self.options.dynamic:
            xb = rms(streams, self.options.rms_eps)  # (B, T, n, C), each stream normalized alone
            pre = pre + self.alpha * torch.tanh(xb @ self.dynamic_pre.float())
            comb = comb + self.alpha * torch.tanh(xb @ self.dynamic_res.float())  # row j = input stream j
            post = post + self.beta * torch.tanh(xb @ self.dynamic_post.float())
        return pre, post, comb

    def coefficient_flops(self) -> int:
        """Dynamic HC: per stream, the normalized stream times W_m, W_r, W_b, (n + 2) outputs of C inputs."""
        return 2 * self.n * (self.n + 2) * self.dim if self.options.dynamic else 0

    def gate_scales(self) -> dict[str, float]:
        """alpha gates pre and res, beta gates post (static HC has no gates)."""
        if not self.options.dynamic:
            return {}
        alpha, beta = self.alpha.item(), self.beta.item()
        return {"scale_pre": alpha, "scale_post": beta, "scale_res": alpha}
