"""Learning-rate schedules: linear warmup, then inverse square root, cosine or constant."""

from __future__ import annotations

import math

import torch

from qkv.train.config import TrainConfig

__all__ = ["lr_factor", "make_scheduler"]


def lr_factor(step: int, config: TrainConfig) -> float:
    """The multiplier of ``config.lr`` for optimizer step ``step`` (0-based: the first update
    uses ``lr_factor(0)``).

    The warmup reaches 1 at ``step + 1 == warmup_steps``; the first step never uses 0, which
    would waste it.
    """
    n = step + 1
    warmup = config.warmup_steps
    if warmup and n < warmup:
        return n / warmup
    if config.schedule == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / n)
    if config.schedule == "cosine":
        # TrainConfig guarantees max_steps with a cosine schedule.
        span = max((config.max_steps or n) - warmup, 1)
        progress = min(max(n - warmup, 0) / span, 1.0)
        floor = config.min_lr_ratio
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_factor` (its state is just the step count, so it resumes)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
