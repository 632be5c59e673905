"""What do the diagnostics add to training time? (Issue 5: at most 3% at the default logger.diag_every.)

The same short run twice in one process, same model initialization and batches, through train.py's own
`train_step` and the loop's logging calls:

  base: train steps, the usual metrics every trainer.log_every steps;
  diag: the same, plus gradient norms every step (logged every step) and `log_diagnostics` (probe,
        JSON, PNGs, tracker) every logger.diag_every steps and at the end.

The two alternate (base, diag, base, diag, ...) so a busy machine slows both alike; the ratio of the
summed wall times is printed. Each part is timed too (every step, gradient-norm pass and diagnostics
call); their medians, robust to the spikes of a shared machine, give the overhead for other diag_every.

    python benchmarks/diagnostics_overhead.py                         # model=small, the default run's shapes
    python benchmarks/diagnostics_overhead.py --steps 100 model=tiny  # any train.py override
    python benchmarks/diagnostics_overhead.py --logger wandb          # with W&B offline (images, histograms)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import common  # noqa: F401  (puts the checkout on sys.path: train.py is a script at the root)
from mhc_lm.training import Backward, due, make_accelerator, train_step


def compose(overrides: list[str]):
    from mhc_lm.config import compose_config, validate

    cfg = compose_config(["trainer.run_name=bench", *overrides])
    validate(cfg)
    return cfg


class Bench:
    def __init__(self, cfg, logger: str, work: Path):
        from mhc_lm.data import prepare_data
        from mhc_lm.diagnostics import probe_batch
        from mhc_lm.model import build_config

        self.cfg, self.logger, self.work = cfg, logger, work
        if cfg.trainer.num_threads:
            torch.set_num_threads(cfg.trainer.num_threads)
        self.accelerator, self.grad_accum, _ = make_accelerator(cfg)
        self.data = prepare_data(cfg.data)
        vocab = cfg.model.vocab_size or \
            cfg.model.vocab_multiple * math.ceil(self.data.vocab_size / cfg.model.vocab_multiple)
        self.model_config = build_config(cfg.model, cfg.residual, vocab, self.data.eot_id)
        self.probe = probe_batch(self.data.validation, cfg.data.seq_len, cfg.logger.diag_batch_size)
        self.runs = 0

    def fresh(self):
        from accelerate.utils import set_seed

        from mhc_lm.data import BlockLoader
        from mhc_lm.model import MhcForCausalLM
        from mhc_lm.optim import build_optimizer

        set_seed(self.cfg.trainer.seed)
        model = MhcForCausalLM(self.model_config)
        model, optimizer = self.accelerator.prepare(model, build_optimizer(model, self.cfg.optim))
        tcfg = self.cfg.trainer
        loader = BlockLoader(self.data.train, self.cfg.data.seq_len, tcfg.batch_size, tcfg.seed)
        return model, optimizer, loader

    def tracker(self):
        from mhc_lm.config import LoggerConfig
        from mhc_lm.tracking import Tracker

        self.runs += 1
        run_dir = self.work / f"run{self.runs}"
        run_dir.mkdir()
        return Tracker(LoggerConfig(backend=self.logger, mode="offline"), run_dir, {}, enabled=True), run_dir

    def batches(self, loader):
        return [loader.next_batch() for _ in range(self.grad_accum)]

    def run(self, steps: int, every: int, diagnostics: bool) -> dict[str, list[float]]:
        """`steps` optimizer steps as train.py's loop runs them, with or without diagnostics.

        Returns the wall seconds of the whole run and of each part: every step (train_step and the
        per-step logging), every gradient-norm pass, every diagnostics call.
        """
        from mhc_lm.diagnostics import GradNorms, log_diagnostics
        from mhc_lm.optim import lr_at, set_lr

        model, optimizer, loader = self.fresh()
        tracker, run_dir = self.tracker()
        times = {"run": [], "step": [], "grad_norms": [], "diagnostics": []}
        monitor = timed(GradNorms(model), times["grad_norms"]) if diagnostics else None
        probe = timed(log_diagnostics, times["diagnostics"])
        log_every = self.cfg.trainer.log_every
        run_started = time.perf_counter()
        for step in range(1, steps + 1):
            started = time.perf_counter()
            set_lr(optimizer, lr_at(step - 1, self.cfg.optim, steps))
            loss, grad_norm, _, group_norms = train_step(model, optimizer, self.batches(loader), self.accelerator,
                                                         self.cfg.optim.grad_clip, Backward(self.accelerator, monitor))
            metrics = dict(group_norms)
            if due(step, log_every, steps):
                metrics.update({"train/loss": loss, "train/grad_norm": grad_norm})
            if metrics:
                tracker.log(metrics, step)
            times["step"].append(time.perf_counter() - started)
            if diagnostics and due(step, every, steps):
                probe(self.accelerator.unwrap_model(model), self.probe, step, run_dir, tracker)
        times["run"].append(time.perf_counter() - run_started)
        tracker.finish()
        return times


def timed(fn, into: list[float]):
    """`fn`, appending the wall seconds of every call to `into`."""

    def call(*args, **kwargs):
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        into.append(time.perf_counter() - started)
        return out

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per timed run")
    parser.add_argument("--every", type=int, default=None, help="diag_every (default: the config's logger.diag_every)")
    parser.add_argument("--repeats", type=int, default=2, help="base/diag pairs")
    parser.add_argument("--logger", choices=("none", "wandb"), default="none")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. model=tiny trainer.batch_size=8")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = compose(args.overrides)
    every = args.every or cfg.logger.diag_every
    with tempfile.TemporaryDirectory() as work:
        os.environ.setdefault("WANDB_DIR", work)
        bench = Bench(cfg, args.logger, Path(work))
        tokens = cfg.trainer.batch_size * bench.grad_accum * cfg.data.seq_len
        print(f"model={cfg.model.name} residual={cfg.residual['name']} n={cfg.residual['n']} | {tokens} tokens/step | "
              f"{args.steps} steps per run | diag_every={every} | probe {cfg.logger.diag_batch_size} x "
              f"{cfg.data.seq_len} | logger={args.logger} | torch threads {torch.get_num_threads()}")
        base, diag = [], []
        for repeat in range(args.repeats):
            base.append(bench.run(args.steps, every, diagnostics=False))
            diag.append(bench.run(args.steps, every, diagnostics=True))
            b, d = base[-1]["run"][0], diag[-1]["run"][0]
            print(f"pair {repeat + 1}: without diagnostics {b:.1f} s, with {d:.1f} s, ratio {d / b:.4f}")
        ratio = sum(d["run"][0] for d in diag) / sum(b["run"][0] for b in base)
        print(f"whole runs: with / without diagnostics = {ratio:.4f} ({100 * (ratio - 1):+.2f}%)")
        # Medians resist the spikes of a shared machine; the first diagnostics call of a process imports matplotlib.
        step = statistics.median(t for b in base for t in b["step"])
        norms = statistics.median(t for d in diag for t in d["grad_norms"])
        first = diag[0]["diagnostics"][0]
        probe = statistics.median(t for d in diag for t in d["diagnostics"][1:] or d["diagnostics"])
        print(f"medians: step {step * 1e3:.1f} ms | gradient norms {norms * 1e3:.2f} ms/step | one diagnostics call "
              f"{probe * 1e3:.0f} ms (the first of the process, with imports: {first * 1e3:.0f} ms)")
        for k in sorted({10, 50, 100, 250, 500, every}):
            predicted = (norms + probe / k) / step
            print(f"  overhead from the medians at diag_every={k}: {100 * predicted:.2f}%")


if __name__ == "__main__":
    main()
