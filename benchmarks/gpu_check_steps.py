"""The steps of benchmarks/gpu_check.py (its report and command line stay there): what each checks on
the GPU, or on the CPU under TRITON_INTERPRET=1 with `--dry-run` (gpu_check.py sets that before this
module is imported)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import offline_wheels  # standard library only

ROOT = offline_wheels.ROOT
if str(ROOT) not in sys.path:  # mhc_lm and train.py from this checkout, with or without PYTHONPATH=.
    sys.path.insert(1, str(ROOT))


@dataclass(frozen=True)
class Plan:
    """The shapes and counts of one kind of run: the GPU's, or the dry run's tiny ones."""

    tests_timeout: int
    kernel_tokens: int  # ragged: not a multiple of any kernel's block
    kernel_width: int
    sinkhorn_tokens: tuple[int, ...]
    layer_tokens: tuple[int, ...]
    layer_dim: int
    kernel_magnitudes: tuple[float, ...]  # the largest |logit| (and mix) of each comparison
    bench_warmup: int
    bench_repeat: int
    compile_backend: str  # the benchmarks' torch.compile rows (inductor's C++ build takes minutes on a small CPU)
    step_args: tuple[str, ...]  # benchmarks/train_step.py options
    train_overrides: tuple[str, ...]
    train_timeout: int
    compile_model: dict = field(default_factory=dict)
    compile_batch: tuple[int, int] = (2, 64)


GPU = Plan(
    # One token count per benchmark: each new shape is another inductor compilation out of the 8 minutes.
    tests_timeout=240, kernel_tokens=4099, kernel_width=1031, sinkhorn_tokens=(1048576,),
    layer_tokens=(262144,), layer_dim=1024, kernel_magnitudes=(1.0, 50.0), bench_warmup=2, bench_repeat=10,
    compile_backend="inductor",
    step_args=("--batch", "8", "--seq-len", "1024", "--warmup", "2", "--steps", "10"),
    train_overrides=("model=base", "data.seq_len=1024", "trainer.batch_size=16", "trainer.max_steps=100",
                     "trainer.log_every=10", "optim.warmup_steps=10"),
    train_timeout=300,
    compile_model=dict(d_model=256, n_layers=4, n_heads=4), compile_batch=(4, 256),
)
DRY = Plan(
    tests_timeout=120, kernel_tokens=37, kernel_width=40, sinkhorn_tokens=(256,), layer_tokens=(64,), layer_dim=32,
    kernel_magnitudes=(50.0,), bench_warmup=1, bench_repeat=1, compile_backend="eager",
    step_args=("--batch", "1", "--seq-len", "16", "--vocab", "256", "--d-model", "32", "--layers", "1", "--heads",
               "2", "--warmup", "1", "--steps", "1"),
    # Few tokens per step: the interpreter runs a kernel's programs one after the other.
    train_overrides=("model=tiny", "model.n_layers=1", "data.seq_len=16", "data.vocab_size=512", "trainer.batch_size=2",
                     "trainer.max_steps=6", "trainer.log_every=1", "optim.warmup_steps=2", "trainer.eval_batches=1"),
    train_timeout=600,
    compile_model=dict(d_model=32, n_layers=1, n_heads=2), compile_batch=(1, 16),
)


class StepFailed(Exception):
    """A step ran and found something wrong (the message is the report's one line)."""


@dataclass
class Context:
    out: Path
    device: object  # torch.device
    dry_run: bool
    plan: Plan

    @property
    def gpu_name(self) -> str:
        import torch

        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"


@dataclass
class Result:
    name: str
    status: str = "pass"  # pass | fail
    seconds: float = 0.0
    summary: str = ""
    tables: list = field(default_factory=list)  # [{"title", "columns", "rows"}]
    error: str = ""

    def table(self, title: str, rows: list[dict], columns: list[str] | None = None) -> None:
        if columns is None:  # every column but the raw numbers kept for computing (`_s`, `_bw`, ...)
            columns = [k for k in rows[0] if not k.startswith("_")] if rows else []
        self.tables.append({"title": title, "columns": columns,
                            "rows": [{c: row.get(c, "-") for c in columns} for row in rows]})


# ---------------------------------------------------------------------------------------------
# gpu_tests


def pytest_summary(output: str) -> str:
    """pytest's closing line (`3 passed, 1 skipped in 2.1s`), without its `=` rule."""
    lines = [line.strip("= ").strip() for line in output.strip().splitlines() if line.strip()]
    words = ("passed", "failed", "skipped", "deselected", "error", "no tests")
    closing = [line for line in lines if " in " in line and any(w in line for w in words)]
    return closing[-1] if closing else (lines[-1] if lines else "")


def run_logged(command: list[str], log: Path, timeout: int, what: str) -> subprocess.CompletedProcess:
    """Run `command` in the checkout, its output to `log`; past `timeout` seconds a StepFailed, not a traceback."""
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        as_text = (lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or ""))
        log.write_text(as_text(err.stdout) + as_text(err.stderr))
        raise StepFailed(f"{what} did not finish within {timeout} s (log: {log.name})") from None
    log.write_text(done.stdout + done.stderr)
    return done


