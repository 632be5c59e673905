"""The mixer interface and the pieces every hyper-connection variant shares.

A mixer wraps one sublayer F (one attention or one MLP). Given the residual streams x of shape
(B, T, n, C) and the branch F as a callable (B, T, C) -> (B, T, C), it returns

    x_next = H_res · x + H_post^T · F(H_pre · x)                            (docs/residual.md)

THE CONVENTION. Like DeepSeek-V4 and `transformers`, we store `comb = H_res^T` and apply
`comb^T @ x`. Row i of H_res (= column i of comb) is what new stream i reads, so row sums of H_res
are forward gains and column sums are backward gains. `apply_comb` below is the one function that
applies it; `Mixer.coefficients` returns H_res itself (paper orientation).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from .dispatch import glue_ops, use_triton

Branch = Callable[[torch.Tensor], torch.Tensor]


def apply_comb(comb: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """H_res · x with H_res = comb^T: out[..., i, :] = sum_j comb[..., j, i] * streams[..., j, :].

    comb: (B, T, n, n) in the storage layout; streams: (B, T, n, C).
    """
    return torch.matmul(comb.transpose(-1, -2).to(streams.dtype), streams)


def read_streams(h_pre: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """H_pre · x: the branch input, sum_j h_pre[j] * x[j]. h_pre (B, T, n), streams (B, T, n, C) -> (B, T, C)."""
    return (h_pre.unsqueeze(-1).to(streams.dtype) * streams).sum(dim=-2)


def expand_output(h_post: torch.Tensor, out: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """H_post^T · out: the branch output (B, T, C) broadcast into n streams, weighted by h_post (B, T, n)."""
    return h_post.unsqueeze(-1).to(streams.dtype) * out.unsqueeze(-2)  # (B, T, n, C)


def write_streams(h_post: torch.Tensor, out: torch.Tensor, comb: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """H_res · x + H_post^T · out."""
    return expand_output(h_post, out, streams) + apply_comb(comb, streams)


def stream_ops(kernel: str, streams: torch.Tensor):
    """(read, write) for these streams: the fused Triton kernels (`mhc_lm.kernels.glue`) or the PyTorch
    functions above, by `residual.kernel` and the device. The one dispatch point of the apply step."""
    if use_triton(kernel, streams, streams.shape[-2]):
        return glue_ops()
    return read_streams, write_streams


def rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weight-less RMS normalization over the last dimension, in fp32."""
    x = x.float()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


