"""Pretrain an mhc-lm GPT.

    python train.py                                   # small mHC GPT (n = 4) on the bundled corpus
    python train.py residual=residual                 # the plain pre-norm baseline, same budget
    python train.py model=base residual=mhc data=local data.files=[corpus/*.txt] trainer.max_steps=20000

Reads top to bottom: `check_before_work` (everything that needs no work), `build_run` (accelerator,
data, model, optimizer: the parts of a `Run`), `resume` to a `TrainState`, then `train`'s loop (lr from
the step, `train_step` from mhc_lm/training.py, every periodic action through `due`: logging with
gradient norms, validation, mixing diagnostics, checkpoints), and `finish`: a Hugging Face export that
carries its modeling code and, with hub.push=true, its upload to the Hub.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from accelerate.utils import set_seed
from tqdm.auto import tqdm

from mhc_lm.checkpoint import load_checkpoint, save_checkpoint
from mhc_lm.cli import reported, run
from mhc_lm.config import TrainConfig, register_configs, validate
from mhc_lm.console import console_to_log, quiet_libraries
from mhc_lm.data import eval_batches, make_train_loader, prepare_data, state_for_rank, unigram_loss
from mhc_lm.diagnostics import log_diagnostics, probe_batch
from mhc_lm.activations import activation_bytes
from mhc_lm.distributed import (Preemption, engine_name, engine_shards_parameters, parameter_count, report_stop,
                                strip_local_rank_flag)
from mhc_lm.errors import ConfigError
from mhc_lm.export import check_bundle, export_model
from mhc_lm.hub import check_push_access, push
from mhc_lm.kernels import check_before_training
from mhc_lm.metrics import evaluate_loss, flops_per_token, peak_flops, perplexity
from mhc_lm.model import MhcForCausalLM, build_config
from mhc_lm.optim import build_optimizer, lr_at, set_lr
from mhc_lm.preflight import check_train, run_config
from mhc_lm.run_dir import RunDir
from mhc_lm.tracking import Tracker
from mhc_lm.training import (Backward, StepResult, TrainState, autocast_dtype, due, make_accelerator,
                             make_backward, train_step)

register_configs()


@dataclass
class Run:
    """The parts of a run, built once by `build_run`; the loop and the periodic actions read them."""

    cfg: TrainConfig
    run_dir: Path
    accelerator: Any
    grad_accum: int
    data: Any  # mhc_lm.data.PreparedData: tokenizer, validation tokens, unigram sample
    loader: Any  # this rank's stateful training loader
    model_config: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    backward: Backward
    tracker: Tracker
    run_config: dict
    unigram: float
    step_flops: float
    preemption: Preemption
    peak_flops: Optional[float] = None  # the device's peak, looked up once (None: unknown, no MFU)
    precision: str = "fp32"  # fp32 | bf16 | fp16: the autocast dtype the steps run under
    progress: Any = None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.trainer.batch_size * self.grad_accum * self.accelerator.num_processes * self.cfg.data.seq_len


def check_before_work(cfg: TrainConfig, run_dir: Path) -> Optional[Path]:
    """Everything that can be checked before any work; returns the checkpoint to resume from, if any: options,
    launch environment, and an intact checkpoint this run can continue (manifest, model, process count)."""
    checkpoint = check_train(cfg, run_dir)
    quiet_libraries()
    if cfg.trainer.export or cfg.hub.push:
        check_bundle()  # the export's modeling code: a bundling problem shows now, not after training
    if (cfg.hub.push or cfg.hub.push_checkpoints) and int(os.environ.get("RANK", "0")) == 0:
        check_push_access(cfg.hub.repo, option="hub.repo")  # a token that can write, before hours of training
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    return checkpoint


def build_run(cfg: TrainConfig, run_dir: Path) -> Run:
    """Accelerator, data (rank 0 first, the others read its cache), model, optimizer, tracker."""
    accelerator, grad_accum, precision = make_accelerator(cfg)
    # The kernels' self-check on this GPU: a failure is one line here, not a crash inside a step.
    check_before_training(cfg.residual.get("kernel", "auto"), cfg.residual["n"], accelerator.device)
    set_seed(cfg.trainer.seed)
    preemption = Preemption()  # from here on SIGTERM / SIGUSR1 mean: checkpoint at the end of the step
    with accelerator.main_process_first():
        data = prepare_data(cfg.data)
    model_config = build_config(cfg.model, cfg.residual, model_vocab_size(cfg, data.vocab_size), data.eot_id,
                                cfg.trainer)
    model = MhcForCausalLM(model_config)
    model, optimizer = accelerator.prepare(model, build_optimizer(model, cfg.optim))
    tracker = Tracker(cfg.logger, run_dir, {**dataclasses.asdict(cfg), "n_params": parameter_count(model)},
                      enabled=accelerator.is_main_process)
    run = Run(cfg, run_dir, accelerator, grad_accum, data,
              make_train_loader(data, cfg.trainer.batch_size, cfg.trainer.seed, accelerator.process_index,
                                accelerator.num_processes),
              model_config, model, optimizer, make_backward(accelerator, model, cfg.logger.grad_norms), tracker,
              run_config(cfg), unigram_loss(data.unigram_sample, data.validation, data.vocab_size), 0.0,
              preemption)
    run.step_flops = flops_per_token(model_config, cfg.data.seq_len) * run.tokens_per_step
    run.peak_flops, run.precision = peak_flops(accelerator.device), precision
    announce(run, precision)
    return run


def measure_activations(run: Run, step: int) -> None:
    """The bytes per token one training forward keeps for backward (mhc_lm.activations, one sequence of
    the validation stream, the run's precision and recompute policy), logged as memory/token_activation_bytes
    for compare's activation column. Rank 0 only, on the unwrapped model; skipped where the parameters are
    sharded (FSDP, ZeRO-3), since a forward on one rank would wait for the others' shards."""
    if not run.is_main or engine_shards_parameters(run.accelerator):
        return
    model = run.accelerator.unwrap_model(run.model, keep_torch_compile=False)
    sequence = probe_batch(run.data.validation, run.cfg.data.seq_len, 1).clone().to(run.accelerator.device)
    dtype = autocast_dtype(run.precision)
    with torch.autocast(sequence.device.type, dtype=dtype, enabled=dtype is not None):  # DeepSpeed's too
        kept = activation_bytes(model, sequence)
    run.tracker.log({"memory/token_activation_bytes": kept / sequence.numel()}, step)


def model_vocab_size(cfg: TrainConfig, tokenizer_vocab: int) -> int:
    """model.vocab_size, or the tokenizer's rounded up to model.vocab_multiple."""
    multiple = cfg.model.vocab_multiple
    vocab_size = cfg.model.vocab_size or multiple * math.ceil(tokenizer_vocab / multiple)
    if vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={vocab_size}: smaller than the tokenizer's {tokenizer_vocab} tokens; "
                          f"allowed: >= {tokenizer_vocab}, or null")
    return vocab_size


