"""One mHC sublayer's residual mixing, forward + backward: eager PyTorch vs torch.compile vs Triton.

    python benchmarks/mhc_layer.py                                  # 64K and 1M tokens, n = 4, width 1024
    python benchmarks/mhc_layer.py --tokens 65536 --dim 256 --device cpu --repeat 3

The mixer of docs/residual.md around an identity branch, so that only the mixing is measured: the
coefficient generator (RMS, the matmul with `fn`, the epilogue with the Sinkhorn), the read and
the post + residual write. Implementations:
  eager     `residual.kernel=torch`: the PyTorch path
  compile   torch.compile (inductor) of the PyTorch path
  triton    `residual.kernel=triton`: the fused epilogue and apply kernels (only on a GPU)

Per implementation: the median time of one forward + backward, the speedup over `eager` (same run), the
memory autograd keeps for backward, on a GPU the peak memory of the call and the effective bandwidth:
the ideal traffic (streams read and written once forward, gradient in, streams and gradient out
backward: 5 passes over (tokens, n, dim)) over the time, as a fraction of the device's nominal peak.
"""

from __future__ import annotations

import torch

from common import compare, comparison_parser, pick_device, report
from mhc_lm.kernels import triton_available
from mhc_lm.residual import make_mixer


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def implementations(args, device: torch.device) -> dict:
    def mixer(kernel: str):
        torch.manual_seed(0)
        return make_mixer("mhc", args.dim, args.n, 0, kernel=kernel, sinkhorn_iters=args.iters).to(device)

    eager = mixer("torch")
    impls = {"eager": lambda x: eager(x, identity),
             "compile": torch.compile(lambda x: eager(x, identity), backend=args.compile_backend)}
    if device.type == "cuda" and triton_available():
        fused = mixer("triton")
        impls["triton"] = lambda x: fused(x, identity)
    return impls


def run(tokens: int, args, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    streams = torch.randn(tokens, args.n, args.dim, device=device, dtype=getattr(torch, args.dtype))
    ideal_traffic = 5 * streams.numel() * streams.element_size()
    return compare(implementations(args, device), streams.requires_grad_(), torch.randn_like(streams),
                   ideal_traffic, args.warmup, args.repeat, tokens=tokens)


def build_parser():
    parser = comparison_parser(__doc__)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the streams' dtype (float32 in our bf16-autocast training)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    device = pick_device(args.device)
    report(f"mhc mixer forward + backward, n={args.n}, dim={args.dim}, {args.dtype} streams", args, device,
           lambda tokens: run(tokens, args, device))


if __name__ == "__main__":
    main()
