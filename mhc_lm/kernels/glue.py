"""Triton kernels that apply the mixing coefficients to the streams, generic in comb (any mixer).

* read:     y = H_pre · x = sum_j h_pre[j] x[j]                       (B, T, n, C) -> (B, T, C)
* write:    x_next = H_post^T ⊗ out + H_res · x, with H_res = comb^T:
            x_next[i] = h_post[i] * out + sum_j comb[j, i] * x[j]      (the convention of residual/base.py)

Each kernel, forward and backward, reads every stream once and computes in fp32 whatever the
activation dtype; the results are rounded once to the output dtype. Tiles are BT tokens x BC
channels (x all n streams); the backward kernels loop over the channels to reduce the gradients
of the per-token coefficients in registers. Streams may be any view whose channel stride is 1
(the expanded embedding of `expand_streams`, stream stride 0, is read without a copy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpreter import interpreting

# ---------------------------------------------------------------------------------------------
# Kernels. Offsets are int64: N * n * C overflows int32 at a million tokens of width 1024.


@triton.jit
def _token_coefficients(h_ptr, N, n: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr):
    """This program's BT tokens (int64), the stream index, their mask, and the (BT, NP) coefficients h (N, n)."""
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    st = tl.arange(0, NP)
    tok64 = tok.to(tl.int64)
    ts_mask = (tok[:, None] < N) & (st[None, :] < n)
    h = tl.load(h_ptr + tok64[:, None] * n + st[None, :], mask=ts_mask, other=0.0)
    return tok, tok64, st, ts_mask, h