def step_gpu_tests(ctx: Context, result: Result) -> None:
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    done = run_logged(command, ctx.out / "gpu_tests.log", ctx.plan.tests_timeout, "pytest -m gpu")
    result.summary = f"`pytest -m gpu tests`: {pytest_summary(done.stdout)} (log: gpu_tests.log)"
    # Without a GPU every gpu test is skipped (exit 0); a failure, an error or nothing collected (5) fails the step.
    if done.returncode != 0:
        raise StepFailed(f"pytest exited {done.returncode}: {pytest_summary(done.stdout)}")


# ---------------------------------------------------------------------------------------------
# kernels

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # relative to each output's largest entry, against fp64
WORSE_THAN_PYTORCH = 2.0  # above the tolerance, a kernel may still be at most this much worse than the PyTorch path


def pytorch_ops() -> dict[str, Callable]:
    """The PyTorch path of each kernel (what `residual.kernel=torch` runs), with the kernels' signatures."""
    from mhc_lm.kernels.selfcheck import coefficients_fp64
    from mhc_lm.residual.base import read_streams, write_streams
    from mhc_lm.residual.sinkhorn import sinkhorn

    def torch_sinkhorn(logits, iters, eps):
        return sinkhorn(logits, iters, eps, kernel="torch")

    def torch_coefficients(mixes, r, scale, base, n, iters, eps, hc_eps):
        return coefficients_fp64(mixes, r, scale, base, n, iters, eps, hc_eps, project=torch_sinkhorn)

    return dict(sinkhorn=torch_sinkhorn, mhc_coefficients=torch_coefficients, read_streams=read_streams,
                write_streams=write_streams)


def judge(kernel_error: float, pytorch_error: float, dtype: str) -> bool:
    """Within the dtype's tolerance, or no worse than the PyTorch path's own rounding on this input (finite)."""
    if not kernel_error < float("inf"):  # NaN or inf: never, whatever the PyTorch path did
        return False
    relative = pytorch_error < float("inf") and kernel_error <= WORSE_THAN_PYTORCH * pytorch_error
    return kernel_error <= TOLERANCE[dtype] or relative


def step_kernels(ctx: Context, result: Result) -> None:
    import torch

    from mhc_lm.kernels.selfcheck import compare_kernels, kernel_ops

    kernels, reference_path = kernel_ops(), pytorch_ops()
    rows, failed = [], []
    for dtype in ("float32", "bfloat16"):
        for n in (2, 3, 4, 8):
            for magnitude in ctx.plan.kernel_magnitudes:
                shape = dict(n=n, dtype=getattr(torch, dtype), tokens=ctx.plan.kernel_tokens,
                             width=ctx.plan.kernel_width, magnitude=magnitude)
                ours = compare_kernels(ctx.device, ops=kernels, **shape)
                theirs = compare_kernels(ctx.device, ops=reference_path, **shape)
                for check, error in ours.items():
                    ok = judge(error, theirs[check], dtype)
                    rows.append({"dtype": dtype, "n": n, "max logit": f"{magnitude:g}", "check": check,
                                 "kernel error": f"{error:.1e}", "PyTorch error": f"{theirs[check]:.1e}",
                                 "ok": "yes" if ok else "NO"})
                    if not ok:
                        failed.append(f"{check} ({dtype}, n={n}, |logits|<={magnitude:g}): {error:.1e}")
    result.table(f"Kernels vs fp64, {ctx.plan.kernel_tokens} tokens x {ctx.plan.kernel_width} channels "
                 f"(tolerance fp32 {TOLERANCE['float32']:.0e}, bf16 {TOLERANCE['bfloat16']:.0e}, or at most "
                 f"{WORSE_THAN_PYTORCH:g}x the PyTorch path's error)", rows)
    result.summary = f"{len(rows) - len(failed)} of {len(rows)} comparisons within tolerance"
    if failed:
        raise StepFailed(f"{len(failed)} comparisons out of tolerance, first: {failed[0]}")


