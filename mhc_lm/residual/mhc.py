"""mHC: manifold-constrained hyper-connections with a Sinkhorn projection (DeepSeek-V4 form).

comb = Sinkhorn(res_logit) with res_logit (n, n) in the comb layout; H_res = comb^T. Rows of H_res are
exact (to eps), columns approximate: the diagnostics report the column error rather than hide it.

On the Triton path (`residual.kernel`, mhc_lm.kernels) the generator's epilogue (scales, biases, sigmoids
and the Sinkhorn) is one fused kernel after the matmul; the PyTorch path computes the same function.
"""

from __future__ import annotations

import dataclasses

import torch

from .base import GeneratedMixer, ResOptions
from .dispatch import sinkhorn_ops, use_triton
from .registry import register
from .sinkhorn import sinkhorn


@dataclasses.dataclass
class MhcOptions(ResOptions):
    """res_init identity: base_res = d*I (exactly doubly stochastic at step 0), d = res_init_strength;
    uniform: base_res = 0 (H_res = J/n)."""

    sinkhorn_iters: int = 20
    sinkhorn_eps: float = 1e-6


@register("mhc", MhcOptions)
class MhcMixer(GeneratedMixer):
    @staticmethod
    def res_logits(n: int) -> int:
        return n * n

    @staticmethod
    def res_flops(n: int, iters: int = 20) -> int:
        # softmax (exp, sum, divide) + eps, then 2*iters - 1 normalizations of n^2 adds and n^2 divides.
        return 4 * n * n + (2 * iters - 1) * 2 * n * n

    def __init__(self, dim: int, n: int, layer_index: int, options: MhcOptions):
        if options.sinkhorn_iters < 1:
            raise ValueError(f"residual.sinkhorn_iters={options.sinkhorn_iters}: allowed: an integer >= 1")
        super().__init__(dim, n, layer_index, options)
        self.reset_parameters()

    def res_base_init(self) -> torch.Tensor:
        """d*I: softmax(d*I + const) is already exactly doubly stochastic, so Sinkhorn has no error at step 0."""
        if self.options.res_init == "identity":
            return self.options.res_init_strength * torch.eye(self.n)
        return torch.zeros(self.n, self.n)

    def project(self, res_logit):
        res_logit = res_logit.unflatten(-1, (self.n, self.n))  # (B, T, n, n), comb layout
        return sinkhorn(res_logit, self.options.sinkhorn_iters, self.options.sinkhorn_eps, self.kernel)

    def projection_flops(self) -> int:
        return self.res_flops(self.n, self.options.sinkhorn_iters)

    def sinkhorn_logits(self, streams):
        return self.generate(streams)[2]

    def mixing(self, streams):
        if not use_triton(self.kernel, streams, self.n):
            return super().mixing(streams)
        _, mhc_coefficients = sinkhorn_ops()
        opt = self.options
        mixes, r = self.raw_mixes(streams)
        return mhc_coefficients(mixes, r, self.scale.float(), self.base.float(), self.n, opt.sinkhorn_iters,
                                opt.sinkhorn_eps, opt.hc_eps)
