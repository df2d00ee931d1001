"""Learning-rate schedules: linear warmup, then inverse square root, cosine or constant."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from qkv.train.config import TrainConfig

__all__ = ["lr_factor", "make_scheduler"]


def lr_factor(step: int, config: TrainConfig, elapsed_s: float | None = None) -> float:
    """The multiplier of ``config.lr`` for optimizer step ``step`` (0-based: the first update
    uses ``lr_factor(0)``).

    The warmup reaches 1 at ``step + 1 == warmup_steps``; the first step never uses 0, which
    would waste it. The cosine's progress is the larger of the step fraction
    (``max_steps``) and, when ``max_minutes`` is set and ``elapsed_s`` given, the time
    fraction: the decay ends when the first limit does, so a run cut short by its time limit
    on a slow machine still anneals (at the price of bit-exact reproducibility, which a
    time-dependent schedule cannot have).
    """
    n = step + 1
    warmup = config.warmup_steps
    if warmup and n < warmup:
        return n / warmup
    if config.schedule == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / n)
    if config.schedule == "cosine":
        progress = _cosine_progress(n, config, elapsed_s)
        floor = config.min_lr_ratio
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def _cosine_progress(n: int, config: TrainConfig, elapsed_s: float | None) -> float:
    progress = 0.0
    if config.max_steps is not None:
        span = max(config.max_steps - config.warmup_steps, 1)
        progress = max(n - config.warmup_steps, 0) / span
    if config.max_minutes is not None and elapsed_s is not None:
        progress = max(progress, elapsed_s / (60.0 * config.max_minutes))
    return min(progress, 1.0)


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    elapsed: Callable[[], float] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_factor` (its state is just the step count, so it resumes).

    Args:
        elapsed: training seconds so far, for a cosine that also follows ``max_minutes``.
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config, elapsed() if elapsed else None)
    )
