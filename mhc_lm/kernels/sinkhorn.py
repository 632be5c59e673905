"""Triton kernels for the Sinkhorn projection and the mHC coefficient epilogue (docs/sinkhorn.md).

Both work on tiles of BT tokens x (NP x NP) matrices, NP = n rounded up to a power of two (padding
entries are held at exactly zero), in fp32 registers whatever the input dtype.

The Sinkhorn backward is the exact gradient of the unrolled, truncated iteration, recomputed on chip
from the saved logits, with the idea of `mhc_lm.residual.sinkhorn`'s PyTorch backward: replay the
forward keeping the divisors, then walk back through the steps, rebuilding each iterate from the next
by multiplying its divisor back. Here everything stays in registers (the loop is unrolled at compile
time, iters is a constexpr), so the 2 * iters - 1 steps are cut into about sqrt(2 * iters) segments:
the replay keeps the iterate at the start of each segment, and each segment is replayed once more to
keep its own divisors while walking back through it (`_sinkhorn_vjp`). Nothing per iteration touches
global memory: the logits come in, the gradient goes out.

The kernels are exposed as `torch.library` custom ops with their autograd registered, so they run
eagerly and inside `torch.compile` graphs (as opaque calls) alike.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .interpreter import interpreting

# ---------------------------------------------------------------------------------------------
# Tile helpers (device functions)


@triton.jit
def _matrix_index(n: tl.constexpr, NP: tl.constexpr):
    """Offsets i*n + j of an (NP, NP) tile of an n x n matrix, and which entries are real (not padding)."""
    rows = tl.arange(0, NP)[:, None]
    cols = tl.arange(0, NP)[None, :]
    return rows * n + cols, (rows < n) & (cols < n)


@triton.jit
def _token_matrices(N, n: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr):
    """This program's BT tokens of contiguous (N, n, n) matrices: offsets, real entries, in-bounds entries."""
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    index, valid = _matrix_index(n, NP)
    index, valid = index[None, :, :], valid[None, :, :]
    return tok.to(tl.int64)[:, None, None] * (n * n) + index, valid, valid & (tok[:, None, None] < N)


@triton.jit
def _softmax_rows(x, valid, n: tl.constexpr, NP: tl.constexpr):
    """softmax(x, dim=-1) of (BT, NP, NP) tiles; padding entries give 0 (and padding rows no NaN)."""
    if n != NP:
        x = tl.where(valid, x, float("-inf"))
    row_max = tl.max(x, axis=2)
    if n != NP:
        row_max = tl.where(tl.arange(0, NP)[None, :] < n, row_max, 0.0)
    e = tl.exp(x - row_max[:, :, None])
    total = tl.sum(e, axis=2)
    if n != NP:
        total = tl.where(tl.arange(0, NP)[None, :] < n, total, 1.0)
    return e / total[:, :, None]


@triton.jit
def _normalize(comb, eps, AXIS: tl.constexpr):
    """One Sinkhorn step: comb / (sum over AXIS + eps), AXIS 1 a column step of comb, 2 a row step.
    Returns the new iterate and the divisor (BT, NP). One reciprocal per divisor, n*n multiplies."""
    divisor = tl.sum(comb, axis=AXIS) + eps
    if AXIS == 1:
        return comb * (1.0 / divisor)[:, None, :], divisor
    return comb * (1.0 / divisor)[:, :, None], divisor


@triton.jit
def _start(soft, valid, eps, n: tl.constexpr, NP: tl.constexpr):
    """The first iterate, softmax + eps, with the padding held at zero."""
    comb = soft + eps
    if n != NP:
        comb = tl.where(valid, comb, 0.0)
    return comb


