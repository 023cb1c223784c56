"""AdamW parameter groups and the warmup + cosine learning-rate schedule of CLIP training."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group (matrices) and an undecayed one.

    As in CLIP training, biases, normalization weights, the logit scale and every parameter with fewer than two
    dimensions get no weight decay. Frozen parameters are left out.
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim < 2 or "logit_scale" in name or "norm" in name or name.endswith("bias")
        (no_decay if exempt else decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier: linear from 1/(warmup+1) to 1 over ``warmup_steps``, then cosine to 0 at ``total_steps``."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, warmup_steps: int, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (betas 0.9/0.98, eps 1e-6 as in CLIP) with the warmup + cosine schedule, stepped once per batch."""
    optimizer = torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))
    return optimizer, scheduler