# ---------------------------------------------------------------------------------------------
# benchmarks

TARGET_SPEEDUP, TARGET_BANDWIDTH, TARGET_THROUGHPUT = 10.0, 0.50, 0.90  # BENCHMARKS.md's targets


def bandwidth_columns(rows: list[dict], gpu_name: str) -> None:
    """Achieved TB/s and the fraction of the device's nominal peak (`unknown` for a GPU not in the table)."""
    from common import peak_bandwidth_by_name

    peak = peak_bandwidth_by_name(gpu_name) if gpu_name != "cpu" else None
    for row in rows:
        row["TB/s"] = f"{row['_bw'] / 1e12:.3f}"
        row["of peak"] = f"{row['_bw'] / peak:.0%}" if peak else ("unknown" if gpu_name != "cpu" else "-")
        row["_of_peak"] = row["_bw"] / peak if peak else None


def kernel_targets(what: str, rows: list[dict]) -> list[dict]:
    """The speedup and bandwidth targets, judged on the largest token count's triton row."""
    largest = [r for r in rows if r["tokens"] == max(r["tokens"] for r in rows)]
    eager = next(r for r in largest if r["impl"] == "eager")
    triton = next((r for r in largest if r["impl"] == "triton"), None)
    if triton is None:
        why = "not measured (no triton row: no GPU)"
        return [{"target": f"{what}: triton >= {TARGET_SPEEDUP:g}x eager", "value": "-", "status": why},
                {"target": f"{what}: triton >= {TARGET_BANDWIDTH:.0%} of peak bandwidth", "value": "-", "status": why}]
    speedup = eager["_s"] / triton["_s"]
    fraction = triton["_of_peak"]
    return [{"target": f"{what}: triton >= {TARGET_SPEEDUP:g}x eager", "value": f"{speedup:.1f}x",
             "status": "met" if speedup >= TARGET_SPEEDUP else "not met"},
            {"target": f"{what}: triton >= {TARGET_BANDWIDTH:.0%} of peak bandwidth",
             "value": "unknown peak" if fraction is None else f"{fraction:.0%}",
             "status": "unknown (GPU not in the peak table)" if fraction is None else
             ("met" if fraction >= TARGET_BANDWIDTH else "not met")}]


def run_kernel_benchmark(module, extra: list[str], tokens: tuple[int, ...], ctx: Context, run: Callable) -> list[dict]:
    plan = ctx.plan
    args = module.build_parser().parse_args(["--tokens", *map(str, tokens), "--warmup", str(plan.bench_warmup),
                                             "--repeat", str(plan.bench_repeat), "--device", ctx.device.type,
                                             "--compile-backend", plan.compile_backend, *extra])
    rows = [row for t in args.tokens for row in run(t, args)]
    bandwidth_columns(rows, ctx.gpu_name)
    return rows


def train_step_rows(ctx: Context) -> list[dict]:
    """tokens/s of the 12 x 1024 training step: the residual, then mHC with triton, torch and torch.compile."""
    import train_step as bench

    runs = (("residual", "auto", False), ("mhc", "triton", False), ("mhc", "torch", False), ("mhc", "torch", True))
    rows = []
    for residual, kernel, compiled in runs:
        args = bench.build_parser().parse_args([*ctx.plan.step_args, "--device", ctx.device.type, "--compile-backend",
                                                ctx.plan.compile_backend, *(["--compile"] if compiled else [])])
        rate, n_params = bench.tokens_per_second(bench.residual_config(residual, kernel), args, ctx.device)
        label = kernel + (f" + compile ({args.compile_backend})" if compiled else "")
        rows.append({"residual": residual, "kernel": label,
                     "params M": f"{n_params / 1e6:.1f}", "tokens/s": f"{rate:,.0f}", "_rate": rate})
    for row in rows:
        row["vs residual"] = f"{row['_rate'] / rows[0]['_rate']:.3f}"
    return rows