@triton.jit
def _sinkhorn_iterate(soft, valid, eps, ITERS: tl.constexpr, n: tl.constexpr, NP: tl.constexpr):
    """The DeepSeek-V4 iteration from soft = softmax(logits): + eps, a column step, then ITERS - 1 row/column pairs.

    Axis 1 of the tile is the row index of comb, axis 2 its column index: a column step sums over axis 1.
    """
    comb, _ = _normalize(_start(soft, valid, eps, n, NP), eps, 1)
    for _ in range(ITERS - 1):
        comb, _ = _normalize(comb, eps, 2)
        comb, _ = _normalize(comb, eps, 1)
    return comb


@triton.jit
def _step_vjp(grad, comb, divisor, AXIS: tl.constexpr):
    """Back through one step y = x / d (d = sum_AXIS(x) + eps), given y = comb and d = divisor:
    returns g_x = (g_y - sum_AXIS(g_y * y)) / d and the iterate before the step, x = y * d."""
    if AXIS == 1:
        grad = (grad - tl.sum(grad * comb, axis=1)[:, None, :]) * (1.0 / divisor)[:, None, :]
        return grad, comb * divisor[:, None, :]
    grad = (grad - tl.sum(grad * comb, axis=2)[:, :, None]) * (1.0 / divisor)[:, :, None]
    return grad, comb * divisor[:, :, None]


@triton.jit
def _segment_vjp(comb, grad, valid, eps, FIRST: tl.constexpr, SEG: tl.constexpr, STEPS: tl.constexpr,
                 n: tl.constexpr, NP: tl.constexpr):
    """Back through steps FIRST .. FIRST + SEG - 1 (those < STEPS), given comb, the iterate before FIRST:
    replay them keeping their divisors, then walk back. Step k normalizes columns (axis 1) when k is even."""
    divisors = ()
    for k in tl.static_range(SEG):
        if FIRST + k < STEPS:
            comb, divisor = _normalize(comb, eps, 1 + (FIRST + k) % 2)
            divisors = divisors + (divisor,)
    for k_back in tl.static_range(SEG):
        if FIRST + SEG - 1 - k_back < STEPS:
            grad, comb = _step_vjp(grad, comb, divisors[SEG - 1 - k_back], 1 + (FIRST + SEG - 1 - k_back) % 2)
            if n != NP:  # keep padding at 0: its divisors are eps, which would blow it up
                grad = tl.where(valid, grad, 0.0)
    return grad


@triton.jit
def _sinkhorn_vjp(soft, grad, valid, eps, ITERS: tl.constexpr, SEG: tl.constexpr, n: tl.constexpr,
                  NP: tl.constexpr):
    """d(loss)/d(logits) from grad = d(loss)/d(comb): the exact VJP of the unrolled iteration.

    The 2 * ITERS - 1 steps are split into segments of SEG. The forward keeps the iterate at the start
    of each segment; the backward replays one segment at a time from its start, keeping that segment's
    divisors, and walks back through it, rebuilding each iterate from the next as y * d. Registers hold
    about sqrt(steps) matrices and divisors instead of every divisor.
    """
    STEPS: tl.constexpr = 2 * ITERS - 1
    NSEG: tl.constexpr = (STEPS + SEG - 1) // SEG
    comb = _start(soft, valid, eps, n, NP)
    starts = ()
    for step in tl.static_range(STEPS):
        if step % SEG == 0:
            starts = starts + (comb,)
        comb, _ = _normalize(comb, eps, 1 + step % 2)
    for seg_back in tl.static_range(NSEG):
        grad = _segment_vjp(starts[NSEG - 1 - seg_back], grad, valid, eps, (NSEG - 1 - seg_back) * SEG, SEG, STEPS,
                            n, NP)
    # The eps added after the softmax has zero gradient; the softmax VJP along the rows:
    return soft * (grad - tl.sum(grad * soft, axis=2)[:, :, None])


# ---------------------------------------------------------------------------------------------
# Sinkhorn kernels


