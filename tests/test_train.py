"""The task-agnostic trainer on a toy classification task: overfitting, exact resume, limits,
early stopping, schedules and config validation."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from qkv.train import (
    TrainConfig,
    Trainer,
    load_training_state,
    load_weights,
    lr_factor,
    read_config,
    save_model_folder,
)
from toys import (
    ToyBatch,
    ToyModel,
    ToyTask,
    fast_config,
    toy_data,
    toy_source,
)

pytest.importorskip("safetensors")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


# --------------------------------------------------------------------------------------------
# A toy task every training test shares (also imported by test_checkpoint and test_ddp).


def toy_trainer(config: TrainConfig, *, dropout: float = 0.1, **kwargs: Any) -> Trainer:
    torch.manual_seed(config.seed)
    x, y = toy_data()
    return Trainer(ToyModel(dropout=dropout), ToyTask(x, y), toy_source(x, y), config, **kwargs)


# --------------------------------------------------------------------------------------------


def test_overfits_32_examples() -> None:
    trainer = toy_trainer(fast_config(max_steps=300, eval_every=100, schedule="constant"))
    result = trainer.fit()
    assert result.stopped == "max_steps"
    assert result.state.evaluations[-1]["accuracy"] == 1.0
    assert result.state.losses[-1] < 0.1 * result.state.losses[0]


def test_reports_progress_and_validation() -> None:
    steps, evals = [], []
    trainer = toy_trainer(fast_config(), on_step=steps.append, on_eval=evals.append)
    result = trainer.fit()
    assert [r.step for r in steps] == [5, 10, 15, 20]
    assert all(r.tokens_per_s > 0 and math.isfinite(r.loss) for r in steps)
    assert [e.step for e in evals] == [5, 10, 15, 20]
    assert result.state.best_metric == max(e.metrics["accuracy"] for e in evals)


class SimulatedCrashError(Exception):
    pass


def test_resume_continues_the_same_loss_curve(tmp_path: Path) -> None:
    config = fast_config(max_steps=24, eval_every=4, checkpoint_every=8)
    uninterrupted = toy_trainer(config).fit().state.losses

    def save_then_crash(model: nn.Module, state: dict[str, Any], step: int) -> None:
        save_model_folder(
            tmp_path, model=model, config={"model": model.config}, training_state=state, step=step
        )
        if step == 16:
            raise SimulatedCrashError

    with pytest.raises(SimulatedCrashError):
        toy_trainer(config, save=save_then_crash).fit()

    resumed = toy_trainer(config)  # fresh model and optimizer, as a new process would build
    step = load_weights(resumed.model, tmp_path)
    assert step == read_config(tmp_path)["step"] == 16
    result = resumed.fit(resume=load_training_state(tmp_path, expected_step=step))
    assert len(result.state.losses) == 24
    assert result.state.losses == uninterrupted  # step by step, exactly (dropout included)


def test_same_seed_same_run_other_seed_other_run() -> None:
    a = toy_trainer(fast_config(max_steps=6)).fit().state.losses
    b = toy_trainer(fast_config(max_steps=6)).fit().state.losses
    c = toy_trainer(fast_config(max_steps=6, seed=1)).fit().state.losses
    assert a == b
    assert a != c


def test_early_stopping_after_patience() -> None:
    trainer = toy_trainer(fast_config(max_steps=1000, eval_every=2, patience=3))
    trainer.task.validate = lambda model: {"accuracy": 0.5}  # type: ignore[method-assign]
    result = trainer.fit()
    assert result.stopped == "early_stopping"
    assert result.state.step == 8  # best at step 2, then 3 validations without improvement
    assert result.state.best_step == 2


def test_keep_best_saves_only_improving_validations() -> None:
    scores = iter([0.5, 0.7, 0.6, 0.9, 0.8, 0.8])
    saved: list[tuple[int, dict[str, Tensor], int]] = []

    def save(model: nn.Module, state: dict[str, Any], step: int) -> None:
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        saved.append((step, weights, state["trainer"]["step"]))

    trainer = toy_trainer(fast_config(max_steps=30, eval_every=5, keep_best=True), save=save)
    trainer.task.validate = lambda model: {"accuracy": next(scores)}  # type: ignore[method-assign]
    result = trainer.fit()
    assert result.state.step == 30
    assert [step for step, _, _ in saved] == [5, 10, 20]  # not 15, 25 nor the final 30
    assert all(step == state_step for step, _, state_step in saved)
    last = saved[-1][1]
    final = trainer.model.state_dict()
    assert any(not torch.equal(last[k], final[k]) for k in final)  # step 20's, not the last


def test_time_limit_stops() -> None:
    result = toy_trainer(fast_config(max_steps=None, max_minutes=1e-6)).fit()
    assert result.stopped == "max_minutes"
    assert result.state.step == 1


def test_gradient_clipping_bounds_the_update() -> None:
    trainer = toy_trainer(
        fast_config(max_steps=1, clip_norm=1e-3, warmup_steps=0, lr=1.0, weight_decay=0.0)
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    # Adam normalises the step, so check the clipped gradient itself through a hook.
    norms: list[float] = []
    original = nn.utils.clip_grad_norm_

    def spy(params: Any, max_norm: float, **kw: Any) -> Tensor:
        params = list(params)
        total = original(params, max_norm, **kw)
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))
        return total

    nn.utils.clip_grad_norm_ = spy  # type: ignore[assignment]
    try:
        trainer.fit()
    finally:
        nn.utils.clip_grad_norm_ = original
    assert norms and norms[0] <= 1e-3 * 1.001
    assert any(
        not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True)
    )


def test_schedules() -> None:
    inv = TrainConfig(warmup_steps=10, max_steps=100)
    factors = [lr_factor(s, inv) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0
    assert all(a < b for a, b in itertools.pairwise(factors[:10]))
    assert factors[39] == pytest.approx(math.sqrt(10 / 40))
    cos = TrainConfig(warmup_steps=10, max_steps=110, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(9, cos) == 1.0
    assert lr_factor(59, cos) == pytest.approx(0.55)
    assert lr_factor(109, cos) == pytest.approx(0.1)
    # With a time limit too, the cosine follows whichever limit is nearer.
    timed = TrainConfig(warmup_steps=10, max_steps=110, max_minutes=1.0, schedule="cosine")
    assert lr_factor(59, timed, elapsed_s=0.0) == pytest.approx(0.5)
    assert lr_factor(59, timed, elapsed_s=60.0) == pytest.approx(0.0)
    assert lr_factor(20, timed, elapsed_s=30.0) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr must be > 0, got 0.0"),
        ({"max_steps": None}, "give max_steps, max_minutes or both"),
        ({"eval_every": 0}, "eval_every must be >= 1, got 0"),
        ({"schedule": "linear"}, "schedule must be"),
        ({"betas": (0.9, 1.5)}, "betas must be two numbers in [0, 1), got (0.9, 1.5)"),
        ({"clip_norm": -1.0}, "clip_norm must be > 0, got -1.0"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(
        ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        TrainConfig(**kwargs)


def test_config_round_trips_through_json() -> None:
    import json

    config = TrainConfig(lr=3e-4, schedule="cosine", max_steps=50, patience=2)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown training config keys \\['learning_rate'\\]"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_toy_batches_are_iterable_from_any_position() -> None:
    x, y = toy_data()
    source = toy_source(x, y)
    full: Iterator[ToyBatch] = source.iter_from(3, 0)
    tail = list(source.iter_from(3, 2))
    assert [torch.equal(a.y, b.y) for a, b in zip(list(full)[2:], tail, strict=True)] == [
        True,
        True,
    ]
