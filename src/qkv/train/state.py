"""The trainer's progress: what a checkpoint must hold to continue exactly."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["TrainState", "capture_rng", "restore_rng", "seed_everything"]


@dataclass
class TrainState:
    """Where training stands.

    Attributes:
        step: optimizer steps taken.
        epoch: current epoch of the batch source.
        batch_in_epoch: batches of ``epoch`` already consumed (the data position).
        best_metric: best validation metric so far (``None`` before the first validation).
        best_step: the step that reached it.
        evals_since_best: validations since the best one (early stopping counts these).
        elapsed_s: training wall time so far, summed over resumed runs.
        losses: mean training loss of every step, in order (the loss curve).
        evaluations: every validation: ``{"step": ..., **metrics}``.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    elapsed_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainState:
        return cls(**{k: values[k] for k in cls.__dataclass_fields__ if k in values})


def seed_everything(seed: int) -> None:
    """Seed Python's ``random`` and torch (CPU and every GPU)."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture_rng() -> dict[str, Any]:
    """The generators' states (Python, torch CPU, CUDA), as tensors and plain values."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng` (CUDA states only when this machine has the same GPUs)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
