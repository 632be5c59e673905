"""Activation memory and step time of the plain residual and mHC (n = 4), or any residual, under each recompute policy.

    python benchmarks/activation_memory.py                             # GPU: 12 x 1024 and the small model
    nice python benchmarks/activation_memory.py --device cpu --batch 1 --seq-len 128 --vocab 4096 --steps 3 \
        --threads 1 --selective                                        # CPU, beside the selective rule

For each model (12 layers x d_model 1024, and the default model=small of conf/), each residual (`--residuals`:
the plain residual and mHC, or any of conf/residual/ with its default n, or `all`) and each
`trainer.activation_checkpointing` (none | mhc | full): the activation bytes per token (the storages kept
alive after a training forward, `mhc_lm.activations`: device-independent), on a GPU also the peak of
`torch.cuda.max_memory_allocated` over a step, and the median forward + backward time (on CPU: the
process's CPU time, steadier than the wall clock on a shared machine). Ratios from this
one run: bytes against the plain residual without recompute, bytes and time against the same residual
without recompute. Targets: mHC with `mhc` at most 1.15x the residual's bytes (none) and within 1.10x of
mHC's step time (none); `full` at most 0.35x of the bytes without recompute. `--selective` adds a row
`mhc-sac`: `mhc` under the selective checkpoint rule (keep matmul and attention outputs, recompute the rest:
the rule torch.compile's trace uses, and eager `mhc` before 2026-12-02) run eagerly, to compare in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

from common import machine, mib, peak_memory, pick_device, print_table, timed

CONF = Path(__file__).resolve().parent.parent / "conf"


def conf_model(name: str) -> dict:
    """A model of conf/model/ (the one train.py builds with model=<name>)."""
    from omegaconf import OmegaConf

    model = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    return dict(hidden_size=model.d_model, num_hidden_layers=model.n_layers, num_attention_heads=model.n_heads)


def conf_residual(name: str) -> dict:
    """A residual of conf/residual/ with its defaults (n, collapse, inits), as train.py's residual=<name>."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(CONF / "residual" / f"{name}.yaml"))


MODELS = {"12x1024": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16),
          "small": conf_model("small")}  # the default model (4 x 128 today)
RESIDUALS = ("residual", "mhc")
POLICIES = ("none", "mhc", "full")


def build(model: str, residual: str, policy: str, args, device):
    from mhc_lm.model import MhcConfig, MhcForCausalLM

    torch.manual_seed(0)
    config = MhcConfig(vocab_size=args.vocab, max_position_embeddings=args.seq_len, **MODELS[model],
                       residual={**conf_residual(residual), "kernel": args.kernel},
                       activation_checkpointing=policy.removesuffix("-sac"))
    return MhcForCausalLM(config).to(device).train()


def rule(policy: str):
    """`mhc-sac`: the `mhc` groups under the selective checkpoint rule, eagerly; otherwise as configured."""
    if policy != "mhc-sac":
        return contextlib.nullcontext()
    from mhc_lm.residual import recompute

    return mock.patch.object(recompute, "_glue_checkpoint", recompute._selective_checkpoint)


def step_fn(net, batch, policy, args, device):
    def step():
        net.zero_grad(set_to_none=True)
        with rule(policy):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = net(batch, labels=batch).loss
            loss.backward()
    return step


def measure(model: str, residual: str, args, device) -> list[dict]:
    """One row per policy. The steps are timed round-robin (policy after policy, `--steps` rounds), so a
    shared machine's load drifts into every policy alike."""
    from mhc_lm.activations import activation_bytes

    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
    policies = POLICIES + ("mhc-sac",) if args.selective else POLICIES
    nets = {policy: build(model, residual, policy, args, device) for policy in policies}
    steps = {policy: step_fn(net, batch, policy, args, device) for policy, net in nets.items()}
    rows = []
    for policy, net in nets.items():
        with rule(policy), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            kept = activation_bytes(net, batch) / batch.numel()
        rows.append({"model": model, "residual": residual, "policy": policy, "_bytes": kept,
                     "KiB/token": f"{kept / 1024:,.1f}", "peak MiB": mib(peak_memory(steps[policy], device))})
    times = round_robin(list(steps.values()), device, args)
    for row, seconds in zip(rows, times):
        row["_s"], row["ms/step"] = seconds, f"{seconds * 1e3:,.0f}"
    return rows


def round_robin(steps, device, args) -> list[float]:
    """Median seconds of each step over `args.steps` rounds, after `args.warmup` rounds. On CPU the seconds
    are this process's CPU time (all its threads), which other jobs on a shared machine disturb less
    than the wall clock."""
    times = [[] for _ in steps]
    for _ in range(args.warmup + args.steps):
        for i, step in enumerate(steps):
            times[i].append(timed(step, device, 0, 1) if device.type == "cuda" else cpu_seconds(step))
    return [statistics.median(t[args.warmup:]) for t in times]


def cpu_seconds(step) -> float:
    started = time.process_time()
    step()
    return time.process_time() - started


def add_ratios(rows: list[dict]) -> None:
    """Bytes vs the residual without recompute, bytes and time vs the same residual without recompute."""
    base = {(r["model"], r["residual"]): r for r in rows if r["policy"] == "none"}
    for row in rows:
        plain, same = base[(row["model"], "residual")], base[(row["model"], row["residual"])]
        row["vs residual none"] = f"{row['_bytes'] / plain['_bytes']:.3f}x"
        row["bytes vs none"] = f"{row['_bytes'] / same['_bytes']:.3f}x"
        row["time vs none"] = f"{row['_s'] / same['_s']:.3f}x"


def residuals(names: list[str]) -> list[str]:
    known = sorted(p.stem for p in (CONF / "residual").glob("*.yaml"))
    names = known if names == ["all"] else names
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"error: --residuals {' '.join(unknown)}: not in conf/residual; allowed: all, {', '.join(known)}")
    return ["residual", *[n for n in names if n != "residual"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--residuals", nargs="+", default=list(RESIDUALS),
                        help="residual configs of conf/residual/ (their default n), or `all`; `residual` is "
                             "always measured first: the ratios are against it")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--kernel", default="auto", choices=["auto", "triton", "torch"])
    parser.add_argument("--bf16", action="store_true", help="autocast bf16 (the GPU training precision)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 on a shared machine: CPU time then counts no idle spinning)")
    parser.add_argument("--selective", action="store_true", help="add the row mhc-sac (see the docstring)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    print(f"# {machine(device)}")
    print(f"# batch {args.batch} x {args.seq_len} tokens, vocab {args.vocab}, bf16 {args.bf16}, "
          f"kernel {args.kernel}, median of {args.steps} steps after {args.warmup}")
    rows = [row for m in args.models for r in residuals(args.residuals) for row in measure(m, r, args, device)]
    add_ratios(rows)
    print_table(rows, ["model", "residual", "policy", "KiB/token", "vs residual none", "bytes vs none", "peak MiB",
                       "ms/step", "time vs none"])


if __name__ == "__main__":
    main()
