"""Data parallelism: two CPU processes on gloo take exactly the steps one process takes on the
same global batches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qkv.train import DistributedContext, TrainConfig, Trainer
from toys import GlobalBatches, ToyBatch, ToyModel, ToyTask, toy_data
from toys import free_port as _free_port

pytest.importorskip("safetensors")

STEPS = 4
GLOBAL_BATCH = 12


class ShardedBatches:
    """Fixed global batches of uneven example counts; process ``rank`` of ``world`` gets a
    contiguous share of each (shares differ in size, which the trainer's global-count
    normalisation must absorb)."""

    def __init__(self, rank: int, world: int) -> None:
        self.x, self.y = toy_data(n=STEPS * GLOBAL_BATCH, seed=5)
        self.rank, self.world = rank, world

    def num_batches(self, epoch: int) -> int:
        return STEPS

    def iter_from(self, epoch: int, start: int) -> Iterator[ToyBatch]:
        for step in range(start, STEPS):
            rows = torch.arange(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
            cut = [0, 5, GLOBAL_BATCH] if self.world == 2 else [0, GLOBAL_BATCH]
            mine = rows[cut[self.rank] : cut[self.rank + 1]]
            yield ToyBatch(self.x[mine], self.y[mine])


def _config() -> TrainConfig:
    return TrainConfig(
        lr=1e-2, warmup_steps=2, max_steps=STEPS, eval_every=STEPS, device="cpu", log_every=1
    )


def _train(rank: int, world: int, distributed: DistributedContext | None) -> ToyModel:
    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = ToyModel(dropout=0.0)
    x, y = toy_data(n=16, seed=6)
    trainer = Trainer(
        model, ToyTask(x, y), ShardedBatches(rank, world), _config(), distributed=distributed
    )
    trainer.fit()
    return model


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        model = _train(rank, world, DistributedContext(rank=rank, world_size=world))
        torch.save(model.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_global_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _train(0, 1, DistributedContext()).state_dict()
    ranks: list[dict[str, Any]] = [
        torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)
    ]
    torch.manual_seed(0)
    initial = ToyModel(dropout=0.0)  # the common start, which training must have left
    for name, value in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name])  # the replicas stay identical
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(initial.state_dict()[n], v) for n, v in single.items())


# --------------------------------------------------------------------------------------------
# A real task through qkv.tasks.train_task: sentiment under 2-process gloo DDP.

SENTIMENT_STEPS = 3


def _sentiment_settings(data: Path) -> Any:
    from qkv.tasks.sentiment import SentimentSetup

    return SentimentSetup(
        data=str(data),
        preset="tiny",
        vocab_size=60,
        batch_size=4,
        model_overrides={"dropout": 0.0},  # dropout streams differ per process
        data_options={"validation": 0.0, "test": 0.0},
    )


def _sentiment_training() -> TrainConfig:
    return TrainConfig(
        lr=1e-2, warmup_steps=0, max_steps=SENTIMENT_STEPS, eval_every=100, device="cpu"
    )


def _sentiment_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    from qkv.tasks import train_task

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        train_task("sentiment", _sentiment_settings(Path(data)), _sentiment_training(), out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sentiment_two_processes_match_one_process(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    pytest.importorskip("sklearn")
    from qkv.tasks import get_task
    from qkv.train import load_model, seed_everything

    rows = [("good great fine", "pos"), ("bad awful dull", "neg"), ("lovely film", "pos"),
            ("poor and dull", "neg"), ("great great", "pos"), ("awful mess", "neg")]  # fmt: skip
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"{t} {i},{y}\n" for i, (t, y) in enumerate(rows * 4)))
    out = tmp_path / "ddp"
    mp.spawn(_sentiment_worker, args=(2, _free_port(), str(data), str(out)), nprocs=2, join=True)
    spec = get_task("sentiment")
    settings = _sentiment_settings(data)
    seed_everything(0)  # as train_task does before building the model
    prepared = spec.prepare(
        settings, spec.load_splits(str(data), settings.data_options), folder=None
    )
    single = prepared.model
    initial = {k: v.clone() for k, v in single.state_dict().items()}
    trainer = Trainer(
        single,
        prepared.objective,
        GlobalBatches(prepared, seed=0),
        _sentiment_training(),
        distributed=DistributedContext(),
    )
    trainer.fit()
    from qkv.models.classifier import AttentionClassifier, ClassifierConfig

    ddp, _ = load_model(out, lambda c: AttentionClassifier(ClassifierConfig.from_dict(c)))
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp.state_dict()[name], value, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(initial[n], v) for n, v in single.state_dict().items())
