"""The Sinkhorn projection: its values, its exact unrolled gradient, and what it keeps for backward."""

from __future__ import annotations

import pytest
import torch

from mhc_lm.residual.sinkhorn import sinkhorn, sinkhorn_reference


def hand_sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """An independent, element-by-element implementation in Python floats (one matrix)."""
    import math

    n = logits.shape[-1]
    rows = [[math.exp(v) for v in row] for row in logits.tolist()]
    comb = [[v / sum(row) + eps for v in row] for row in rows]

    def normalize_columns(m):
        sums = [sum(m[i][j] for i in range(n)) + eps for j in range(n)]
        return [[m[i][j] / sums[j] for j in range(n)] for i in range(n)]

    comb = normalize_columns(comb)
    for _ in range(iters - 1):
        comb = [[v / (sum(row) + eps) for v in row] for row in comb]
        comb = normalize_columns(comb)
    return torch.tensor(comb, dtype=torch.float64)


def test_matches_an_independent_implementation():
    torch.manual_seed(0)
    logits = torch.randn(5, 5, dtype=torch.float64) * 3
    for iters in (1, 3, 20):
        torch.testing.assert_close(sinkhorn(logits, iters, 1e-6), hand_sinkhorn(logits, iters, 1e-6),
                                   rtol=1e-12, atol=1e-14)


def test_gradcheck_fp64():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, 20, 1e-6), (logits,))
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, 1, 1e-6), (logits,))


@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("magnitude", [1.0, 50.0])
def test_equals_autograd_through_the_loop(n, dtype, magnitude):
    torch.manual_seed(n)
    logits = (torch.randn(64, n, n, dtype=dtype) * magnitude).requires_grad_()
    grad_out = torch.randn(64, n, n, dtype=dtype)
    ours = sinkhorn(logits)
    (grad_ours,) = torch.autograd.grad(ours, logits, grad_out)
    ref = sinkhorn_reference(logits)
    (grad_ref,) = torch.autograd.grad(ref, logits, grad_out)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=tol, atol=tol)
    assert torch.isfinite(grad_ours).all()


def test_output_is_fp32_for_low_precision_input_and_grad_keeps_input_dtype():
    logits = torch.randn(8, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    comb = sinkhorn(logits)
    assert comb.dtype == torch.float32
    comb.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_forward_gain_is_one_rows_of_h_res():
    """The last step normalizes columns of comb = rows of H_res: forward gains are 1 to eps."""
    torch.manual_seed(1)
    comb = sinkhorn(torch.randn(256, 4, 4) * 5)
    h_res = comb.transpose(-1, -2)
    torch.testing.assert_close(h_res.sum(-1), torch.ones(256, 4), atol=1e-5, rtol=0)
    assert (comb >= 0).all()


def test_keeps_only_the_logits_for_backward():
    """Between forward and backward only the logits are stored, not 2 * iters intermediate matrices."""
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    logits = torch.randn(32, 4, 4, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sinkhorn(logits, iters=20)
    assert saved == [logits.numel()]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sinkhorn_reference(logits, iters=20)
    assert sum(saved) > 20 * logits.numel()  # what plain autograd keeps


def test_backward_does_not_modify_the_incoming_gradient():
    logits = torch.randn(6, 4, 4, requires_grad=True)
    comb = sinkhorn(logits)
    grad = torch.randn_like(comb)  # same (possibly permuted) layout as the output
    before = grad.clone()
    comb.backward(grad)
    assert torch.equal(grad, before)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="iters=0"):
        sinkhorn(torch.zeros(4, 4), iters=0)
    with pytest.raises(ValueError, match="square"):
        sinkhorn(torch.zeros(4, 3))