def step_benchmarks(ctx: Context, result: Result) -> None:
    import mhc_layer
    import sinkhorn as sinkhorn_bench

    plan = ctx.plan
    sink = run_kernel_benchmark(sinkhorn_bench, [], plan.sinkhorn_tokens, ctx,
                                lambda t, a: sinkhorn_bench.run(t, a.n, a, ctx.device))
    columns = ["tokens", "impl", "ms", "speedup", "saved MiB", "peak MiB", "TB/s", "of peak"]
    result.table("Sinkhorn forward + backward (benchmarks/sinkhorn.py), n = 4, 20 iterations, fp32", sink, columns)
    layer = run_kernel_benchmark(mhc_layer, ["--dim", str(plan.layer_dim)], plan.layer_tokens, ctx,
                                 lambda t, a: mhc_layer.run(t, a, ctx.device))
    result.table(f"One mHC sublayer's mixing (benchmarks/mhc_layer.py), n = 4, width {plan.layer_dim}, fp32 streams",
                 layer, columns)
    steps = train_step_rows(ctx)
    result.table(f"Training step (benchmarks/train_step.py {' '.join(plan.step_args)})", steps,
                 ["residual", "kernel", "params M", "tokens/s", "vs residual"])
    triton = next(r for r in steps if r["kernel"] == "triton")
    ratio = triton["_rate"] / steps[0]["_rate"]
    step_target = {"target": f"training step: mhc (triton) >= {TARGET_THROUGHPUT:.2f} of the residual's tokens/s",
                   "value": f"{ratio:.3f}", "status": ("met" if ratio >= TARGET_THROUGHPUT else "not met")
                   if ctx.device.type == "cuda" else "not measured (CPU, interpreted kernels)"}
    targets = [*kernel_targets("Sinkhorn", sink), *kernel_targets("mHC sublayer", layer), step_target]
    result.table("BENCHMARKS.md targets", targets, ["target", "value", "status"])
    met = sum(t["status"] == "met" for t in targets)
    result.summary = f"targets met: {met} of {len(targets)} (a target not met is reported, not a failure)"


# ---------------------------------------------------------------------------------------------
# train

