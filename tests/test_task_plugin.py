"""A new task plugs into the lifecycle with one module and one line in the task table.

This module *is* such a task (``SPEC`` below: the sign of a number, from a CSV), added to
``qkv.tasks.base.TASKS`` for the test only: ``qkv train toy``, ``--resume`` and
``qkv evaluate`` then work with nothing else written.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from qkv.cli.main import main
from qkv.data.batching import TensorBatch
from qkv.data.labeled import LabeledText, load_labeled, read_labeled
from qkv.data.registry import Splits
from qkv.tasks.base import TASKS, EvalOptions, Evaluation, Flag, Prepared, Settings, TaskSpec
from qkv.train import LossOutput, load_model

pytest.importorskip("safetensors")


@dataclass(frozen=True)
class ToySettings(Settings):
    data: str = ""
    data_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 4
    hidden: int = 8


@dataclass(frozen=True)
class ToyBatch(TensorBatch):
    x: Tensor  # (B, 1)
    y: Tensor  # (B,)


class ToyData:
    def __init__(self, examples: Sequence[LabeledText]) -> None:
        self.items = [(float(e.text), int(e.label == "pos")) for e in examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[float, int]:
        return self.items[i]

    def lengths(self) -> list[int]:
        return [1] * len(self.items)


def collate(items: list[tuple[float, int]]) -> ToyBatch:
    return ToyBatch(torch.tensor([[x] for x, _ in items]), torch.tensor([y for _, y in items]))


def build(config: dict[str, Any]) -> nn.Module:
    return nn.Sequential(nn.Linear(1, config["hidden"]), nn.Tanh(), nn.Linear(config["hidden"], 2))


class ToyObjective:
    name, metric, higher_is_better = "toy", "accuracy", True

    def __init__(self, validation: ToyData) -> None:
        self.validation = collate(list(validation.items))

    def loss(self, model: nn.Module, batch: ToyBatch) -> LossOutput:
        total = nn.functional.cross_entropy(model(batch.x), batch.y, reduction="sum")
        return LossOutput(total, len(batch), len(batch))

    def validate(self, model: nn.Module) -> dict[str, float]:
        return {"accuracy": accuracy(model, self.validation)}


def accuracy(model: nn.Module, batch: ToyBatch) -> float:
    with torch.no_grad():
        return float((model(batch.x).argmax(-1) == batch.y).float().mean())


@dataclass
class ToyPredictor:
    model: nn.Module


class ToySpec(TaskSpec[ToySettings, ToyPredictor]):
    name = "toy"
    settings_type = ToySettings
    summary = "the sign of a number"
    train_flags = (
        Flag("--hidden", "hidden", "hidden units", int),
        Flag("--x-column", "data_options.text_column", "number column", reader=True),
    )

    def load_splits(self, data: str, options: dict[str, Any]) -> Splits[LabeledText]:
        return load_labeled(data, **options)

    def read_file(self, path: str, options: dict[str, Any]) -> list[LabeledText]:
        return read_labeled(path, **options)

    def prepare(
        self, settings: ToySettings, splits: Splits[Any], *, folder: Path | None
    ) -> Prepared:
        config = {"hidden": settings.hidden}
        return Prepared(
            settings=settings,
            model=build(config),
            model_config=config,
            objective=ToyObjective(ToyData(splits.validation or splits.train)),
            train_set=ToyData(splits.train),
            collate=collate,
            batch_size=settings.batch_size,
        )

    def load(self, folder: Path, *, device: str = "auto") -> ToyPredictor:
        return ToyPredictor(load_model(folder, build)[0])

    def evaluate(
        self, predictor: ToyPredictor, examples: Sequence[Any], options: EvalOptions
    ) -> dict[str, Any]:
        return {"accuracy": accuracy(predictor.model, collate(ToyData(examples).items))}

    def format_metrics(self, evaluation: Evaluation) -> list[str]:
        return [f"  accuracy {evaluation.metrics['accuracy']:.3f}"]

    def run_classify(self, args: Any) -> int:
        """``qkv classify --model M 1.5 -0.2``: one label per number."""
        model = self.load(args.model).model
        with torch.no_grad():
            classes = model(torch.tensor([[float(t)] for t in args.text])).argmax(-1)
        print(" ".join("pos" if c else "neg" for c in classes.tolist()))
        return 0


SPEC = ToySpec()


def test_a_new_task_gets_train_resume_and_evaluate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(TASKS, "toy", __name__)  # the one line a new task adds
    generator = torch.Generator().manual_seed(0)
    values = (torch.rand(60, generator=generator) * 4 - 2).tolist()
    data = tmp_path / "numbers.csv"
    data.write_text("n,label\n" + "".join(f"{v:.4f},{'pos' if v > 0 else 'neg'}\n" for v in values))
    out = tmp_path / "m"
    train = ["train", "toy", "--data", str(data), "--x-column", "n", "--hidden", "6", "--out",
             str(out), "--lr", "0.05", "--warmup", "0", "--eval-every", "20", "--device", "cpu",
             "--quiet"]  # fmt: skip
    assert main([*train, "--steps", "40"]) == 0
    assert "trained 40 steps" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "toy" and config["toy"]["data_options"] == {"text_column": "n"}
    assert main(["train", "toy", "--out", str(out), "--resume", "--steps", "60"]) == 0
    assert "trained 60 steps" in capsys.readouterr().out
    assert main(["train", "toy", "--out", str(out), "--resume", "--hidden", "7"]) == 2
    assert "hidden is 7 but the run saved in" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(out), "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "toy" and report["examples"] == 60
    assert report["metrics"]["accuracy"] > 0.9
    assert main(["evaluate", "--model", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("  accuracy ")
    # qkv classify hands a folder of another classifying task to its spec.
    assert main(["classify", "--model", str(out), "1.7", "-1.3"]) == 0
    assert capsys.readouterr().out.split() == ["pos", "neg"]
