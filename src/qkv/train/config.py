"""The training configuration: one frozen dataclass, validated when built, saved in config.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

__all__ = ["Precision", "Schedule", "TrainConfig"]

Schedule = Literal["inverse_sqrt", "cosine", "constant"]
Precision = Literal["auto", "bf16", "fp32"]


@dataclass(frozen=True)
class TrainConfig:
    """How to train, independent of the task and the model.

    Attributes:
        lr: peak learning rate of AdamW (reached at the end of the warmup).
        weight_decay: AdamW's decoupled weight decay (not applied to biases and norms).
        betas: AdamW's moment coefficients.
        warmup_steps: linear warmup from 0 to ``lr``.
        schedule: decay after the warmup: ``"inverse_sqrt"`` (``lr * sqrt(warmup / step)``, the
            original Transformer's), ``"cosine"`` (to ``min_lr_ratio * lr`` at ``max_steps`` or
            at ``max_minutes``, whichever comes first), or ``"constant"``.
        min_lr_ratio: where the cosine ends, as a fraction of ``lr``.
        max_steps: stop after this many optimizer steps (``None``: only the time limit).
        max_minutes: stop after this much training time (``None``: only the step limit).
        clip_norm: clip the global gradient norm to this (``None``: no clipping).
        eval_every: validate every this many steps (and at the end).
        patience: stop early after this many validations without improvement (``None``: never).
        checkpoint_every: write the model folder every this many steps (default: at each
            validation); always at the end.
        keep_best: write the model folder only after a validation that improves on every
            earlier one, so that it ends up holding the best-validated weights (and the
            training state of that step, from which ``--resume`` continues) rather than the
            last step's; ``checkpoint_every`` is then ignored.
        log_every: report loss and tokens/s every this many steps.
        seed: seeds Python's and torch's generators and the data order.
        device: ``"auto"`` (CUDA if present, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU), ``"bf16"`` or ``"fp32"``.

    Raises:
        ValueError: a field out of range (the message names it and its value), or neither
            limit given.
    """

    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100
    schedule: Schedule = "inverse_sqrt"
    min_lr_ratio: float = 0.0
    max_steps: int | None = 1000
    max_minutes: float | None = None
    clip_norm: float | None = 1.0
    eval_every: int = 200
    patience: int | None = None
    checkpoint_every: int | None = None
    keep_best: bool = False
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    precision: Precision = "auto"

    def __post_init__(self) -> None:
        self._check_positive()
        if self.max_steps is None and self.max_minutes is None:
            raise ValueError("give max_steps, max_minutes or both: training needs a limit")
        if self.schedule not in ("inverse_sqrt", "cosine", "constant"):
            raise ValueError(
                f"schedule must be 'inverse_sqrt', 'cosine' or 'constant', got {self.schedule!r}"
            )
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        # JSON round trips turn the tuple into a list; keep the field hashable and comparable.
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))

    def _check_positive(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("max_steps", "eval_every", "patience", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("max_minutes", "clip_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")

    @property
    def save_every(self) -> int:
        """Steps between checkpoints."""
        return self.checkpoint_every or self.eval_every

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (for config.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known: {sorted(known)}")
        kwargs: dict[str, Any] = dict(values)  # __post_init__ turns a JSON list of betas back
        return cls(**kwargs)