# Runs train.py as __main__ and, at exit, writes the CUDA allocator's peaks (train.py itself does not log them).
TRAIN_WRAPPER = """
import atexit, json, runpy, sys
out = sys.argv.pop(1)
def peaks():
    import torch
    if torch.cuda.is_available():
        json.dump({"peak_allocated": torch.cuda.max_memory_allocated(),
                   "peak_reserved": torch.cuda.max_memory_reserved()}, open(out, "w"))
atexit.register(peaks)
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def trainer_options(root: Path = ROOT) -> set[str]:
    """The keys of conf/trainer/default.yaml (read as text: `key:` at the start of a line)."""
    text = (root / "conf" / "trainer" / "default.yaml").read_text()
    return {line.split(":", 1)[0].strip() for line in text.splitlines() if line[:1].isalpha() and ":" in line}


def train_overrides(ctx: Context, run_dir: Path, root: Path = ROOT) -> list[str]:
    overrides = ["residual=mhc", "residual.kernel=triton", "trainer.precision=bf16", "logger=none",
                 "logger.diag_every=0", "trainer.export=false", "trainer.ckpt_every=0", "trainer.resume=none",
                 f"trainer.eval_every={10**6}", f"hydra.run.dir={run_dir}",
                 *ctx.plan.train_overrides]
    if "activation_checkpointing" in trainer_options(root):
        overrides.append("trainer.activation_checkpointing=mhc")
    return overrides


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def summarize_training(metrics: list[dict], peaks: dict) -> dict:
    """Loss first and last, and the mean tokens/s and MFU over the logged steps after the first (compilation)."""
    logged = [m for m in metrics if "train/loss" in m]
    if len(logged) < 2:
        raise StepFailed(f"metrics.jsonl has {len(logged)} logged training steps, need at least 2")
    later = logged[1:]
    mean = (lambda key: sum(m[key] for m in later) / len(later) if all(key in m for m in later) else None)
    memory = {k: v for m in metrics for k, v in m.items() if "mem" in k}  # should train.py log it one day
    return {"first_loss": logged[0]["train/loss"], "last_loss": logged[-1]["train/loss"],
            "first_step": logged[0]["step"], "last_step": logged[-1]["step"],
            "tokens_per_s": mean("train/tokens_per_s"), "mfu": mean("train/mfu"),
            "peak_allocated_gib": peaks["peak_allocated"] / 2**30 if "peak_allocated" in peaks else None,
            "peak_reserved_gib": peaks["peak_reserved"] / 2**30 if "peak_reserved" in peaks else None,
            "val_loss": next((m["val/loss"] for m in reversed(metrics) if "val/loss" in m), None), **memory}


def step_train(ctx: Context, result: Result) -> None:
    run_dir = ctx.out / "train_run"
    peaks_file = ctx.out / "train_peak_memory.json"
    overrides = train_overrides(ctx, run_dir)
    command = [sys.executable, "-c", TRAIN_WRAPPER, str(peaks_file), *overrides]
    done = run_logged(command, ctx.out / "train.log", ctx.plan.train_timeout, "train.py")
    result.summary = f"`python train.py {' '.join(overrides)}`"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["(no output)"])[-1]
        raise StepFailed(f"train.py exited {done.returncode}: {last} (log: train.log)")
    peaks = json.loads(peaks_file.read_text()) if peaks_file.exists() else {}
    stats = summarize_training(read_metrics(run_dir / "metrics.jsonl"), peaks)
    fmt = (lambda v, spec: "-" if v is None else format(v, spec))
    result.table("train.py run", [{
        "steps": stats["last_step"], "loss first -> last": f"{stats['first_loss']:.3f} -> {stats['last_loss']:.3f}",
        "tokens/s": fmt(stats["tokens_per_s"], ",.0f"), "MFU": fmt(stats["mfu"], ".1%"),
        "peak allocated GiB": fmt(stats["peak_allocated_gib"], ".2f"),
        "peak reserved GiB": fmt(stats["peak_reserved_gib"], ".2f")}])
    result.summary += f"; activation checkpointing: {'yes' if any('activation' in o for o in overrides) else 'no'}"
    if not stats["last_loss"] < stats["first_loss"]:
        raise StepFailed(f"the loss did not fall: {stats['first_loss']:.4f} at step {stats['first_step']} -> "
                         f"{stats['last_loss']:.4f} at step {stats['last_step']}")


# ---------------------------------------------------------------------------------------------
# compile


def step_compile(ctx: Context, result: Result) -> None:
    import torch

    from mhc_lm.config import ModelConfig
    from mhc_lm.model import MhcForCausalLM, build_config

    residual = {"name": "mhc", "n": 4, "kernel": "triton"}
    model_cfg = ModelConfig(name="compile", max_seq_len=ctx.plan.compile_batch[1], **ctx.plan.compile_model)
    torch.manual_seed(0)
    model = MhcForCausalLM(build_config(model_cfg, residual_defaults(residual), 512, eos_token_id=0)).to(ctx.device)
    batch, seq = ctx.plan.compile_batch
    ids = torch.randint(0, 512, (batch, seq), device=ctx.device)
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.device.type == "cuda")

    def loss_of(fn):
        with autocast:
            loss = fn(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item()

    torch._dynamo.reset()
    with autocast:  # as training runs it; explain counts every break, fullgraph=True stops at the first
        explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    breaks = [str(getattr(b, "reason", b)).splitlines()[0] for b in explained.break_reasons]
    torch._dynamo.reset()
    # The CPU rehearsal traces with the eager backend (inductor's C++ build would take minutes on 2 cores).
    backend = "inductor" if ctx.device.type == "cuda" else "eager"
    eager_loss = loss_of(model)
    compiled_loss = loss_of(torch.compile(model, fullgraph=True, backend=backend))
    result.table("torch.compile of the whole model (mhc n = 4, residual.kernel=triton)", [{
        "model": f"{model_cfg.n_layers} x {model_cfg.d_model}", "backend": backend,
        "graphs": explained.graph_count, "graph breaks": explained.graph_break_count,
        "eager loss": f"{eager_loss:.5f}", "compiled loss": f"{compiled_loss:.5f}"}])
    result.summary = f"{explained.graph_break_count} graph breaks; fullgraph=True compiled and ran forward + backward"
    if explained.graph_break_count or breaks:
        raise StepFailed(f"{explained.graph_break_count} graph breaks, first: {breaks[0] if breaks else '?'}")
    if abs(compiled_loss - eager_loss) > 2e-2 * max(1.0, abs(eager_loss)):
        raise StepFailed(f"compiled loss {compiled_loss:.5f} differs from eager {eager_loss:.5f}")


def residual_defaults(overrides: dict) -> dict:
    """conf/residual/<name>.yaml with `overrides` on top (what a Hydra composition would give)."""
    import yaml

    shipped = yaml.safe_load((ROOT / "conf" / "residual" / f"{overrides['name']}.yaml").read_text())
    return {**shipped, **overrides}


# ---------------------------------------------------------------------------------------------
# Report and driver


