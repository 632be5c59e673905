"""Parameter groups, the optimizer, and the learning rate as a pure function of the step."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig
from .residual import HyperHead, Mixer

CONNECTION_MODULES = (Mixer, HyperHead)


def connection_parameter_names(model: nn.Module) -> set[str]:
    """Names of the hyper-connection parameters (every parameter of a mixer or of the collapse head)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, CONNECTION_MODULES):
            names.update(f"{module_name}.{p}" if module_name else p for p, _ in module.named_parameters())
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and embeddings only: never on norms, biases or connection parameters."""
    connection = connection_parameter_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and name not in connection else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, fused=fused or None)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine, WSD or constant.

    cosine: from lr down to min_lr_ratio * lr at max_steps. wsd (warmup-stable-decay): lr until the
    last decay_fraction of the steps, then linearly down to min_lr_ratio * lr.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    decay_start = max(cfg.warmup_steps, int(max_steps * (1 - cfg.decay_fraction)))
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return peak + (floor - peak) * progress


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
