"""The optimizer and the learning-rate schedule of the recipe."""

from __future__ import annotations

import math

import torch

from production.config.recipe import TrainConfig
from production.model.gpt import GPT


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the update that takes the model from `step` to `step + 1`: linear warmup over
    warmup_steps, then cosine from lr to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: GPT, cfg: TrainConfig, device: str, fused: bool = True) -> torch.optim.AdamW:
    """AdamW; weight decay on 2-D weights only (not norms, biases or null tokens). Fused (one pass over each
    tensor) on CUDA and CPU unless the parameters are sharded."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "null_" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = fused and torch.device(device).type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)
