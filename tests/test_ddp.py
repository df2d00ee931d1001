"""Data parallelism: two CPU processes on gloo take exactly the steps one process takes on the
same global batches."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qkv.train import DistributedContext, TrainConfig, Trainer
from test_train import ToyBatch, ToyModel, ToyTask, toy_data

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