@triton.jit
def _sinkhorn_fwd_kernel(logits_ptr, comb_ptr, N, eps,
                         ITERS: tl.constexpr, n: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr):
    offsets, valid, mask = _token_matrices(N, n, NP, BT)
    x = tl.load(logits_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    comb = _sinkhorn_iterate(_softmax_rows(x, valid, n, NP), valid, eps, ITERS, n, NP)
    tl.store(comb_ptr + offsets, comb, mask=mask)


@triton.jit
def _sinkhorn_bwd_kernel(logits_ptr, grad_comb_ptr, grad_logits_ptr, N, eps,
                         ITERS: tl.constexpr, SEG: tl.constexpr, n: tl.constexpr, NP: tl.constexpr,
                         BT: tl.constexpr):
    offsets, valid, mask = _token_matrices(N, n, NP, BT)
    x = tl.load(logits_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_comb_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad = _sinkhorn_vjp(_softmax_rows(x, valid, n, NP), grad, valid, eps, ITERS, SEG, n, NP)
    tl.store(grad_logits_ptr + offsets, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Coefficient epilogue kernels: mixes (N, W = 2n + n*n) laid out [pre (n) | post (n) | res (n*n)]


@triton.jit
def _load_epilogue(mixes_ptr, r_ptr, base_ptr, tok, N, n: tl.constexpr, NP: tl.constexpr):
    """This program's raw mixes (pre (BT, NP), post (BT, NP), res (BT, NP, NP)), r (BT,) and the biases."""
    W: tl.constexpr = 2 * n + n * n
    streams = tl.arange(0, NP)
    smask = streams < n
    tmask = tok < N
    row = mixes_ptr + tok.to(tl.int64)[:, None] * W
    vmask = tmask[:, None] & smask[None, :]
    r = tl.load(r_ptr + tok, mask=tmask, other=0.0)
    pre_m = tl.load(row + streams[None, :], mask=vmask, other=0.0)
    post_m = tl.load(row + n + streams[None, :], mask=vmask, other=0.0)
    index, valid = _matrix_index(n, NP)
    index, valid = index[None, :, :], valid[None, :, :]
    res_m = tl.load(row[:, :, None] + 2 * n + index, mask=valid & tmask[:, None, None], other=0.0)
    base_pre = tl.load(base_ptr + streams, mask=smask, other=0.0)[None, :]
    base_post = tl.load(base_ptr + n + streams, mask=smask, other=0.0)[None, :]
    base_res = tl.load(base_ptr + 2 * n + index, mask=valid, other=0.0)
    return r, pre_m, post_m, res_m, base_pre, base_post, base_res, index, valid


@triton.jit
def _coefficients_fwd_kernel(mixes_ptr, r_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, N, eps, hc_eps,
                             ITERS: tl.constexpr, n: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr):
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    r, pre_m, post_m, res_m, base_pre, base_post, base_res, index, valid = _load_epilogue(
        mixes_ptr, r_ptr, base_ptr, tok, N, n, NP)
    s_pre, s_post, s_res = tl.load(scale_ptr), tl.load(scale_ptr + 1), tl.load(scale_ptr + 2)
    pre = tl.sigmoid(s_pre * (pre_m * r[:, None]) + base_pre) + hc_eps
    post = 2.0 * tl.sigmoid(s_post * (post_m * r[:, None]) + base_post)
    res_logit = s_res * (res_m * r[:, None, None]) + base_res
    comb = _sinkhorn_iterate(_softmax_rows(res_logit, valid, n, NP), valid, eps, ITERS, n, NP)

    tok64 = tok.to(tl.int64)
    streams = tl.arange(0, NP)[None, :]
    vmask = (tok[:, None] < N) & (streams < n)
    tl.store(pre_ptr + tok64[:, None] * n + streams, pre, mask=vmask)
    tl.store(post_ptr + tok64[:, None] * n + streams, post, mask=vmask)
    tl.store(comb_ptr + tok64[:, None, None] * (n * n) + index, comb, mask=valid & (tok[:, None, None] < N))


@triton.jit
def _coefficients_bwd_kernel(mixes_ptr, r_ptr, scale_ptr, base_ptr, grad_pre_ptr, grad_post_ptr, grad_comb_ptr,
                             grad_mixes_ptr, grad_r_ptr, grad_scale_ptr, grad_base_ptr, N, eps,
                             ITERS: tl.constexpr, SEG: tl.constexpr, n: tl.constexpr, NP: tl.constexpr,
                             BT: tl.constexpr):
    """Per token: grad of mixes and r. Per program: partial sums of grad scale (3) and grad base (W)."""
    W: tl.constexpr = 2 * n + n * n
    pid = tl.program_id(0)
    tok = pid * BT + tl.arange(0, BT)
    tok64 = tok.to(tl.int64)
    r, pre_m, post_m, res_m, base_pre, base_post, base_res, index, valid = _load_epilogue(
        mixes_ptr, r_ptr, base_ptr, tok, N, n, NP)
    s_pre, s_post, s_res = tl.load(scale_ptr), tl.load(scale_ptr + 1), tl.load(scale_ptr + 2)
    streams = tl.arange(0, NP)
    vmask = (tok[:, None] < N) & (streams[None, :] < n)
    mmask = valid & (tok[:, None, None] < N)
    grad_pre = tl.load(grad_pre_ptr + tok64[:, None] * n + streams[None, :], mask=vmask, other=0.0)
    grad_post = tl.load(grad_post_ptr + tok64[:, None] * n + streams[None, :], mask=vmask, other=0.0)
    grad_comb = tl.load(grad_comb_ptr + tok64[:, None, None] * (n * n) + index, mask=mmask, other=0.0)

    # Gradients of the logits z = scale * u + base, with u = mixes * r (zero on padding tokens).
    u_pre, u_post, u_res = pre_m * r[:, None], post_m * r[:, None], res_m * r[:, None, None]
    sig_pre = tl.sigmoid(s_pre * u_pre + base_pre)
    grad_z_pre = grad_pre * sig_pre * (1.0 - sig_pre)
    sig_post = tl.sigmoid(s_post * u_post + base_post)
    grad_z_post = 2.0 * grad_post * sig_post * (1.0 - sig_post)
    soft = _softmax_rows(s_res * u_res + base_res, valid, n, NP)
    grad_z_res = _sinkhorn_vjp(soft, grad_comb, valid, eps, ITERS, SEG, n, NP)

    row = grad_mixes_ptr + tok64[:, None] * W
    tl.store(row + streams[None, :], grad_z_pre * s_pre * r[:, None], mask=vmask)
    tl.store(row + n + streams[None, :], grad_z_post * s_post * r[:, None], mask=vmask)
    tl.store(row[:, :, None] + 2 * n + index, grad_z_res * s_res * r[:, None, None], mask=mmask)
    grad_r = (s_pre * tl.sum(grad_z_pre * pre_m, axis=1) + s_post * tl.sum(grad_z_post * post_m, axis=1)
              + s_res * tl.sum(tl.sum(grad_z_res * res_m, axis=2), axis=1))
    tl.store(grad_r_ptr + tok, grad_r, mask=tok < N)

    tl.store(grad_scale_ptr + pid * 3, tl.sum(tl.sum(grad_z_pre * u_pre, axis=1), axis=0))
    tl.store(grad_scale_ptr + pid * 3 + 1, tl.sum(tl.sum(grad_z_post * u_post, axis=1), axis=0))
    tl.store(grad_scale_ptr + pid * 3 + 2, tl.sum(tl.sum(tl.sum(grad_z_res * u_res, axis=2), axis=1), axis=0))
    base_row = grad_base_ptr + pid * W
    tl.store(base_row + streams, tl.sum(grad_z_pre, axis=0), mask=streams < n)
    tl.store(base_row + n + streams, tl.sum(grad_z_post, axis=0), mask=streams < n)
    tl.store(base_row + 2 * n + index, tl.sum(grad_z_res, axis=0)[None, :, :], mask=valid)


# ---------------------------------------------------------------------------------------------
# Launch parameters


def launch_config(n: int) -> tuple[int, int]:
    """(tokens per program, warps). On a GPU: 4 matrix entries per thread (2 for n > 4, whose 8 x 8 tiles
    replicate more of the divisors across threads), the most that keeps the backward free of register
    spills on sm_90 (ptxas; benchmarks/kernel_resources.py). Under the interpreter, whose cost is per
    program rather than per entry: 4096 entries per program."""
    padded = triton.next_power_of_2(n) ** 2
    if interpreting():
        return max(1, 4096 // padded), 4
    per_thread, warps = (4, 4) if padded <= 16 else (2, 8)
    return max(1, per_thread * 32 * warps // padded), warps


def block_tokens(n: int) -> int:
    return launch_config(n)[0]


def _launch(n: int, tokens: int):
    bt, warps = launch_config(n)
    return (triton.cdiv(tokens, bt),), dict(n=n, NP=triton.next_power_of_2(n), BT=bt, num_warps=warps)


def segment(iters: int) -> int:
    """Steps per backward segment: about sqrt(2 * iters - 1), which minimizes the matrices held in registers."""
    return max(1, math.ceil(math.sqrt(2 * iters - 1)))


def _check_square(logits: torch.Tensor) -> int:
    n = logits.shape[-1]
    if logits.shape[-2] != n or not 1 <= n <= 8:
        raise ValueError(f"the Triton Sinkhorn takes (..., n, n) logits with n <= 8, got shape {tuple(logits.shape)}")
    return n


# ---------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("mhc_lm::sinkhorn", mutates_args=())
def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """comb = Sinkhorn(logits) of (..., n, n) logits in any float dtype; comb is fp32."""
    n = _check_square(logits)
    x = logits.reshape(-1, n, n).contiguous()
    comb = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    grid, meta = _launch(n, x.shape[0])
    _sinkhorn_fwd_kernel[grid](x, comb, x.shape[0], eps, ITERS=iters, **meta)
    return comb.view(logits.shape)


@sinkhorn.register_fake
def _(logits, iters, eps):
    return logits.new_empty(logits.shape, dtype=torch.float32)


@torch.library.custom_op("mhc_lm::sinkhorn_backward", mutates_args=())
def sinkhorn_backward(logits: torch.Tensor, grad_comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    n = _check_square(logits)
    x = logits.reshape(-1, n, n).contiguous()
    grad = grad_comb.reshape(-1, n, n).contiguous()
    grad_logits = torch.empty_like(x)
    grid, meta = _launch(n, x.shape[0])
    _sinkhorn_bwd_kernel[grid](x, grad, grad_logits, x.shape[0], eps, ITERS=iters, SEG=segment(iters), **meta)
    return grad_logits.view(logits.shape)


@sinkhorn_backward.register_fake
def _(logits, grad_comb, iters, eps):
    return torch.empty_like(logits)


def _sinkhorn_setup(ctx, inputs, output):
    logits, ctx.iters, ctx.eps = inputs
    ctx.save_for_backward(logits)  # the logits only: the backward recomputes everything else


def _sinkhorn_grad(ctx, grad_comb):
    (logits,) = ctx.saved_tensors
    return sinkhorn_backward(logits, grad_comb, ctx.iters, ctx.eps), None, None


sinkhorn.register_autograd(_sinkhorn_grad, setup_context=_sinkhorn_setup)


@torch.library.custom_op("mhc_lm::mhc_coefficients", mutates_args=())
def mhc_coefficients(mixes: torch.Tensor, r: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n: int,
                     iters: int, eps: float, hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mHC epilogue (docs/residual.md, section 2, steps 3-4): mixes (..., 2n + n*n) from `flat @ fn^T`,
    r (..., 1) = 1 / RMS, scale (3,), base (2n + n*n,), all fp32 -> H_pre (..., n), H_post (..., n), comb (..., n, n)."""
    lead = mixes.shape[:-1]
    m = mixes.reshape(-1, mixes.shape[-1]).contiguous()
    tokens = m.shape[0]
    pre = torch.empty(tokens, n, dtype=torch.float32, device=m.device)
    post = torch.empty_like(pre)
    comb = torch.empty(tokens, n, n, dtype=torch.float32, device=m.device)
    grid, meta = _launch(n, tokens)
    _coefficients_fwd_kernel[grid](m, r.reshape(-1).contiguous(), scale.contiguous(), base.contiguous(),
                                   pre, post, comb, tokens, eps, hc_eps, ITERS=iters, **meta)
    return pre.view(*lead, n), post.view(*lead, n), comb.view(*lead, n, n)


@mhc_coefficients.register_fake
def _(mixes, r, scale, base, n, iters, eps, hc_eps):
    lead = mixes.shape[:-1]
    return (mixes.new_empty(*lead, n), mixes.new_empty(*lead, n), mixes.new_empty(*lead, n, n))


@torch.library.custom_op("mhc_lm::mhc_coefficients_backward", mutates_args=())
def mhc_coefficients_backward(
    mixes: torch.Tensor, r: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, grad_pre: torch.Tensor,
    grad_post: torch.Tensor, grad_comb: torch.Tensor, n: int, iters: int, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    width = mixes.shape[-1]
    m = mixes.reshape(-1, width).contiguous()
    tokens = m.shape[0]
    grid, meta = _launch(n, tokens)
    grad_mixes = torch.empty_like(m)
    grad_r = torch.empty(tokens, dtype=torch.float32, device=m.device)
    grad_scale = torch.empty(grid[0], 3, dtype=torch.float32, device=m.device)  # per-program partial sums
    grad_base = torch.empty(grid[0], width, dtype=torch.float32, device=m.device)
    _coefficients_bwd_kernel[grid](
        m, r.reshape(-1).contiguous(), scale.contiguous(), base.contiguous(),
        grad_pre.reshape(-1, n).contiguous(), grad_post.reshape(-1, n).contiguous(),
        grad_comb.reshape(-1, n, n).contiguous(), grad_mixes, grad_r, grad_scale, grad_base, tokens, eps,
        ITERS=iters, SEG=segment(iters), **meta)
    return (grad_mixes.view(mixes.shape), grad_r.view(r.shape), grad_scale.sum(0).to(scale.dtype),
            grad_base.sum(0).to(base.dtype))


@mhc_coefficients_backward.register_fake
def _(mixes, r, scale, base, grad_pre, grad_post, grad_comb, n, iters, eps):
    return torch.empty_like(mixes), torch.empty_like(r), torch.empty_like(scale), torch.empty_like(base)


def _coefficients_setup(ctx, inputs, output):
    mixes, r, scale, base, ctx.n, ctx.iters, ctx.eps, _ = inputs
    ctx.save_for_backward(mixes, r, scale, base)


def _coefficients_grad(ctx, grad_pre, grad_post, grad_comb):
    mixes, r, scale, base = ctx.saved_tensors
    lead = mixes.shape[:-1]
    zeros = mixes.new_zeros
    grad_pre = zeros(*lead, ctx.n) if grad_pre is None else grad_pre
    grad_post = zeros(*lead, ctx.n) if grad_post is None else grad_post
    grad_comb = zeros(*lead, ctx.n, ctx.n) if grad_comb is None else grad_comb
    grads = mhc_coefficients_backward(mixes, r, scale, base, grad_pre.float(), grad_post.float(), grad_comb.float(),
                                      ctx.n, ctx.iters, ctx.eps)
    return (*grads, None, None, None, None)


mhc_coefficients.register_autograd(_coefficients_grad, setup_context=_coefficients_setup)
