"""The learning-rate schedule, stepped once per iteration on the base optimizer.

The released F-SAM recipe anneals a cosine every iteration (not every epoch), so every schedule here is a
function of the global step: ``lr(step) = lr * factor(step)``, with ``step`` the number of steps taken so far.

* warmup (optional): ``warmup_epochs * steps_per_epoch`` steps rising linearly from ``warmup_lr`` to ``lr``;
* cosine: ``0.5 * (1 + cos(pi * t / T))`` over the remaining ``T`` steps, reaching 0 after the last step;
* multistep: multiplied by ``gamma`` at each milestone epoch (``milestone * steps_per_epoch`` steps).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from fsam.config import ScheduleConfig


def lr_factor(
    config: ScheduleConfig, *, lr: float, steps_per_epoch: int, epochs: int
) -> Callable[[int], float]:
    """``factor(step)``: the multiple of ``lr`` to use for the step after ``step`` steps."""
    total = steps_per_epoch * epochs
    warmup = round(config.warmup_epochs * steps_per_epoch)
    milestones = [milestone * steps_per_epoch for milestone in config.milestones]

    def factor(step: int) -> float:
        if step < warmup:
            return (config.warmup_lr + (lr - config.warmup_lr) * step / warmup) / lr
        if config.name == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return config.gamma ** sum(step >= boundary for boundary in milestones)

    return factor


def create_schedule(
    optimizer: torch.optim.Optimizer, config: ScheduleConfig, *, lr: float, steps_per_epoch: int, epochs: int
) -> LambdaLR:
    """A scheduler on ``optimizer``'s base optimizer (the SAM wrappers' ``base_optimizer``); call ``step()``
    after every optimisation step. Its ``state_dict()`` is the step count (the factor is rebuilt from config)."""
    base = getattr(optimizer, "base_optimizer", optimizer)
    return LambdaLR(base, lr_factor(config, lr=lr, steps_per_epoch=steps_per_epoch, epochs=epochs))
