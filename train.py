"""Pretrain an mhc-lm GPT.

    python train.py                                   # small mHC GPT (n = 4) on the bundled corpus
    python train.py residual=residual                 # the plain pre-norm baseline, same budget
    python train.py model=base residual=mhc data=local data.files=[corpus/*.txt] trainer.max_steps=20000

Reads top to bottom: validate the config, prepare data, build the model, resume if a checkpoint
exists, then the loop (lr from the step, gradient accumulation with the loss normalized per token,
clipping, logging with gradient norms, periodic validation, mixing diagnostics and checkpoints), a final
Hugging Face export that carries its modeling code, and with hub.push=true its upload to the Hugging
Face Hub.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mhc_lm.config import TrainConfig, register_configs, validate
from mhc_lm.cli import reported, run
from mhc_lm.console import console_to_log, quiet_libraries
from mhc_lm.distributed import strip_local_rank_flag
from mhc_lm.errors import ConfigError

register_configs()


def resolve_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def make_accelerator(cfg: TrainConfig):
    """The Accelerator for this launch (single process, DDP, FSDP or DeepSpeed, from the environment),
    configured by our rules; returns (accelerator, grad_accum, precision)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    from mhc_lm.distributed import check_engine, configure_deepspeed, configure_fsdp, resolve_grad_accum

    precision = resolve_precision(cfg.trainer.precision)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    grad_accum = resolve_grad_accum(cfg, world_size)
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    # Several CPU processes (torchrun / accelerate launch without GPUs) talk over gloo. Naming a
    # backend in a single process would make accelerate expect a process group, so only then; and
    # DDP on CPU needs cpu=True (else accelerate leaves the model unwrapped), DeepSpeed must not get it.
    distributed_cpu = not torch.cuda.is_available() and world_size > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed_cpu else []
    accelerator = Accelerator(
        # DeepSpeed's own bf16 would cast the connection parameters; it gets torch_autocast instead.
        mixed_precision="no" if precision == "fp32" or deepspeed else precision,
        gradient_accumulation_steps=grad_accum,
        dynamo_backend="inductor" if cfg.trainer.compile else None,
        kwargs_handlers=handlers,
        cpu=distributed_cpu and not deepspeed,
    )
    check_engine(accelerator, world_size)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, cfg, grad_accum, precision)
    elif accelerator.distributed_type == DistributedType.FSDP:
        configure_fsdp(accelerator)
    return accelerator, grad_accum, precision


def train_step(model, optimizer, batches: list[torch.Tensor], accelerator, grad_clip: float, grad_norms=None):
    """One optimizer step over this process's micro-batches; returns (loss per token, grad norm, tokens,
    the `grad_norms` monitor's per-group norms before clipping, {} without one).

    The loss is normalized by the tokens of the whole step on all ranks. accelerate divides each
    micro-batch loss by grad_accum and DDP averages over ranks: we undo both, so the gradient is
    (sum of token losses) / (tokens in the step), whatever the accumulation and the world size.
    """
    from mhc_lm.metrics import token_loss_sum

    device, world = accelerator.device, accelerator.num_processes
    local_tokens = torch.tensor(sum(b[:, 1:].numel() for b in batches), device=device)
    step_tokens = accelerator.reduce(local_tokens, reduction="sum").item()
    scale = len(batches) * world / step_tokens
    loss_sum = torch.zeros((), device=device)
    grad_norm, group_norms = torch.zeros(()), {}
    deepspeed_norms = getattr(grad_norms, "sharded", None) == "deepspeed"  # any callable monitor will do
    for batch in batches:
        with accelerator.accumulate(model):
            with accelerator.autocast():
                micro_loss, _ = token_loss_sum(model, batch)
            if deepspeed_norms and accelerator.sync_gradients:
                # accelerate's backward runs DeepSpeed's step (clipping, update, zero_grad) right after
                # its backward: do the two by hand to read the reduced gradients in between.
                engine = accelerator.deepspeed_engine_wrapped.engine
                engine.set_gradient_accumulation_boundary(is_boundary=True)
                engine.backward(micro_loss * scale)
                group_norms = grad_norms()
                engine.step()
            else:
                accelerator.backward(micro_loss * scale)
            loss_sum += micro_loss.detach()
            if accelerator.sync_gradients:
                if grad_norms is not None and not deepspeed_norms:  # before clipping; fp16 loss scale divided out
                    group_norms = grad_norms(accelerator.scaler.get_scale() if accelerator.scaler else 1.0)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    loss = accelerator.reduce(loss_sum, reduction="sum").item() / step_tokens
    return loss, float(grad_norm), step_tokens, group_norms


