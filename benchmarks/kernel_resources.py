"""Compile every Triton kernel for a GPU architecture without a GPU, and report its resources.

    python benchmarks/kernel_resources.py                      # sm_90 (H100), n = 2, 3, 4, 8, 20 iterations
    python benchmarks/kernel_resources.py --arch 80 --n 4      # A100, n = 4 only

For each kernel at the launch configuration the dispatcher uses: registers per thread, stack bytes
(register spills to local memory; 0 is the goal) and compile time. Triton's interpreter, which the
CPU tests use, runs the kernels' Python code and cannot catch what only the compiler rejects; this
does (the test suite runs it with `--iters 2 --check`). Uses the ptxas and cuobjdump bundled with
triton, no CUDA driver.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile the real kernels, not the interpreted ones
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
CACHE = tempfile.mkdtemp(prefix="mhc-triton-cache-")
os.environ["TRITON_CACHE_DIR"] = CACHE  # a fresh cache: the compile times are real

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mhc_lm.kernels import glue  # noqa: E402
from mhc_lm.kernels import sinkhorn as ks  # noqa: E402

F32, BF16 = "*fp32", "*bf16"


def sinkhorn_kernels(n: int, iters: int):
    bt, warps = ks.launch_config(n)
    meta = dict(n=n, NP=triton.next_power_of_2(n), BT=bt)
    scalars = {"N": "i32", "eps": "fp32"}
    back = {**meta, "ITERS": iters, "SEG": ks.segment(iters)}
    coeff_in = dict.fromkeys(["mixes_ptr", "r_ptr", "scale_ptr", "base_ptr"], F32)
    return warps, [
        (ks._sinkhorn_fwd_kernel, {"logits_ptr": BF16, "comb_ptr": F32, **scalars}, {**meta, "ITERS": iters}),
        (ks._sinkhorn_bwd_kernel, {"logits_ptr": BF16, "grad_comb_ptr": F32, "grad_logits_ptr": BF16, **scalars}, back),
        (ks._coefficients_fwd_kernel,
         {**coeff_in, **dict.fromkeys(["pre_ptr", "post_ptr", "comb_ptr"], F32), **scalars, "hc_eps": "fp32"},
         {**meta, "ITERS": iters}),
        (ks._coefficients_bwd_kernel,
         {**coeff_in, **dict.fromkeys(["grad_pre_ptr", "grad_post_ptr", "grad_comb_ptr", "grad_mixes_ptr",
                                       "grad_r_ptr", "grad_scale_ptr", "grad_base_ptr"], F32), **scalars}, back),
    ]


def glue_kernels(n: int):
    bt, bc = glue.blocks(n)
    meta = dict(n=n, NP=triton.next_power_of_2(n), BT=bt, BC=bc)
    sizes = {"N": "i32", "C": "i32", "stride_xt": "i64", "stride_xn": "i64"}
    write_in = {"x_ptr": BF16, "out_ptr": BF16, "h_ptr": F32, "comb_ptr": F32}
    return 4, [
        (glue._read_fwd_kernel, {"x_ptr": BF16, "h_ptr": F32, "y_ptr": BF16, **sizes}, meta),
        (glue._read_bwd_kernel,
         {"x_ptr": BF16, "h_ptr": F32, "grad_y_ptr": BF16, "grad_x_ptr": BF16, "grad_h_ptr": F32, **sizes}, meta),
        (glue._write_fwd_kernel, {**write_in, "y_ptr": BF16, **sizes, "stride_ot": "i64"}, meta),
        (glue._write_bwd_kernel,
         {**write_in, "grad_y_ptr": BF16, "grad_x_ptr": BF16, "grad_out_ptr": BF16, "grad_h_ptr": F32,
          "grad_comb_ptr": F32, **sizes, "stride_ot": "i64"}, meta),
    ]


def resources(cubin: bytes) -> dict[str, int]:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK|SHARED):(\d+)", usage)}


def compile_one(kernel, signature, constexprs, warps, arch):
    src = ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    parser.add_argument("--n", type=int, nargs="+", default=[2, 3, 4, 8], help="numbers of streams")
    parser.add_argument("--iters", type=int, default=20, help="Sinkhorn iterations (unrolled in the backward)")
    parser.add_argument("--check", action="store_true", help="only compile; exit 1 on the first failure")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, target sm_{args.arch}, sinkhorn iters {args.iters}")
    print(f"{'kernel':26s} {'n':>2s} {'tile':>12s} {'warps':>5s} {'regs':>5s} {'stack B':>7s} {'compile s':>9s}")
    for n in args.n:
        for warps, kernels in (sinkhorn_kernels(n, args.iters), glue_kernels(n)):
            for kernel, signature, constexprs in kernels:
                started = time.perf_counter()
                compiled = compile_one(kernel, signature, constexprs, warps, args.arch)
                seconds = time.perf_counter() - started
                if args.check:
                    print(f"{kernel.__name__:26s} {n:2d} compiled in {seconds:.1f}s", flush=True)
                    continue
                usage = resources(compiled.asm["cubin"])
                tile = f"{constexprs['BT']} tok" + (f" x {constexprs['BC']}" if "BC" in constexprs else "")
                print(f"{kernel.__name__:26s} {n:2d} {tile:>12s} {warps:5d} {usage.get('reg', -1):5d} "
                      f"{usage.get('stack', -1):7d} {seconds:9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        shutil.rmtree(CACHE, ignore_errors=True)
