"""Everything the GPU path still has to prove, in one command: tests, kernels, benchmarks, training, compile.

    python benchmarks/gpu_check.py --prepare                     # beforehand, with a package registry: .whl/
    PYTHONPATH=. python benchmarks/gpu_check.py                  # on one H100/H200-class GPU: within 8 minutes
    python benchmarks/gpu_check.py --dry-run                     # the same steps on CPU (Triton interpreter)

Steps, each recorded on its own (a failure does not stop the others; the exit status is 1 if any failed):

  gpu_tests   `pytest -m gpu tests`
  kernels     every kernel, forward and backward, fp32 and bf16, n in {2, 3, 4, 8}, ragged shapes, logits up
              to |50|: its error against an fp64 reference, next to the PyTorch path's error on the same input
              (`mhc_lm.kernels.selfcheck.compare_kernels`)
  benchmarks  benchmarks/sinkhorn.py, mhc_layer.py and train_step.py (12 x 1024, kernel=triton vs torch vs
              torch.compile), the achieved bandwidth as a fraction of the device's peak, BENCHMARKS.md's
              targets marked met or not met (a target not met is reported, not a failure)
  train       100 steps of train.py in bf16 with residual=mhc and the kernels (and
              trainer.activation_checkpointing=mhc where the option exists), logger=none: the loss falls;
              tokens/s, MFU and peak memory
  compile     torch.compile(fullgraph=True) of the whole model with the kernels: no graph break, the same loss

The report goes to `--out` (default runs/gpu_check-<time>), printed first: report.md and report.json,
rewritten after every step, so a run cut short still leaves what it measured.

`--dry-run` runs every step on CPU under TRITON_INTERPRET=1 with tiny shapes and a few steps: it proves the
script, not the GPU (no Triton rows in the benchmarks: the interpreter measures nothing about speed).
On the GPU machine the script first installs, offline, what the image lacks (benchmarks/offline_wheels.py).
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv[1:]:  # Triton reads this when a kernel is defined: before anything imports mhc_lm
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import offline_wheels  # noqa: E402  (standard library only)
STEPS = ("gpu_tests", "kernels", "benchmarks", "train", "compile")
BUDGET_S = 480  # the whole check on one H100/H200-class GPU

# The steps live in gpu_check_steps.py; their helpers are re-exported for the tests.
from gpu_check_steps import (DRY, GPU, ROOT, Context, Result, StepFailed, bandwidth_columns,  # noqa: E402,F401
                             judge, kernel_targets, pytest_summary, step_benchmarks, step_compile, step_gpu_tests,
                             step_kernels, step_train, summarize_training, train_overrides)

def machine_line(ctx: Context) -> str:
    from common import machine

    return machine(ctx.device)


def render_markdown(header: dict, results: list[Result]) -> str:
    lines = [f"# gpu_check report ({'dry run on CPU' if header['dry_run'] else 'GPU'})", "",
             f"- command: `{header['command']}`", f"- machine: {header['machine']}", f"- started: {header['started']}",
             f"- overall: **{header['overall']}**",
             f"- time: {header['seconds']:.0f} s (budget on a GPU: {BUDGET_S} s)",
             ""]
    for r in results:
        lines += [f"## {r.name}: {r.status.upper()} ({r.seconds:.1f} s)", ""]
        if r.summary:
            lines += [r.summary, ""]
        if r.error:
            lines += [f"**Failure:** {r.error}", ""]
        for table in r.tables:
            lines += [f"**{table['title']}**", "", "| " + " | ".join(table["columns"]) + " |",
                      "|" + "---|" * len(table["columns"])]
            lines += ["| " + " | ".join(str(row[c]).replace("|", "\\|") for c in table["columns"]) + " |"
                      for row in table["rows"]]
            lines.append("")
    return "\n".join(lines)


def write_report(out: Path, header: dict, results: list[Result]) -> None:
    failed = [r.name for r in results if r.status != "pass"]
    header = {**header, "overall": f"FAIL ({', '.join(failed)})" if failed else "PASS",
              "seconds": sum(r.seconds for r in results)}
    (out / "report.json").write_text(json.dumps({**header, "steps": [r.__dict__ for r in results]}, indent=1))
    (out / "report.md").write_text(render_markdown(header, results))


def run_step(name: str, step: Callable, ctx: Context) -> Result:
    result = Result(name)
    started = time.perf_counter()
    try:
        step(ctx, result)
    except StepFailed as err:
        result.status, result.error = "fail", str(err)
    except Exception as err:  # an unexpected error in one step must not cost the others
        result.status, result.error = "fail", f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"
        result.tables.append({"title": "traceback", "columns": ["traceback"],
                              "rows": [{"traceback": traceback.format_exc().replace("\n", " <br> ")}]})
    result.seconds = time.perf_counter() - started
    print(f"gpu_check: {name}: {result.status.upper()} in {result.seconds:.1f} s"
          + (f": {result.error}" if result.error else f": {result.summary}"), flush=True)
    return result


STEP_FUNCTIONS = dict(gpu_tests=step_gpu_tests, kernels=step_kernels, benchmarks=step_benchmarks, train=step_train,
                      compile=step_compile)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on CPU under TRITON_INTERPRET=1, tiny shapes")
    parser.add_argument("--prepare", action="store_true",
                        help="download the wheels the GPU image lacks into --wheel-dir (needs a package registry)")
    parser.add_argument("--wheel-dir", type=Path, default=offline_wheels.WHEEL_DIR)
    parser.add_argument("--python-version", default=offline_wheels.TARGET["python_version"],
                        help="with --prepare: the GPU machine's Python (the image's is 3.12)")
    parser.add_argument("--out", type=Path, default=None, help="report directory (default runs/gpu_check-<time>)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    args = parser.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown or not args.steps:
        parser.exit(2, f"gpu_check: --steps={','.join(unknown) or '(none)'}: allowed: {', '.join(STEPS)}\n")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    wheel_dir = args.wheel_dir if args.wheel_dir.is_absolute() else ROOT / args.wheel_dir
    if args.prepare:
        offline_wheels.prepare(wheel_dir, python_version=args.python_version)
        return 0
    offline_wheels.ensure(wheel_dir)  # before anything imports torch, hydra or datasets

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU, or rehearse it with --dry-run", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = (args.out or ROOT / "runs" / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: report directory {out}", flush=True)
    ctx = Context(out, torch.device("cpu" if args.dry_run else "cuda"), args.dry_run, DRY if args.dry_run else GPU)
    header = {"command": " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine_line(ctx), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": args.dry_run}
    results: list[Result] = []
    for name in args.steps:
        results.append(run_step(name, STEP_FUNCTIONS[name], ctx))
        write_report(out, header, results)
    failed = [r.name for r in results if r.status != "pass"]
    print(f"gpu_check: {'FAIL: ' + ', '.join(failed) if failed else 'PASS'} | report: {out / 'report.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