class Mixer(nn.Module):
    """Base class of every residual mixer. Subclasses implement `mixing` and `reset_parameters`.

    `mixing(streams)` returns (h_pre (B, T, n), h_post (B, T, n), comb (B, T, n, n)) in fp32, comb in
    the storage layout. Everything a mixer owns is a connection parameter (no weight decay).
    """

    n: int
    dim: int  # the width C of one stream, set by `make_mixer`
    kernel: str = "auto"  # residual.kernel (auto | triton | torch), set by `make_mixer`; see mhc_lm.kernels
    signed: bool = False  # H_res may have negative entries by design: the spectral norm, not row sums, bounds it

    def mixing(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def forward(self, streams: torch.Tensor, branch: Branch) -> torch.Tensor:
        h_pre, h_post, comb = self.mixing(streams)
        read, write = stream_ops(self.kernel, streams)
        out = branch(read(h_pre, streams))
        return write(h_post, out, comb, streams)

    def coefficients(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h_pre, h_post, h_res) with h_res = comb^T in the paper's orientation (rows = forward gain)."""
        h_pre, h_post, comb = self.mixing(streams)
        return h_pre, h_post, comb.transpose(-1, -2)

    def flops_per_token(self) -> int:
        """Forward FLOPs per token of this mixer around its branch: making the coefficients
        (`coefficient_flops`) and applying them (`apply_flops`). Training counts 3x (forward and backward),
        as 6N counts the parameters' matmuls (docs/residual.md, "FLOPs")."""
        return self.coefficient_flops() + self.apply_flops()

    def coefficient_flops(self) -> int:
        """Forward FLOPs per token of H_pre, H_post and comb from the streams."""
        raise NotImplementedError

    def apply_flops(self) -> int:
        """The read H_pre · x (2nC) and the write H_post^T · out + H_res · x (2nC + 2n^2 C)."""
        return 2 * self.n * (self.n + 2) * self.dim

    def gate_scales(self) -> dict[str, float]:
        """The learned gating factors of the dynamic part, as {scale_pre, scale_post, scale_res}; {} without."""
        return {}

    def sinkhorn_logits(self, streams: torch.Tensor) -> torch.Tensor | None:
        """The per-token logits (B, T, k) this mixer hands to the Sinkhorn; None where H_res is not a Sinkhorn
        projection (the diagnostics then report no logit range)."""
        return None


@dataclasses.dataclass
class GeneratorOptions:
    """Initialization and numerics of the shared coefficient generator (docs/residual.md, section 2)."""

    scale_init: float = 0.01  # the paper's gating factor
    fn_init_std: float = 0.02  # 0 gives a zero (purely static) start
    pre_init: str = "uniform"  # "uniform": base_pre = 0 (pre = 0.5); "onehot": +b on stream l mod n, -b elsewhere
    pre_init_strength: float = 4.0  # b of the one-hot pre init
    rms_eps: float = 1e-6
    hc_eps: float = 1e-6  # added to H_pre (and the Sinkhorn's eps in mhc)


PRE_INITS = ("uniform", "onehot")
RES_INITS = ("identity", "uniform")


@dataclasses.dataclass
class ResOptions(GeneratorOptions):
    """A generator with a res block: how its bias starts (docs/residual.md, section 2).

    identity: identity-leaning, H_res close to I at step 0 (how close: res_init_strength, whose
    meaning each variant documents); uniform: the centre of the variant's constraint set.
    """

    res_init: str = "identity"
    res_init_strength: float = 4.0


class GeneratedMixer(Mixer):
    """A mixer whose coefficients come from the shared generator of docs/residual.md, section 2 (the mHC family).

    Parameters keep DeepSeek-V4's names and layout, so its weights load 1:1: `fn` ((2n + k), n*C)
    with output rows ordered [pre (n) | post (n) | res (k)], `base` (2n + k) and `scale` (3), where
    k = `num_res_logits` is the variant's number of res logits (n*n for mhc). A variant supplies
    `res_base_init()` (the identity-leaning bias of its res block) and `project(res_logit)` (its map P
    onto the constraint set, returning comb (B, T, n, n)). Computed in fp32 whatever the activation dtype.
    """

    @staticmethod
    def res_logits(n: int) -> int:
        """Free res logits per token (k) for n streams."""
        raise NotImplementedError

    @staticmethod
    def res_flops(n: int) -> int:
        """Approximate FLOPs per token of the projection P (the res block to comb), for the README table."""
        raise NotImplementedError

    def projection_flops(self) -> int:
        """FLOPs per token of this mixer's projection P (`res_flops` at its own options)."""
        return self.res_flops(self.n)

    def coefficient_flops(self) -> int:
        """The generator's matmul, (2n + k) outputs of an n*C input, then the projection of the k res logits."""
        return 2 * (2 * self.n + self.num_res_logits) * self.n * self.dim + self.projection_flops()

    def __init__(self, dim: int, n: int, layer_index: int, options: GeneratorOptions):
        super().__init__()
        if options.pre_init not in PRE_INITS:
            raise ValueError(f"residual.pre_init={options.pre_init!r}: allowed: {', '.join(PRE_INITS)}")
        res_init = getattr(options, "res_init", RES_INITS[0])
        if res_init not in RES_INITS:
            raise ValueError(f"residual.res_init={res_init!r}: allowed: {', '.join(RES_INITS)}")
        self.n, self.layer_index, self.options = n, layer_index, options
        self.num_res_logits = self.res_logits(n)
        width = 2 * n + self.num_res_logits
        self.fn = nn.Parameter(torch.empty(width, n * dim))
        self.base = nn.Parameter(torch.empty(width))
        self.scale = nn.Parameter(torch.empty(3))

    def res_base_init(self) -> torch.Tensor:
        """The bias of the res block at step 0, shape (k,) or anything that flattens to it."""
        raise NotImplementedError

    def project(self, res_logit: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def reset_parameters(self) -> None:
        n, opt = self.n, self.options
        if opt.fn_init_std > 0:
            nn.init.normal_(self.fn, std=opt.fn_init_std)
        else:
            nn.init.zeros_(self.fn)
        self.scale.fill_(opt.scale_init)
        base_pre = torch.zeros(n)
        if opt.pre_init == "onehot":
            base_pre.fill_(-opt.pre_init_strength)
            base_pre[self.layer_index % n] = opt.pre_init_strength
        base_post = torch.zeros(n)  # post = 2 * sigmoid(0) = 1
        self.base.copy_(torch.cat([base_pre, base_post, self.res_base_init().flatten()]))

    def raw_mixes(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """streams (B, T, n, C) -> flat @ fn^T (B, T, 2n + k) and r = 1 / RMS(flat) (B, T, 1), fp32.

        One weight-less RMS over all n*C values; multiplying by r after the matmul equals normalizing before.
        """
        flat = streams.flatten(-2).float()  # (B, T, n*C)
        r = torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.options.rms_eps)
        return torch.nn.functional.linear(flat, self.fn.float()), r

    def generate(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams (B, T, n, C) -> pre (B, T, n), post (B, T, n), res_logit (B, T, k), all fp32."""
        n, opt = self.n, self.options
        mixes, r = self.raw_mixes(streams)
        mixes = mixes * r  # (B, T, 2n + k)
        pre_m, post_m, res_m = mixes.split([n, n, self.num_res_logits], dim=-1)
        base_pre, base_post, base_res = self.base.float().split([n, n, self.num_res_logits])
        scale = self.scale.float()
        pre = torch.sigmoid(scale[0] * pre_m + base_pre) + opt.hc_eps
        post = 2 * torch.sigmoid(scale[1] * post_m + base_post)
        res_logit = scale[2] * res_m + base_res
        return pre, post, res_logit

    def mixing(self, streams):
        pre, post, res_logit = self.generate(streams)
        return pre, post, self.project(res_logit)

    def gate_scales(self) -> dict[str, float]:
        return dict(zip(("scale_pre", "scale_post", "scale_res"), self.scale.detach().float().tolist()))


