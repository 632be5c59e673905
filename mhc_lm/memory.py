"""Will it fit? GPU memory per process of a training config, under DDP, DeepSpeed ZeRO 1/2/3 and FSDP.

    python -m mhc_lm.memory model=base residual=mhc trainer.batch_size=16 data.seq_len=1024 \\
        trainer.activation_checkpointing=mhc --gpus 8 --gpu-memory 80GB

Composes the same Hydra config as train.py (any override it takes), then prints per GPU: parameters
(fp32 master weights), gradients (fp32), AdamW state (two fp32 moments) and activations, sharded as each
engine shards them, their total and whether it fits `--gpu-memory`.

Activations are a model of what autograd keeps after a training forward (the measurement of
`mhc_lm.activations`, counted op by op for this GPT and the mHC-family glue; the test holds it to the
measured bytes within 10% on CPU fp32). Under bf16/fp16 every element counts 2 bytes, which slightly
understates the glue (fp32 whatever the precision). Not counted: the framework's buffers, the CUDA
context, fragmentation, communication buckets, temporaries of the backward.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass

import torch

from .errors import fail

UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
         "TIB": 2**40}
ENGINES = ("ddp", "zero1", "zero2", "zero3", "fsdp")


def activation_elements_per_token(config) -> float:
    """Elements per token kept for backward by one training forward of an `MhcForCausalLM` with `config`,
    under its `activation_checkpointing` (fitted op by op on the PyTorch path; see the module docstring)."""
    C, H, heads, L = config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_hidden_layers
    n, plain = config.num_streams, config.residual.get("name") == "residual"
    policy = config.activation_checkpointing
    coefficients = 0 if plain else 2 * n + n * n  # the generator's output per sublayer: pre, post, res logits
    fixed = config.vocab_size + 2 * config.head_dim + (3 * C + 3 if plain else 4 * n + 4)
    if not plain:
        fixed += (2 * n if policy == "none" else 4) * C
    if policy == "full":
        return fixed + L * n * C
    if policy == "mhc":
        # Per layer the branches' tensors after their norms (6C + 4H + heads) and their two outputs (2C); the
        # norms (2C + 1 each) and the glue are recomputed. Per group its input streams.
        groups = math.ceil(L / config.blocks_per_group)
        return fixed + L * (8 * C + 4 * H + heads) + groups * n * C
    glue = 0 if plain else (2 * n + 2) * C + 8 * coefficients + 2
    return fixed + L * (10 * C + 4 * H + heads + 2 + glue)


@dataclass
class Footprint:
    """Bytes per GPU of one engine."""

    engine: str
    parameters: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations


def footprints(n_params: int, activations: float, gpus: int) -> list[Footprint]:
    """fp32 weights and gradients, AdamW's two fp32 moments; ZeRO-k shards the first k of (optimizer state,
    gradients, parameters) over the GPUs, FSDP (full shard) all three."""
    p, g, o = 4 * n_params, 4 * n_params, 8 * n_params
    shard = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}
    rows = []
    for engine in ENGINES:
        k = shard[engine]
        rows.append(Footprint(engine, p / gpus if k >= 3 else p, g / gpus if k >= 2 else g, o / gpus if k >= 1 else o,
                              activations))
    return rows


def parse_memory(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        fail("--gpu-memory", text, "allowed: a size such as 80GB, 80GiB or 24000MB")
    return float(match.group(1)) * UNITS[match.group(2)]


def model_config(cfg):
    """The MhcConfig train.py would build (vocabulary: model.vocab_size, else the data's rounded up)."""
    from .model import build_config

    vocab = cfg.model.vocab_size or cfg.model.vocab_multiple * math.ceil(cfg.data.vocab_size / cfg.model.vocab_multiple)
    return build_config(cfg.model, cfg.residual, vocab, eos_token_id=0, trainer_cfg=cfg.trainer)


def count_parameters(config) -> int:
    from .model import MhcForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in MhcForCausalLM(config).parameters())


def bytes_per_element(precision: str) -> int:
    return 4 if precision == "fp32" else 2  # auto: bf16 on the GPUs this plans for


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.2f}"


def report(cfg, gpus: int, memory: float | None) -> list[str]:
    config = model_config(cfg)
    n_params = count_parameters(config)
    tokens = cfg.trainer.batch_size * cfg.data.seq_len
    activations = activation_elements_per_token(config) * tokens * bytes_per_element(cfg.trainer.precision)
    lines = [f"{cfg.model.name} model, residual {cfg.residual['name']} (n = {config.num_streams}), "
             f"{n_params / 1e6:,.1f}M parameters, {cfg.trainer.batch_size} x {cfg.data.seq_len} tokens per GPU, "
             f"activation_checkpointing {config.activation_checkpointing}, precision {cfg.trainer.precision}, "
             f"{gpus} GPU(s); GiB per GPU",
             f"{'engine':>6} {'params':>9} {'grads':>9} {'optim':>9} {'activ':>9} {'total':>9}  fits"]
    for row in footprints(n_params, activations, gpus):
        fits = "-" if memory is None else ("yes" if row.total <= memory else "no")
        lines.append(f"{row.engine:>6} {gib(row.parameters):>9} {gib(row.gradients):>9} {gib(row.optimizer):>9} "
                     f"{gib(row.activations):>9} {gib(row.total):>9}  {fits}")
    return lines


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(prog="python -m mhc_lm.memory", description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 80GB (decimal) or 80GiB")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        fail("flag", unknown[0], "allowed flags: --gpus N, --gpu-memory SIZE; the rest are Hydra overrides key=value")
    if args.gpus < 1:
        fail("--gpus", args.gpus, "allowed: a number >= 1")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    from .cli import compose_checked, reported
    from .config import validate_model, validate_trainer
    from .residual import validate_residual

    with reported():
        args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        memory = None if args.gpu_memory is None else parse_memory(args.gpu_memory)
        cfg, _ = compose_checked("config", overrides)
        validate_model(cfg.model)
        validate_trainer(cfg.trainer)
        validate_residual(dict(cfg.residual))
        print("\n".join(report(cfg, args.gpus, memory)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
