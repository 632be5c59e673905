"""The Sinkhorn projection, forward + backward: eager PyTorch vs torch.compile vs the Triton kernel.

    python benchmarks/sinkhorn.py                                   # 64K and 1M tokens, n = 4, 20 iterations
    python benchmarks/sinkhorn.py --tokens 65536 --repeat 3 --device cpu

Implementations (all the same function, docs/sinkhorn.md):
  eager     mhc_lm's PyTorch path: an autograd Function that keeps only the logits and recomputes the
            exact unrolled gradient (`sinkhorn(..., kernel="torch")`), what runs without the kernels
  autograd  the plain loop differentiated by autograd (`sinkhorn_reference`): keeps every iterate
  compile   torch.compile (inductor) of the plain loop
  triton    the fused kernel (`sinkhorn(..., kernel="triton")`); only on a GPU: the CPU interpreter
            runs Python and says nothing about speed

Per implementation: the median time of one forward + backward, the speedup over `eager` (a ratio taken in
this run), the memory autograd keeps between forward and backward, on a GPU the peak memory of the call
and the achieved bandwidth of the minimal traffic (logits in, comb out; logits and grad in, grad out) as
a fraction of the device's nominal peak.
"""

from __future__ import annotations

import torch

from common import compare, comparison_parser, pick_device, report
from mhc_lm.kernels import triton_available
from mhc_lm.residual.sinkhorn import sinkhorn, sinkhorn_reference


def implementations(device: torch.device, iters: int, eps: float, backend: str = "inductor") -> dict:
    impls = {
        "eager": lambda x: sinkhorn(x, iters, eps, kernel="torch"),
        "autograd": lambda x: sinkhorn_reference(x, iters, eps),
        "compile": torch.compile(lambda x: sinkhorn_reference(x, iters, eps), backend=backend),
    }
    if device.type == "cuda" and triton_available():
        impls["triton"] = lambda x: sinkhorn(x, iters, eps, kernel="triton")
    return impls


def minimal_traffic(logits: torch.Tensor) -> int:
    """Bytes a fused forward + backward must move: logits in, fp32 comb out; logits and grad in, grad out."""
    entries = logits.numel()
    return entries * (logits.element_size() + 4 + logits.element_size() + 4 + logits.element_size())


def run(tokens: int, n: int, args, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    logits = (torch.randn(tokens, n, n, device=device) * 3).to(getattr(torch, args.dtype)).requires_grad_()
    grad = torch.randn(tokens, n, n, device=device)
    impls = implementations(device, args.iters, args.eps, args.compile_backend)
    return compare(impls, logits, grad, minimal_traffic(logits), args.warmup, args.repeat, tokens=tokens)


def build_parser():
    parser = comparison_parser(__doc__)
    parser.add_argument("--eps", type=float, default=1e-6)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return parser


def main() -> None:
    args = build_parser().parse_args()
    device = pick_device(args.device)
    report(f"sinkhorn forward + backward, n={args.n}, iters={args.iters}, {args.dtype} logits", args, device,
           lambda tokens: run(tokens, args.n, args, device))


if __name__ == "__main__":
    main()