def train(cfg: TrainConfig, run_dir: Path) -> float:
    from accelerate.utils import DistributedType, set_seed
    from tqdm.auto import tqdm

    from mhc_lm.checkpoint import check_compatible, load_checkpoint, resolve_resume, save_checkpoint
    from mhc_lm.data import eval_batches, make_train_loader, prepare_data, state_for_rank, unigram_loss
    from mhc_lm.diagnostics import GradNorms, log_diagnostics, probe_batch
    from mhc_lm.distributed import Preemption, check_rendezvous_env, engine_name, parameter_count
    from mhc_lm.export import check_bundle, export_model
    from mhc_lm.hub import check_push_access, push
    from mhc_lm.kernels import check_before_training
    from mhc_lm.metrics import evaluate_loss, flops_per_token, peak_flops, perplexity
    from mhc_lm.model import MhcForCausalLM, build_config
    from mhc_lm.optim import build_optimizer, lr_at, set_lr
    from mhc_lm.tracking import Tracker

    # 1. Everything that can be checked without doing work.
    validate(cfg)
    quiet_libraries()
    tcfg = cfg.trainer
    run_config = {"model": dataclasses.asdict(cfg.model), "residual": dict(cfg.residual)}
    checkpoint = resolve_resume(tcfg.resume, run_dir)
    if checkpoint is not None:
        check_compatible(checkpoint, run_config)
    hub = cfg.hub
    if tcfg.export or hub.push:
        check_bundle()  # the export's modeling code: a bundling problem shows now, not after training
    if (hub.push or hub.push_checkpoints) and int(os.environ.get("RANK", "0")) == 0:
        check_push_access(hub.repo, option="hub.repo")  # a token that can write, before hours of training
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    check_rendezvous_env()
    accelerator, grad_accum, precision = make_accelerator(cfg)
    # The kernels' self-check on this GPU: a failure is one line here, not a crash inside a step.
    check_before_training(cfg.residual.get("kernel", "auto"), cfg.residual["n"], accelerator.device)
    set_seed(tcfg.seed)
    is_main = accelerator.is_main_process
    preemption = Preemption()

    # 2. Data: tokenizer, validation tokens and this rank's training loader, whatever the source
    #    (rank 0 first, the others read its cache).
    with accelerator.main_process_first():
        data = prepare_data(cfg.data)
    vocab_size = cfg.model.vocab_size or cfg.model.vocab_multiple * math.ceil(data.vocab_size / cfg.model.vocab_multiple)
    if vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size}: smaller than the tokenizer's {data.vocab_size} tokens; "
                          f"allowed: >= {data.vocab_size}, or null")
    loader = make_train_loader(data, tcfg.batch_size, tcfg.seed, accelerator.process_index, accelerator.num_processes)

    # 3. Model and optimizer.
    model_config = build_config(cfg.model, cfg.residual, vocab_size, data.eot_id)
    model = MhcForCausalLM(model_config)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    step, tokens_seen, train_time = 0, 0, 0.0
    if checkpoint is not None:
        trainer_state, data_states = load_checkpoint(accelerator, checkpoint)
        loader.load_state_dict(state_for_rank(data_states, accelerator.process_index, accelerator.num_processes,
                                              str(checkpoint)))
        step, tokens_seen, train_time = trainer_state["step"], trainer_state["tokens_seen"], trainer_state["train_time"]
        accelerator.print(f"Resumed from {checkpoint} at step {step}")

    n_params = parameter_count(model)
    tokens_per_step = tcfg.batch_size * grad_accum * accelerator.num_processes * cfg.data.seq_len
    unigram = unigram_loss(data.unigram_sample, data.validation, data.vocab_size)
    peak = peak_flops(accelerator.device)
    step_flops = flops_per_token(model_config, cfg.data.seq_len) * tokens_per_step
    tracker = Tracker(cfg.logger, run_dir, {**dataclasses.asdict(cfg), "n_params": n_params}, enabled=is_main)
    accelerator.print(f"{n_params / 1e6:.2f}M parameters | residual={cfg.residual['name']} n={model_config.num_streams}"
                      f" | {engine_name(accelerator)} x {accelerator.num_processes} | {precision} | "
                      f"{tokens_per_step} tokens/step | {data.describe()} | "
                      f"unigram val loss {unigram:.3f} | run dir {run_dir}")

    def validation_loss() -> float:
        batches = eval_batches(data.validation, cfg.data.seq_len, tcfg.batch_size, tcfg.eval_batches,
                               accelerator.process_index, accelerator.num_processes)
        return evaluate_loss(model, batches, accelerator)

    def trainer_state() -> dict:
        return {"step": step, "tokens_seen": tokens_seen, "train_time": train_time}

    # Diagnostics (SPEC section 6): gradient norms every step, the mixing probe every logger.diag_every steps.
    sharded = "deepspeed" if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    grad_norms = GradNorms(model, sharded) if cfg.logger.grad_norms else None
    probe = probe_batch(data.validation, cfg.data.seq_len, cfg.logger.diag_batch_size)

    def checkpoint_now() -> None:
        saved = save_checkpoint(accelerator, run_dir, step, trainer_state(), loader.state_dict(), run_config,
                                tcfg.keep_last, model_config=model_config, tokenizer=data.tokenizer)
        if hub.push_checkpoints and is_main:
            url = push(str(saved), hub.repo, private=hub.private, revision=f"step-{step}", option="hub.repo")
            progress.write(f"step {step}: pushed to {url}")

    # 4. The loop. One iteration = one optimizer step = grad_accum micro-batches per process.
    model.train()
    val_loss = float("nan")
    progress = tqdm(total=tcfg.max_steps, initial=step, disable=not is_main, desc="Training", unit="step")
    while step < tcfg.max_steps:
        started = time.perf_counter()
        lr = lr_at(step, cfg.optim, tcfg.max_steps)
        set_lr(optimizer, lr)
        batches = [loader.next_batch().to(accelerator.device) for _ in range(grad_accum)]
        loss, grad_norm, step_tokens, group_norms = train_step(model, optimizer, batches, accelerator,
                                                               cfg.optim.grad_clip, grad_norms)
        step += 1
        tokens_seen += step_tokens
        step_time = time.perf_counter() - started
        train_time += step_time
        progress.update(1)

        metrics = dict(group_norms)  # every step
        if step % tcfg.log_every == 0 or step == tcfg.max_steps:
            metrics.update({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                            "train/tokens_per_s": step_tokens / step_time, "train/step_time_s": step_time,
                            "train/tokens_seen": tokens_seen})
            if peak:
                metrics["train/mfu"] = step_flops / step_time / (peak * accelerator.num_processes)
            progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{step_tokens / step_time:,.0f}")
        if metrics:
            tracker.log(metrics, step)
        diag_every = cfg.logger.diag_every
        if diag_every and is_main and (step % diag_every == 0 or step == tcfg.max_steps):
            # Eager (hooks and .item() in a compiled graph would recompile it), under the run's autocast.
            log_diagnostics(accelerator.unwrap_model(model, keep_torch_compile=False), probe, step, run_dir, tracker)
        if step % tcfg.eval_every == 0 or step == tcfg.max_steps:
            val_loss = validation_loss()
            tracker.log({"val/loss": val_loss, "val/ppl": perplexity(val_loss)}, step)
            if is_main:
                progress.write(f"step {step}: val loss {val_loss:.4f} (unigram {unigram:.3f})")
        stop_now = (tcfg.stop_at_step is not None and step >= tcfg.stop_at_step) or preemption.requested(accelerator)
        if (tcfg.ckpt_every and step % tcfg.ckpt_every == 0) or step == tcfg.max_steps or stop_now:
            checkpoint_now()
        if stop_now:
            break
    progress.close()
    if step < tcfg.max_steps:
        tracker.finish()
        accelerator.end_training()
        why = f"on {preemption.received}" if preemption.received else "at trainer.stop_at_step"
        accelerator.print(f"run dir: {run_dir} | stopped {why} at step {step} of {tcfg.max_steps}, checkpoint saved; "
                          f"continue with: python train.py hydra.run.dir={run_dir} trainer.resume=auto")
        return val_loss

    # 5. The final model as a Hugging Face export (tokenizer and modeling code included), and its upload.
    if math.isnan(val_loss):  # resumed at max_steps: nothing ran, still report the model's loss
        val_loss = validation_loss()
    if tcfg.export or hub.push:
        export_model(accelerator, model, data.tokenizer, run_dir / "export", trainer_state=trainer_state())
    tracker.log({"final/val_loss": val_loss, "final/unigram_loss": unigram}, step)
    tracker.finish()
    if hub.push and is_main:  # after the final metrics are written: the model card reads them
        url = push(str(run_dir), hub.repo, private=hub.private, revision=hub.revision, option="hub.repo",
                   revision_option="hub.revision")
        accelerator.print(f"pushed the final model to {url}")
    tokens_per_s = tokens_seen / train_time if train_time else float("nan")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"run dir: {run_dir} | final val loss: {val_loss:.4f} (unigram {unigram:.3f}) | "
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