def announce(run: Run, precision: str) -> None:
    cfg, accelerator = run.cfg, run.accelerator
    accelerator.print(f"{parameter_count(run.model) / 1e6:.2f}M parameters | residual={cfg.residual['name']} "
                      f"n={run.model_config.num_streams} | {engine_name(accelerator)} x {accelerator.num_processes} | "
                      f"{precision} | {run.tokens_per_step} tokens/step | {run.data.describe()} | "
                      f"unigram val loss {run.unigram:.3f} | run dir {run.run_dir}")


def resume(run: Run, checkpoint: Path) -> TrainState:
    """Model, optimizer, RNG and data position from `checkpoint`; the state the loop continues from."""
    saved, data_states = load_checkpoint(run.accelerator, checkpoint)
    accelerator = run.accelerator
    run.loader.load_state_dict(state_for_rank(data_states, accelerator.process_index, accelerator.num_processes,
                                              str(checkpoint)))
    state = TrainState()
    state.load_state_dict(saved)
    accelerator.print(f"Resumed from {checkpoint} at step {state.step}")
    return state


def log_step(run: Run, state: TrainState, result: StepResult, lr: float, seconds: float) -> None:
    """Gradient norms by group every step; loss, lr, throughput and MFU every trainer.log_every steps."""
    metrics = dict(result.group_norms)
    if due(state.step, run.cfg.trainer.log_every, run.cfg.trainer.max_steps):
        metrics.update({"train/loss": result.loss, "train/lr": lr, "train/grad_norm": result.grad_norm,
                        "train/tokens_per_s": result.tokens / seconds, "train/step_time_s": seconds,
                        "train/tokens_seen": state.tokens_seen})
        if run.peak_flops:
            metrics["train/mfu"] = run.step_flops / seconds / (run.peak_flops * run.accelerator.num_processes)
        run.progress.set_postfix(loss=f"{result.loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{result.tokens / seconds:,.0f}")
    if metrics:
        run.tracker.log(metrics, state.step)


def validation_loss(run: Run) -> float:
    tcfg, accelerator = run.cfg.trainer, run.accelerator
    batches = eval_batches(run.data.validation, run.cfg.data.seq_len, tcfg.batch_size, tcfg.eval_batches,
                           accelerator.process_index, accelerator.num_processes)
    return evaluate_loss(run.model, batches, accelerator)


def validate_now(run: Run, step: int) -> float:
    val_loss = validation_loss(run)
    run.tracker.log({"val/loss": val_loss, "val/ppl": perplexity(val_loss)}, step)
    if run.is_main:
        run.progress.write(f"step {step}: val loss {val_loss:.4f} (unigram {run.unigram:.3f})")
    return val_loss


def diagnose(run: Run, step: int, probe: torch.Tensor) -> None:
    """The mixing probe (docs/diagnostics.md), on rank 0, eager and under the run's autocast (hooks and
    .item() in a compiled graph would recompile it)."""
    if run.is_main:
        model = run.accelerator.unwrap_model(run.model, keep_torch_compile=False)
        log_diagnostics(model, probe, step, run.run_dir, run.tracker)


