"""Learning-rate schedule and optimizer construction (plain functions of the step)."""

from __future__ import annotations

import math

import torch
from torch import nn

from pirl.config import OptimConfig


def peak_lr(opt: OptimConfig) -> float:
    """The linear scaling rule: ``base_lr`` per 256 images times the global batch / 256."""
    return opt.base_lr * opt.batch_size / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_ratio: float) -> float:
    """Linear warm-up from ``peak / warmup_steps`` to ``peak``, then cosine decay to
    ``peak * min_ratio`` at ``total_steps``.

    >>> lr_at(0, 100, 0, 1.0, 0.001)
    1.0
    >>> round(lr_at(100, 100, 0, 1.0, 0.001), 6)
    0.001
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = peak * min_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight decay on conv / linear weights; none on BatchNorm parameters and biases
    (as the authors' release does: decaying them only hurts).  Every parameter of rank <= 1 is a
    bias or a normalisation scale/shift."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, opt: OptimConfig) -> torch.optim.SGD:
    """SGD with momentum at the peak learning rate (the schedule rescales it every step)."""
    return torch.optim.SGD(param_groups(model, opt.weight_decay), lr=peak_lr(opt),
                           momentum=opt.momentum)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply one learning rate to every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
