"""What the benchmark scripts share: the machine's description, timing, memory and bandwidth."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(ROOT))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def machine(device: torch.device) -> str:
    """One line naming the hardware and software the numbers come from."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hardware = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        hardware = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads " \
                   f"({os.cpu_count()} cores visible)"
    try:
        import triton

        kernels = f"triton {triton.__version__}"
    except ImportError:
        kernels = "no triton"
    return f"{hardware} | torch {torch.__version__} | {kernels} | python {platform.python_version()}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], device: torch.device, warmup: int, repeat: int) -> float:
    """Median wall time of `step` in seconds, after `warmup` untimed calls (compilation, autotuning, caches)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def peak_memory(step: Callable[[], None], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one call of `step` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def saved_for_backward(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps between forward and backward (the activation memory), any device."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


# Nominal memory bandwidth in bytes/s by device name, the most specific name first (vendor data sheets).
PEAK_BANDWIDTH = (
    ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),  # H100 SXM: "H100 80GB HBM3"
    ("A100 80GB PCIe", 1.935e12), ("A100-SXM4-80GB", 2.0e12), ("A100", 1.555e12),  # A100 40GB
    ("B200", 8.0e12), ("L40S", 0.864e12), ("L40", 0.864e12), ("A10G", 0.6e12), ("L4", 0.3e12), ("4090", 1.008e12),
)


def peak_bandwidth_by_name(name: str) -> float | None:
    """The nominal peak bandwidth of a device called `name` (torch.cuda.get_device_name), None when unknown."""
    return next((bandwidth for key, bandwidth in PEAK_BANDWIDTH if key in name), None)


def peak_bandwidth(device: torch.device) -> float | None:
    """The device's nominal memory bandwidth in bytes/s (PEAK_BANDWIDTH); None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    return peak_bandwidth_by_name(torch.cuda.get_device_name(device))


def mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:,.1f}"


def compare(impls: dict[str, Callable], x: torch.Tensor, grad: torch.Tensor, traffic: int, warmup: int,
            repeat: int, **labels) -> list[dict]:
    """Forward + backward of each implementation on leaf `x` with output gradient `grad`: the median time,
    the speedup over the first implementation (ratios from this one run), the memory kept for backward,
    on a GPU the call's peak memory and `traffic` bytes over the time as a fraction of peak bandwidth."""
    device = x.device
    peak_bw = peak_bandwidth(device)
    rows = []
    for name, fn in impls.items():
        def step():
            x.grad = None
            fn(x).backward(grad)

        seconds = timed(step, device, warmup, repeat)
        row = {**labels, "impl": name, "ms": f"{seconds * 1e3:,.2f}", "_s": seconds, "_bw": traffic / seconds,
               "saved MiB": mib(saved_for_backward(lambda: fn(x))), "peak MiB": mib(peak_memory(step, device))}
        if peak_bw:
            row["% peak BW"] = f"{100 * traffic / seconds / peak_bw:.1f}"
        rows.append(row)
    for row in rows:
        row["speedup"] = f"{rows[0]['_s'] / row['_s']:.2f}x"
    return rows


COLUMNS = ["impl", "ms", "speedup", "saved MiB", "peak MiB", "% peak BW"]


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, "-"))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "-")).rjust(widths[c]) for c in columns))


def comparison_parser(doc: str) -> argparse.ArgumentParser:
    """The options the eager / compile / triton comparisons share (sizes, device, repeats)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[65536, 1048576])
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--iters", type=int, default=20, help="Sinkhorn iterations")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend for the compile row (eager: dynamo alone, a quick rehearsal)")
    return parser


def report(title: str, args, device: torch.device, run: Callable[[int], list[dict]]) -> None:
    """Print the machine, what was measured, and one table row per (tokens, implementation)."""
    print(f"# {machine(device)}")
    print(f"# {title}, median of {args.repeat} after {args.warmup} warm-up")
    if device.type != "cuda":
        print("# no GPU: no triton column (Triton's CPU interpreter is not a speed measurement)")
    print_table([row for tokens in args.tokens for row in run(tokens)], ["tokens", *COLUMNS])
