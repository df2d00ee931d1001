"""A task-agnostic trainer: AdamW, warmup + decay, clipping, validation, early stopping,
checkpoints that resume exactly, and data parallelism through PyTorch's DDP.

::

    trainer = Trainer(model, task, batches, TrainConfig(max_steps=2000), save=save_folder)
    result = trainer.fit()                       # or fit(resume=load_training_state(folder))

Non-finite steps: a step whose loss or gradients are NaN or infinite is skipped (no optimizer
or scheduler update, a logged warning naming the step), up to ``max_nonfinite_steps`` in a row; one
more stops training with :class:`NonFiniteTrainingError` (a ``ValueError``: ``qkv train``
prints it as one line). Weights that are no longer finite are never saved, so a good
checkpoint is never overwritten by a diverged one.

One step: the task's summed loss over the batch is divided by the number of units (tokens)
summed over every process, times the number of processes (DDP averages gradients), so N
processes on N shards take exactly the step one process takes on the whole global batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qkv.train.config import TrainConfig
from qkv.train.device import autocast, resolve_device, resolve_precision
from qkv.train.distributed import DistributedContext, init_from_env
from qkv.train.schedule import make_scheduler
from qkv.train.state import TrainState, capture_rng, restore_rng, seed_everything
from qkv.train.task import BatchSource, LossOutput, Task

__all__ = [
    "EvalReport",
    "NonFiniteTrainingError",
    "SaveFn",
    "StepReport",
    "StopReason",
    "TrainResult",
    "Trainer",
]

logger = logging.getLogger(__name__)

StopReason = Literal["max_steps", "max_minutes", "early_stopping"]
SaveFn = Callable[[nn.Module, dict[str, Any], int], None]
"""``save(model, training_state, step)``: write a checkpoint (the model is unwrapped)."""


class NonFiniteTrainingError(ValueError):
    """Training diverged: the loss or the gradients stayed non-finite (or the weights became
    so). The message names the step and what to try; no checkpoint was written from it."""


@dataclass(frozen=True)
class StepReport:
    """Progress every ``log_every`` steps.

    Attributes:
        step: steps done.
        max_steps: the step limit, if any.
        loss: mean training loss over the steps since the last report.
        lr: current learning rate.
        tokens_per_s: tokens (all processes) per second since the last report.
        elapsed_s: training time so far.
        max_seconds: the time limit, if any.
    """

    step: int
    max_steps: int | None
    loss: float
    lr: float
    tokens_per_s: float
    elapsed_s: float
    max_seconds: float | None


@dataclass(frozen=True)
class EvalReport:
    """One validation: its metrics, and whether it is the best so far."""

    step: int
    metrics: dict[str, float]
    improved: bool
    best_metric: float


@dataclass(frozen=True)
class TrainResult:
    """The final state and why training stopped."""

    state: TrainState
    stopped: StopReason


class Trainer:
    """Train ``model`` on ``task`` with batches from ``data``.

    Args:
        model: the module (moved to the configured device here).
        task: loss and validation (see :class:`~qkv.train.task.Task`).
        data: this process's training batches (see :class:`~qkv.train.task.BatchSource`).
        config: the training settings.
        save: writes a checkpoint; called on the main process only (``None``: no checkpoints).
        on_step: called with a :class:`StepReport` every ``log_every`` steps (main process).
        on_eval: called with an :class:`EvalReport` after each validation (main process).
        distributed: the process group; default: from ``torchrun``'s environment variables.
        max_nonfinite_steps: consecutive steps with a non-finite loss or gradient that are
            skipped (each with a warning) before training stops with
            :class:`NonFiniteTrainingError`.

    Attributes:
        skipped_steps: how many steps were skipped for a non-finite loss or gradient.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        data: BatchSource,
        config: TrainConfig,
        *,
        save: SaveFn | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        on_eval: Callable[[EvalReport], None] | None = None,
        distributed: DistributedContext | None = None,
        max_nonfinite_steps: int = 3,
    ) -> None:
        if isinstance(max_nonfinite_steps, bool) or not isinstance(max_nonfinite_steps, int):
            raise TypeError(f"max_nonfinite_steps must be an int; got {max_nonfinite_steps!r}")
        if max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0; got {max_nonfinite_steps}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.skipped_steps = 0
        self._last_saved_step: int | None = None
        self._nonfinite_in_a_row = 0
        self.config = config
        self.device = resolve_device(config.device)
        self.autocast_dtype = resolve_precision(config.precision, self.device)
        self.dist = distributed or init_from_env(self.device)
        self.model = model.to(self.device)
        self.task = task
        self.data = data
        self.save = save
        self.on_step = on_step
        self.on_eval = on_eval
        self.optimizer = _adamw(self.model, config)
        self.state = TrainState()
        self.scheduler = make_scheduler(self.optimizer, config, lambda: self.state.elapsed_s)
        self._wrapped: nn.Module = self.model
        if self.dist.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._wrapped = DistributedDataParallel(self.model, device_ids=device_ids)

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, resume: dict[str, Any] | None = None) -> TrainResult:
        """Train until a limit or early stopping.

        Args:
            resume: a state from :meth:`training_state` (via a checkpoint); the model's weights
                must already be those saved with it.

        Returns:
            The final :class:`TrainResult` (the last checkpoint is written before returning).
        """
        if resume is not None:
            self._restore(resume)
        else:
            seed_everything(self.config.seed + self.dist.rank)
        start = time.monotonic() - self.state.elapsed_s
        meter = _Meter()
        batches = self._batches()
        stopped: StopReason | None = self._limit_reached(start)
        self.model.train()
        while stopped is None:
            loss, tokens = self._step(next(batches))
            self.state.step += 1
            self.state.batch_in_epoch += 1
            self.state.losses.append(loss)
            self.state.elapsed_s = time.monotonic() - start
            meter.add(loss, tokens)
            self._maybe_report(meter)
            stopped = self._limit_reached(start)
            stopped = self._maybe_validate(final=stopped is not None) or stopped
            self._maybe_save(final=stopped is not None)
        logger.info("training stopped at step %d: %s", self.state.step, stopped)
        return TrainResult(self.state, stopped)

    def _batches(self) -> Iterator[Any]:
        while True:
            if self.data.num_batches(self.state.epoch) == 0:
                raise ValueError(f"the training data has no batches in epoch {self.state.epoch}")
            yield from self.data.iter_from(self.state.epoch, self.state.batch_in_epoch)
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def _step(self, batch: Any) -> tuple[float, int]:
        batch = batch.to(self.device) if hasattr(batch, "to") else batch
        with autocast(self.device, self.autocast_dtype):
            out: LossOutput = self.task.loss(self._wrapped, batch)
        count, total, tokens = self._global_sums(out)
        if count <= 0:
            raise ValueError(f"step {self.state.step + 1}: the batch has no units to train on")
        # DDP averages gradients over processes: scale so the result is sum / global count.
        (out.total.float() * (self.dist.world_size / count)).backward()
        if not self._finite_step(total):
            self.optimizer.zero_grad(set_to_none=True)
            return total / count, int(tokens)
        if self.config.clip_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / count, int(tokens)

    def _finite_step(self, total: float) -> bool:
        """Whether this step's loss and gradients are finite (the same answer on every
        process). A non-finite step is counted and warned about; too many in a row raise."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        finite = math.isfinite(total)
        if finite and grads:  # one device sync for all the gradients
            finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        bad = self.dist.any_true(not finite)
        if not bad:
            self._nonfinite_in_a_row = 0
            return True
        step = self.state.step + 1
        what = "loss" if not math.isfinite(total) else "gradients"
        self.skipped_steps += 1
        self._nonfinite_in_a_row += 1
        if self._nonfinite_in_a_row > self.max_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"training diverged: step {step} has a non-finite {what} (loss {total}), the "
                f"{self._nonfinite_in_a_row}th such step in a row; stopped without saving it "
                f"({self._saved_note()}). Lower the learning rate (now {self.config.lr:g}) or "
                "set a clip norm"
            )
        message = (
            f"step {step}: non-finite {what} (loss {total}); skipping the update "
            f"({self._nonfinite_in_a_row} of at most {self.max_nonfinite_steps} in a row)"
        )
        logger.warning(message)  # the CLI shows it as one line
        return False

    def _global_sums(self, out: LossOutput) -> tuple[float, float, float]:
        local = torch.tensor(
            [float(out.count), float(out.total.detach()), float(out.tokens)], dtype=torch.float64
        )
        if self.dist.enabled:
            local = local.to(self.device if self.device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(local)
        count, total, tokens = local.tolist()
        return count, total, tokens

    # -- limits, validation, checkpoints -----------------------------------------------------

    def _limit_reached(self, start: float) -> StopReason | None:
        if self.config.max_steps is not None and self.state.step >= self.config.max_steps:
            return "max_steps"
        if self.config.max_minutes is not None:
            late = time.monotonic() - start >= 60.0 * self.config.max_minutes
            if self.dist.any_true(late):  # every process must stop at the same step
                return "max_minutes"
        return None

    def _maybe_validate(self, *, final: bool) -> StopReason | None:
        if not final and self.state.step % self.config.eval_every:
            return None
        metrics = self.dist.broadcast(self._validate() if self.dist.is_main else None)
        value = float(metrics[self.task.metric])
        best = self.state.best_metric
        sign = 1.0 if self.task.higher_is_better else -1.0
        improved = best is None or sign * (value - best) > 0 or math.isnan(best)
        if improved:
            self.state.best_metric, self.state.best_step = value, self.state.step
            self.state.evals_since_best = 0
        else:
            self.state.evals_since_best += 1
        self.state.evaluations.append({"step": float(self.state.step), **metrics})
        logger.info("step %d validation: %s", self.state.step, _format_metrics(metrics))
        if self.on_eval is not None and self.dist.is_main:
            best_now = self.state.best_metric if self.state.best_metric is not None else value
            self.on_eval(EvalReport(self.state.step, metrics, improved, best_now))
        patience = self.config.patience
        if patience is not None and self.state.evals_since_best >= patience:
            return "early_stopping"
        return None

    def _validate(self) -> dict[str, float]:
        self.model.eval()
        try:
            with torch.no_grad(), autocast(self.device, self.autocast_dtype):
                metrics = self.task.validate(self.model)
        finally:
            self.model.train()
        if self.task.metric not in metrics:
            raise ValueError(
                f"task {self.task.name!r} validation returned {sorted(metrics)}, "
                f"without its metric {self.task.metric!r}"
            )
        return {k: float(v) for k, v in metrics.items()}

    def _maybe_save(self, *, final: bool) -> None:
        if self.save is None:
            return
        if self.config.keep_best:
            if self.state.best_step != self.state.step:  # this step's validation did not improve
                return
        elif not final and self.state.step % self.config.save_every:
            return
        self._check_weights_finite()
        if self.dist.is_main:
            self.save(self.model, self.training_state(), self.state.step)
            self._last_saved_step = self.state.step
        self.dist.barrier()  # nobody runs ahead of a checkpoint they might resume from

    def _saved_note(self) -> str:
        if self._last_saved_step is None:
            return "no checkpoint was saved by this run"
        return f"the last checkpoint, from step {self._last_saved_step}, is intact"

    def _check_weights_finite(self) -> None:
        """Refuse to checkpoint weights that are no longer finite (a good checkpoint must never
        be replaced by a diverged one)."""
        named = list(self.model.named_parameters())
        finite = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist() if named else []
        bad = [name for (name, _), ok in zip(named, finite, strict=True) if not ok]
        if self.dist.any_true(bool(bad)):
            raise NonFiniteTrainingError(
                f"training diverged: at step {self.state.step} the weights are not finite "
                f"({len(bad)} tensors, e.g. {', '.join(bad[:3]) or 'on another process'}); not "
                f"saving them ({self._saved_note()})"
            )

    def _maybe_report(self, meter: _Meter) -> None:
        if self.state.step % self.config.log_every and self.state.step != self.config.max_steps:
            return
        report = StepReport(
            step=self.state.step,
            max_steps=self.config.max_steps,
            loss=meter.mean_loss(),
            lr=float(self.scheduler.get_last_lr()[0]),
            tokens_per_s=meter.tokens_per_s(),
            elapsed_s=self.state.elapsed_s,
            max_seconds=None if self.config.max_minutes is None else 60 * self.config.max_minutes,
        )
        meter.reset()
        if self.dist.is_main:
            logger.debug("step %d loss %.4f lr %.2e", report.step, report.loss, report.lr)
            if self.on_step is not None:
                self.on_step(report)

    # -- checkpoint state --------------------------------------------------------------------

    def training_state(self) -> dict[str, Any]:
        """Everything beyond the weights that an exact resume needs."""
        return {
            "trainer": self.state.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng(),
            "world_size": self.dist.world_size,
        }

    def _restore(self, saved: dict[str, Any]) -> None:
        self.state = TrainState.from_dict(saved["trainer"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.dist.enabled or saved.get("world_size", 1) != 1:
            # Only the main process's generators were saved: give each process its own stream.
            seed_everything(self.config.seed + 1_000_003 * self.state.step + self.dist.rank)
        else:
            restore_rng(saved["rng"])
        logger.info("resumed at step %d (epoch %d)", self.state.step, self.state.epoch)


def _adamw(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms' gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def _format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


class _Meter:
    """Loss and throughput since the last report."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: list[float] = []
        self.tokens = 0
        self.start = time.monotonic()

    def add(self, loss: float, tokens: int) -> None:
        self.losses.append(loss)
        self.tokens += tokens

    def mean_loss(self) -> float:
        return sum(self.losses) / max(len(self.losses), 1)

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.monotonic() - self.start, 1e-9)
