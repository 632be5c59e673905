"""Sinkhorn-Knopp projection of mixing logits onto (approximately) doubly stochastic matrices.

The function is the DeepSeek-V4 iteration (docs/sinkhorn.md), on the `comb` layout (comb = H_res^T):

    comb = softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(-2) + eps)                 # columns of comb
    repeat iters - 1 times:
        comb = comb / (comb.sum(-1) + eps)             # rows of comb
        comb = comb / (comb.sum(-2) + eps)             # columns of comb

The last step normalizes the columns of comb, i.e. the rows of H_res: the forward gain is 1 (to eps).

`sinkhorn` is an autograd Function. Its backward is the exact gradient of this unrolled, truncated
iteration (what autograd through the loop gives), recomputed from the saved logits: between forward
and backward only the logits are kept, never the 2 * iters intermediate matrices.

The recomputation uses one fact: every iterate is the softmax matrix scaled on both sides,
comb_t = diag(a_t) P0 diag(b_t). So the backward replays the forward keeping only the divisors
(2 * iters vectors of length n, not matrices) and walks back through the steps, rebuilding each
iterate from the one after it by multiplying the divisor back in.
"""

from __future__ import annotations

import torch

from .dispatch import sinkhorn_ops, use_triton

__all__ = ["sinkhorn", "sinkhorn_reference"]


def sinkhorn_reference(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """The plain loop, differentiated by autograd. The definition the fast paths are tested against."""
    comb = torch.softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


# The fast paths work on a matrix-first layout (n, n, *tokens): the reductions over the two small
# matrix dimensions then run over contiguous token vectors, several times faster on CPU than
# reducing the innermost size-n dimension. In that layout dim 0 is the row index of comb and dim 1
# its column index: a "column" step of comb sums over dim 0, a "row" step over dim 1.


def _forward_with_divisors(p0: torch.Tensor, iters: int, eps: float):
    """Run the iteration in place from p0 = softmax + eps (matrix-first); return it and every step's divisor.

    Divisors alternate: column divisors (1, n, ...), then row divisors (n, 1, ...), ending on a column.
    """
    divisors = []
    comb = p0
    for step in range(2 * iters - 1):
        divisor = comb.sum(step % 2, keepdim=True).add_(eps)
        divisors.append(divisor)
        comb.div_(divisor)
    return comb, divisors


def _matrix_first(x: torch.Tensor) -> torch.Tensor:
    """(..., n, n) -> a fresh contiguous (n, n, ...) copy (never an alias: callers update it in place)."""
    return x.movedim((-2, -1), (0, 1)).clone(memory_format=torch.contiguous_format)


def _matrix_last(x: torch.Tensor) -> torch.Tensor:
    return x.movedim((0, 1), (-2, -1)).contiguous()


class _Sinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int, eps: float):
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            p0 = torch.softmax(_matrix_first(logits.to(compute_dtype)), dim=1).add_(eps)
            comb, _ = _forward_with_divisors(p0, iters, eps)
        ctx.save_for_backward(logits)
        ctx.iters, ctx.eps = iters, eps
        return _matrix_last(comb)

    @staticmethod
    def backward(ctx, grad_comb: torch.Tensor):
        (logits,) = ctx.saved_tensors
        iters, eps = ctx.iters, ctx.eps
        with torch.no_grad():
            soft = torch.softmax(_matrix_first(logits.to(grad_comb.dtype)), dim=1)
            comb, divisors = _forward_with_divisors(soft + eps, iters, eps)
            grad = _matrix_first(grad_comb)  # a copy, updated in place below
            # Step k maps x -> y = x / d with d = x.sum(dim) + eps (broadcast along dim).
            # Its vector-Jacobian product: grad_x = (grad_y - sum_dim(grad_y * y)) / d.
            for step in reversed(range(2 * iters - 1)):
                divisor = divisors[step]
                grad.sub_((grad * comb).sum(step % 2, keepdim=True)).div_(divisor)
                comb.mul_(divisor)  # the iterate before this step
            # The eps added after the softmax has zero gradient; softmax VJP along dim 1:
            grad_logits = soft * grad.sub_((grad * soft).sum(1, keepdim=True))
        return _matrix_last(grad_logits).to(logits.dtype), None, None


def sinkhorn(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6, kernel: str = "auto") -> torch.Tensor:
    """Project `logits` (..., n, n) to `comb` (..., n, n) in fp32 (fp64 stays fp64).

    Memory between forward and backward: the logits only. Backward: the exact gradient of the
    unrolled iteration (see the module docstring). `kernel` (auto | triton | torch) picks the Triton
    kernel or this PyTorch path as `residual.kernel` does (mhc_lm.kernels); `auto` keeps fp64 and
    n > 8 on PyTorch.
    """
    if iters < 1:
        raise ValueError(f"sinkhorn iters={iters}: must be an integer >= 1")
    if logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn expects square (..., n, n) logits, got shape {tuple(logits.shape)}")
    if (logits.dtype != torch.float64 or kernel == "triton") and use_triton(kernel, logits, logits.shape[-1]):
        sinkhorn_kernel, _ = sinkhorn_ops()
        return sinkhorn_kernel(logits, iters, eps)
    return _Sinkhorn.apply(logits, iters, eps)