@triton.jit
def _read_fwd_kernel(x_ptr, h_ptr, y_ptr, N, C, stride_xt, stride_xn,
                         n: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    tok, tok64, st, _, h = _token_coefficients(h_ptr, N, n, NP, BT)
    ch = tl.program_id(1) * BC + tl.arange(0, BC)
    tc_mask = (tok[:, None] < N) & (ch[None, :] < C)
    x = tl.load(x_ptr + tok64[:, None, None] * stride_xt + st[None, :, None] * stride_xn + ch[None, None, :],
                mask=tc_mask[:, None, :] & (st[None, :, None] < n), other=0.0).to(tl.float32)
    y = tl.sum(h[:, :, None] * x, axis=1)
    tl.store(y_ptr + tok64[:, None] * C + ch[None, :], y.to(y_ptr.dtype.element_ty), mask=tc_mask)


@triton.jit
def _read_bwd_kernel(x_ptr, h_ptr, grad_y_ptr, grad_x_ptr, grad_h_ptr, N, C, stride_xt, stride_xn,
                         n: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    tok, tok64, st, ts_mask, h = _token_coefficients(h_ptr, N, n, NP, BT)
    grad_h = tl.zeros((BT, NP), dtype=tl.float32)
    for c0 in range(0, C, BC):
        ch = c0 + tl.arange(0, BC)
        tc_mask = (tok[:, None] < N) & (ch[None, :] < C)
        mask = tc_mask[:, None, :] & (st[None, :, None] < n)
        grad_y = tl.load(grad_y_ptr + tok64[:, None] * C + ch[None, :], mask=tc_mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + tok64[:, None, None] * stride_xt + st[None, :, None] * stride_xn + ch[None, None, :],
                    mask=mask, other=0.0).to(tl.float32)
        grad_x = h[:, :, None] * grad_y[:, None, :]
        tl.store(grad_x_ptr + tok64[:, None, None] * (n * C) + st[None, :, None] * C + ch[None, None, :],
                 grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
        grad_h += tl.sum(x * grad_y[:, None, :], axis=2)
    tl.store(grad_h_ptr + tok64[:, None] * n + st[None, :], grad_h, mask=ts_mask)


@triton.jit
def _write_fwd_kernel(x_ptr, out_ptr, h_ptr, comb_ptr, y_ptr, N, C, stride_xt, stride_xn, stride_ot,
                      n: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    tok, tok64, st, ts_mask, h = _token_coefficients(h_ptr, N, n, NP, BT)
    ch = tl.program_id(1) * BC + tl.arange(0, BC)
    tc_mask = (tok[:, None] < N) & (ch[None, :] < C)
    out = tl.load(out_ptr + tok64[:, None] * stride_ot + ch[None, :], mask=tc_mask, other=0.0).to(tl.float32)
    acc = h[:, :, None] * out[:, None, :]  # (BT, NP: new stream i, BC)
    for j in tl.static_range(n):
        x_j = tl.load(x_ptr + tok64[:, None] * stride_xt + j * stride_xn + ch[None, :], mask=tc_mask,
                      other=0.0).to(tl.float32)
        comb_j = tl.load(comb_ptr + tok64[:, None] * (n * n) + j * n + st[None, :], mask=ts_mask, other=0.0)
        acc += comb_j[:, :, None] * x_j[:, None, :]  # comb[j, i] * x[j] into new stream i
    tl.store(y_ptr + tok64[:, None, None] * (n * C) + st[None, :, None] * C + ch[None, None, :],
             acc.to(y_ptr.dtype.element_ty), mask=tc_mask[:, None, :] & (st[None, :, None] < n))


@triton.jit
def _write_bwd_kernel(x_ptr, out_ptr, h_ptr, comb_ptr, grad_y_ptr, grad_x_ptr, grad_out_ptr, grad_h_ptr,
                      grad_comb_ptr, N, C, stride_xt, stride_xn, stride_ot,
                      n: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    tok, tok64, st, ts_mask, h = _token_coefficients(h_ptr, N, n, NP, BT)
    grad_h = tl.zeros((BT, NP), dtype=tl.float32)
    grad_comb = tl.zeros((BT, NP, NP), dtype=tl.float32)  # axis 1: input stream j, axis 2: new stream i
    for c0 in range(0, C, BC):
        ch = c0 + tl.arange(0, BC)
        tc_mask = (tok[:, None] < N) & (ch[None, :] < C)
        mask = tc_mask[:, None, :] & (st[None, :, None] < n)
        grad_y = tl.load(grad_y_ptr + tok64[:, None, None] * (n * C) + st[None, :, None] * C + ch[None, None, :],
                         mask=mask, other=0.0).to(tl.float32)  # (BT, NP: new stream i, BC)
        out = tl.load(out_ptr + tok64[:, None] * stride_ot + ch[None, :], mask=tc_mask, other=0.0).to(tl.float32)
        tl.store(grad_out_ptr + tok64[:, None] * C + ch[None, :],
                 tl.sum(h[:, :, None] * grad_y, axis=1).to(grad_out_ptr.dtype.element_ty), mask=tc_mask)
        grad_h += tl.sum(grad_y * out[:, None, :], axis=2)
        for j in tl.static_range(n):
            x_j = tl.load(x_ptr + tok64[:, None] * stride_xt + j * stride_xn + ch[None, :], mask=tc_mask,
                          other=0.0).to(tl.float32)
            comb_j = tl.load(comb_ptr + tok64[:, None] * (n * n) + j * n + st[None, :], mask=ts_mask, other=0.0)
            grad_x_j = tl.sum(comb_j[:, :, None] * grad_y, axis=1)  # sum_i comb[j, i] * grad_y[i]
            tl.store(grad_x_ptr + tok64[:, None] * (n * C) + j * C + ch[None, :],
                     grad_x_j.to(grad_x_ptr.dtype.element_ty), mask=tc_mask)
            grad_comb_j = tl.sum(x_j[:, None, :] * grad_y, axis=2)  # (BT, NP: i) = sum_c x[j] * grad_y[i]
            grad_comb += tl.where(st[None, :, None] == j, grad_comb_j[:, None, :], 0.0)
    tl.store(grad_h_ptr + tok64[:, None] * n + st[None, :], grad_h, mask=ts_mask)
    tl.store(grad_comb_ptr + tok64[:, None, None] * (n * n) + st[None, :, None] * n + st[None, None, :], grad_comb,
             mask=ts_mask[:, :, None] & (st[None, None, :] < n))


# ---------------------------------------------------------------------------------------------
# Launch parameters and layout


def blocks(n: int) -> tuple[int, int]:
    """(tokens, channels) per program. On a GPU: tiles of about 1024 stream values (BT x n x 128, 8 per
    thread), which keep the backward at about 100 registers on sm_90 (benchmarks/kernel_resources.py)
    so that enough programs are resident to keep the loads in flight. Under the interpreter, whose cost
    is per program rather than per value: 64 x 128."""
    if interpreting():
        return 64, 128
    return max(1, 8 // triton.next_power_of_2(n)), 128


def _as_tokens(streams: torch.Tensor) -> torch.Tensor:
    """(..., n, C) -> a (N, n, C) view with channel stride 1 (a copy only when the layout needs one)."""
    x = streams.reshape(-1, *streams.shape[-2:])
    return x if x.stride(-1) == 1 else x.contiguous()


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """(..., width) -> a contiguous fp32 (N, width)."""
    return t.reshape(-1, width).float().contiguous()


def _meta(n: int):
    bt, bc = blocks(n)
    return bt, bc, dict(n=n, NP=triton.next_power_of_2(n), BT=bt, BC=bc, num_warps=4)


# ---------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("mhc_lm::read_streams", mutates_args=())
def read_streams(h_pre: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """sum_j h_pre[..., j] * streams[..., j, :]: h_pre (..., n), streams (..., n, C) -> (..., C) in streams' dtype."""
    n, C = streams.shape[-2:]
    x = _as_tokens(streams)
    tokens = x.shape[0]
    y = torch.empty(tokens, C, dtype=streams.dtype, device=streams.device)
    bt, bc, meta = _meta(n)
    _read_fwd_kernel[(triton.cdiv(tokens, bt), triton.cdiv(C, bc))](
        x, _rows(h_pre, n), y, tokens, C, x.stride(0), x.stride(1), **meta)
    return y.view(*streams.shape[:-2], C)


@read_streams.register_fake
def _(h_pre, streams):
    return streams.new_empty(*streams.shape[:-2], streams.shape[-1])


@torch.library.custom_op("mhc_lm::read_streams_backward", mutates_args=())
def read_streams_backward(h_pre: torch.Tensor, streams: torch.Tensor,
                              grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, C = streams.shape[-2:]
    x = _as_tokens(streams)
    tokens = x.shape[0]
    grad_x = torch.empty(tokens, n, C, dtype=streams.dtype, device=streams.device)
    grad_h = torch.empty(tokens, n, dtype=torch.float32, device=streams.device)
    bt, _, meta = _meta(n)
    _read_bwd_kernel[(triton.cdiv(tokens, bt),)](
        x, _rows(h_pre, n), grad_y.reshape(tokens, C).contiguous(), grad_x, grad_h, tokens, C,
        x.stride(0), x.stride(1), **meta)
    return grad_h.view(h_pre.shape).to(h_pre.dtype), grad_x.view(streams.shape)


@read_streams_backward.register_fake
def _(h_pre, streams, grad_y):
    return torch.empty_like(h_pre), streams.new_empty(streams.shape)


def _read_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _read_grad(ctx, grad_y):
    h_pre, streams = ctx.saved_tensors
    return read_streams_backward(h_pre, streams, grad_y)


read_streams.register_autograd(_read_grad, setup_context=_read_setup)


@torch.library.custom_op("mhc_lm::write_streams", mutates_args=())
def write_streams(h_post: torch.Tensor, out: torch.Tensor, comb: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """h_post[i] * out + sum_j comb[j, i] * streams[j] for every new stream i: h_post (..., n), out (..., C),
    comb (..., n, n), streams (..., n, C) -> (..., n, C) in the promoted dtype of streams and out."""
    n, C = streams.shape[-2:]
    x = _as_tokens(streams)
    tokens = x.shape[0]
    branch = out.reshape(tokens, C)
    branch = branch if branch.stride(-1) == 1 else branch.contiguous()
    y = torch.empty(tokens, n, C, dtype=torch.promote_types(streams.dtype, out.dtype), device=streams.device)
    bt, bc, meta = _meta(n)
    _write_fwd_kernel[(triton.cdiv(tokens, bt), triton.cdiv(C, bc))](
        x, branch, _rows(h_post, n), _rows(comb, n * n), y, tokens, C, x.stride(0), x.stride(1), branch.stride(0),
        **meta)
    return y.view(streams.shape)


@write_streams.register_fake
def _(h_post, out, comb, streams):
    return streams.new_empty(streams.shape, dtype=torch.promote_types(streams.dtype, out.dtype))


@torch.library.custom_op("mhc_lm::write_streams_backward", mutates_args=())
def write_streams_backward(h_post: torch.Tensor, out: torch.Tensor, comb: torch.Tensor, streams: torch.Tensor,
                           grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, C = streams.shape[-2:]
    x = _as_tokens(streams)
    tokens = x.shape[0]
    branch = out.reshape(tokens, C)
    branch = branch if branch.stride(-1) == 1 else branch.contiguous()
    grad_x = torch.empty(tokens, n, C, dtype=streams.dtype, device=streams.device)
    grad_out = torch.empty(tokens, C, dtype=out.dtype, device=out.device)
    grad_h = torch.empty(tokens, n, dtype=torch.float32, device=streams.device)
    grad_comb = torch.empty(tokens, n, n, dtype=torch.float32, device=streams.device)
    bt, _, meta = _meta(n)
    _write_bwd_kernel[(triton.cdiv(tokens, bt),)](
        x, branch, _rows(h_post, n), _rows(comb, n * n), grad_y.reshape(tokens, n, C).contiguous(),
        grad_x, grad_out, grad_h, grad_comb, tokens, C, x.stride(0), x.stride(1), branch.stride(0), **meta)
    return (grad_h.view(h_post.shape).to(h_post.dtype), grad_out.view(out.shape),
            grad_comb.view(comb.shape).to(comb.dtype), grad_x.view(streams.shape))


@write_streams_backward.register_fake
def _(h_post, out, comb, streams, grad_y):
    return torch.empty_like(h_post), torch.empty_like(out), torch.empty_like(comb), streams.new_empty(streams.shape)


def _write_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _write_grad(ctx, grad_y):
    return write_streams_backward(*ctx.saved_tensors, grad_y)


write_streams.register_autograd(_write_grad, setup_context=_write_setup)
