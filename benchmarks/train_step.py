"""Training throughput of a 12-layer, d_model 1024 GPT: mHC n = 4 against the plain pre-norm residual.

    python benchmarks/train_step.py                                   # on the GPU: batch 8 x 1024 tokens, bf16
    python benchmarks/train_step.py --batch 1 --seq-len 128 --steps 3 --device cpu

One full optimizer step as train.py takes it (`mhc_lm.training.train_step`: autocast forward, backward, clipping,
AdamW) on random tokens, for each residual: the median tokens/s over `--steps` steps after `--warmup`,
and the ratio mHC / residual (ratios from one run). The residual options are the shipped YAMLs
(`conf/residual/*.yaml`); `--kernel` overrides mHC's `residual.kernel` (auto: the Triton kernels on a GPU).
Target on a GPU: mHC at least 0.90 of the residual's tokens/s.
"""

from __future__ import annotations

import argparse

import torch
import yaml

from common import ROOT, machine, pick_device, print_table, timed


def residual_config(name: str, kernel: str) -> dict:
    residual = yaml.safe_load((ROOT / "conf" / "residual" / f"{name}.yaml").read_text())
    return {**residual, "kernel": kernel}


def tokens_per_second(residual: dict, args, device: torch.device) -> tuple[float, int]:
    from accelerate.state import AcceleratorState, GradientState

    from mhc_lm.config import DataConfig, ModelConfig, OptimConfig, TrainConfig, TrainerConfig, validate
    from mhc_lm.model import MhcForCausalLM, build_config
    from mhc_lm.optim import build_optimizer
    from mhc_lm.training import make_accelerator, train_step

    model_cfg = ModelConfig(name="bench", d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                            max_seq_len=args.seq_len)
    cfg = TrainConfig(model=model_cfg, residual=residual, data=DataConfig(seq_len=args.seq_len), optim=OptimConfig(),
                      trainer=TrainerConfig(batch_size=args.batch, precision=args.precision,
                                            compile=args.compile and args.compile_backend == "inductor",
                                            run_name="bench"))
    validate(cfg)
    # accelerate keeps its first Accelerator's settings (compile among them) process-wide: start afresh.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator, _, _ = make_accelerator(cfg)
    torch.manual_seed(0)
    model = MhcForCausalLM(build_config(model_cfg, residual, args.vocab, eos_token_id=0)).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    if args.compile and args.compile_backend != "inductor":  # trainer.compile is inductor's; another by hand
        model = torch.compile(model, backend=args.compile_backend)
    model.train()
    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), device=device)
    seconds = timed(lambda: train_step(model, optimizer, [batch], accelerator, cfg.optim.grad_clip), device,
                    args.warmup, args.steps)
    n_params = sum(p.numel() for p in model.parameters())
    del model, optimizer, accelerator
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return args.batch * args.seq_len / seconds, n_params


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--precision", default="auto", help="trainer.precision (auto: bf16 on a GPU, fp32 on CPU)")
    parser.add_argument("--kernel", default="auto", choices=["auto", "triton", "torch"])
    parser.add_argument("--compile", action="store_true", help="trainer.compile (torch.compile the model)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="with --compile: torch.compile's backend (eager: dynamo alone, a quick rehearsal)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--d-model", type=int, default=1024,
                        help="a smaller model for a quick run (gpu_check --dry-run)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=16)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    device = pick_device(args.device)
    if device.type == "cpu" and torch.cuda.is_available():
        parser.error("--device cpu on a GPU machine: accelerate would still place the model on the GPU")
    print(f"# {machine(device)}")
    print(f"# {args.layers} layers x d_model {args.d_model}, vocab {args.vocab}, batch {args.batch} x {args.seq_len} "
          f"tokens, precision {args.precision}, compile {args.compile}, median of {args.steps} steps after "
          f"{args.warmup}")
    rows = []
    for name, residual in (("residual", residual_config("residual", "auto")),
                           ("mhc", residual_config("mhc", args.kernel))):
        rate, n_params = tokens_per_second(residual, args, device)
        rows.append({"residual": name, "kernel": residual["kernel"], "params M": f"{n_params / 1e6:.1f}",
                     "tokens/s": f"{rate:,.1f}", "_rate": rate})
    for row in rows:
        row["vs residual"] = f"{row['_rate'] / rows[0]['_rate']:.3f}"
    print_table(rows, ["residual", "kernel", "params M", "tokens/s", "vs residual"])


if __name__ == "__main__":
    main()
