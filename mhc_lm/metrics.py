"""Loss evaluation and throughput accounting shared by train.py and eval.py."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .residual import make_mixer, mixer_options


def token_loss_sum(model, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies (fp32) over a (B, L + 1) block batch, and the token count."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=inputs).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum", ignore_index=-100)
    return loss, int((targets != -100).sum())


@torch.no_grad()
def evaluate_loss(model, batches, accelerator) -> float:
    """Mean next-token loss (nats) over `batches`, summed across all ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for batch in batches:
        with accelerator.autocast():
            loss, count = token_loss_sum(model, batch.to(accelerator.device))
        total += torch.tensor([loss.item(), count], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    return float(total[0] / total[1])


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (non-embedding parameters) + attention, as in the PaLM appendix, plus
    3x the forward FLOPs of the two mixers of each block, each variant's own count (`Mixer.flops_per_token`:
    its coefficient generator with its own number of res logits, its projection, the read and the write).
    """
    d, layers = config.hidden_size, config.num_hidden_layers
    attn = 2 * d * d + 2 * d * config.num_key_value_heads * config.head_dim
    mlp = 3 * d * config.intermediate_size
    head = d * config.vocab_size
    dense = layers * (attn + mlp) + head
    return 6 * dense + 12 * layers * d * seq_len + 3 * 2 * layers * mixer_flops_per_token(config)


def mixer_flops_per_token(config) -> int:
    """Forward FLOPs per token of one mixer of `config`'s residual (every sublayer's mixer counts the same)."""
    residual = config.residual
    with torch.device("meta"):  # shapes only: no memory, no initialization cost
        mixer = make_mixer(residual["name"], config.hidden_size, config.num_streams, 0,
                           **mixer_options(residual))
    return mixer.flops_per_token()


# Dense bf16 peak FLOP/s of common accelerators (no sparsity), by a substring of the device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
                   "4090": 165e12, "3090": 71e12, "V100": 125e12, "B200": 2250e12, "MI300X": 1307e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