def save(run: Run, state: TrainState) -> None:
    """A checkpoint of this step (atomic, on every rank), pushed to the Hub with hub.push_checkpoints."""
    saved = save_checkpoint(run.accelerator, run.run_dir, state.step, state.state_dict(), run.loader.state_dict(),
                            run.run_config, run.cfg.trainer.keep_last, model_config=run.model_config,
                            tokenizer=run.data.tokenizer)
    hub = run.cfg.hub
    if hub.push_checkpoints and run.is_main:
        url = push(str(saved), hub.repo, private=hub.private, revision=f"step-{state.step}", option="hub.repo")
        run.progress.write(f"step {state.step}: pushed to {url}")


def stop_requested(run: Run, step: int) -> bool:
    """trainer.stop_at_step reached, or a preemption signal on any rank (every rank learns it)."""
    stop_at = run.cfg.trainer.stop_at_step
    return (stop_at is not None and step >= stop_at) or run.preemption.requested(run.accelerator)


def train(cfg: TrainConfig, run_dir: Path) -> float:
    """Check, build, resume, then the loop: one iteration = one optimizer step = grad_accum micro-batches
    per process; every periodic action through `due`. Returns the final validation loss."""
    checkpoint = check_before_work(cfg, run_dir)
    run = build_run(cfg, run_dir)
    state = resume(run, checkpoint) if checkpoint is not None else TrainState()
    tcfg, last, accelerator = cfg.trainer, cfg.trainer.max_steps, run.accelerator
    probe = probe_batch(run.data.validation, cfg.data.seq_len, cfg.logger.diag_batch_size)
    measure_activations(run, state.step)
    run.progress = tqdm(total=last, initial=state.step, disable=not run.is_main, desc="Training", unit="step")
    val_loss = float("nan")
    run.model.train()
    while state.step < last:
        started = time.perf_counter()
        lr = lr_at(state.step, cfg.optim, last)
        set_lr(run.optimizer, lr)
        batches = [run.loader.next_batch().to(accelerator.device) for _ in range(run.grad_accum)]
        result = train_step(run.model, run.optimizer, batches, accelerator, cfg.optim.grad_clip, run.backward)
        seconds = time.perf_counter() - started
        state.advance(result.tokens, seconds)
        run.progress.update(1)
        log_step(run, state, result, lr, seconds)
        if due(state.step, cfg.logger.diag_every, last):
            diagnose(run, state.step, probe)
        if due(state.step, tcfg.eval_every, last):
            val_loss = validate_now(run, state.step)
        stop = stop_requested(run, state.step)
        if stop or state.step == last or due(state.step, tcfg.ckpt_every, last):
            save(run, state)
        if stop:
            break
    run.progress.close()
    return finish(run, state, val_loss) if state.step == last else stopped(run, state, val_loss)


def stopped(run: Run, state: TrainState, val_loss: float) -> float:
    """Stopped early (preemption or trainer.stop_at_step): the checkpoint is saved, say how to continue."""
    run.tracker.finish()
    report_stop(run.accelerator, run.run_dir, state.step, run.cfg.trainer.max_steps, run.preemption)  # 75 if preempted
    run.accelerator.end_training()
    return val_loss


def finish(run: Run, state: TrainState, val_loss: float) -> float:
    """The final model as a Hugging Face export (tokenizer and modeling code included), and its upload."""
    cfg, accelerator = run.cfg, run.accelerator
    if math.isnan(val_loss):  # resumed at max_steps: nothing ran, still report the model's loss
        val_loss = validation_loss(run)
    if cfg.trainer.export or cfg.hub.push:
        export_model(accelerator, run.model, run.data.tokenizer, RunDir(run.run_dir).export,
                     trainer_state=state.state_dict())
    run.tracker.log({"final/val_loss": val_loss, "final/unigram_loss": run.unigram}, state.step)
    run.tracker.finish()
    if cfg.hub.push and run.is_main:  # after the final metrics are written: the model card reads them
        url = push(str(run.run_dir), cfg.hub.repo, private=cfg.hub.private, revision=cfg.hub.revision,
                   option="hub.repo", revision_option="hub.revision")
        accelerator.print(f"pushed the final model to {url}")
    tokens_per_s = state.tokens_seen / state.train_time if state.train_time else float("nan")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"run dir: {run.run_dir} | final val loss: {val_loss:.4f} (unigram {run.unigram:.3f}) | "
                      f"tokens/s: {tokens_per_s:,.0f}")
    return val_loss


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(dict_cfg: DictConfig) -> float:
    cfg: TrainConfig = OmegaConf.to_object(dict_cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with console_to_log(), reported(run_dir):  # the error line goes to train.log too; the dir, if empty, not
        return train(cfg, run_dir)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.argv = strip_local_rank_flag(sys.argv)  # the `deepspeed` launcher appends it; Hydra rejects it
    run(main, "config", check=validate, output_option="trainer.output_dir")  # Hydra's errors in one line, exit 2
