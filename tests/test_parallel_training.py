"""Training under context parallelism (``qkv train sentiment --context-parallel P`` under
``torchrun``): two gloo processes, each holding half of every sequence (zigzag), take the
steps one process takes on the whole sequences; four processes as a 2 x 2 data x context mesh
take the steps two data-parallel processes take."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from toys import free_port

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

STEPS = 4
WORDS = [
    "good",
    "bad",
    "film",
    "plot",
    "actor",
    "scene",
    "music",
    "dull",
    "great",
    "awful",
    "long",
    "slow",
    "fun",
    "dark",
    "warm",
    "cold",
]


def _reviews(path: Path) -> Path:
    """Reviews of 20 to 90 words (sequences of uneven lengths, padded in a batch), labelled by
    which of two words they use more."""
    rng = random.Random(3)
    rows = ["review,stars"]
    for _ in range(48):
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 90))]
        rows.append(
            f'"{" ".join(words)}",{"pos" if words.count("good") >= words.count("bad") else "neg"}'
        )
    path.write_text("\n".join(rows) + "\n")
    return path


def _train(folder: Path, data: Path, context_parallel: int) -> list[float]:
    from qkv.tasks import train_task
    from qkv.tasks.sentiment import SentimentSetup
    from qkv.train import TrainConfig

    settings = SentimentSetup(
        preset="transformer-small",
        vocab_size=120,
        batch_size=6,
        max_length=None,
        penalty=0.1,  # reads the pooling weights of every token, gathered over the ranks
        model_overrides={"dropout": 0.0, "embed_dim": 32, "hidden_dim": 64, "pool_queries": 2},
        data_options={"text_column": "review", "label_column": "stars", "validation": 0.25},
    )
    config = TrainConfig(
        lr=3e-3, max_steps=STEPS, eval_every=2, warmup_steps=0, device="cpu", log_every=1
    )
    outcome = train_task(
        "sentiment",
        replace(settings, data=str(data)),
        config,
        folder,
        context_parallel=context_parallel,
    )
    return [float(x) for x in outcome.result.state.losses]


def _worker(rank: int, world: int, port: int, folder: str, data: str, context: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        losses = _train(Path(folder), Path(data), context_parallel=context)
        Path(f"{folder}.losses{rank}.json").write_text(json.dumps(losses))
    finally:
        dist.destroy_process_group()


def _spawn(folder: Path, data: Path, world: int, context: int) -> list[list[float]]:
    mp.spawn(
        _worker, args=(world, free_port(), str(folder), str(data), context), nprocs=world, join=True
    )
    return [json.loads(Path(f"{folder}.losses{r}.json").read_text()) for r in range(world)]


def _check_same(losses: list[list[float]], gold: list[float], mine: Path, theirs: Path) -> None:
    for rank, found in enumerate(losses):
        assert found == pytest.approx(gold, rel=1e-5, abs=1e-6), (rank, found, gold)
    a, b = _weights(mine), _weights(theirs)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in b)
    assert worst < 1e-4, worst


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_two_processes_of_half_sequences_train_like_one_process(tmp_path: Path) -> None:
    data = _reviews(tmp_path / "reviews.csv")
    losses = _spawn(tmp_path / "parallel", data, world=2, context=2)
    torch.set_num_threads(1)
    one = _train(tmp_path / "one", data, context_parallel=0)
    assert len(one) == STEPS and one[-1] < one[0]
    _check_same(losses, one, tmp_path / "parallel", tmp_path / "one")


@pytest.mark.slow
def test_a_data_by_context_mesh_trains_like_data_parallelism(tmp_path: Path) -> None:
    data = _reviews(tmp_path / "reviews.csv")
    mesh = _spawn(tmp_path / "mesh", data, world=4, context=2)  # 2 replicas x 2 shards
    ddp = _spawn(tmp_path / "ddp", data, world=2, context=0)  # the same batches, whole sequences
    assert ddp[0] == ddp[1] and len(ddp[0]) == STEPS
    _check_same(mesh, ddp[0], tmp_path / "mesh", tmp_path / "ddp")


def test_a_model_without_context_parallelism_is_refused(tmp_path: Path) -> None:
    from qkv.tasks import train_task
    from qkv.tasks.sentiment import SentimentSetup
    from qkv.train import TrainConfig

    data = _reviews(tmp_path / "reviews.csv")
    settings = SentimentSetup(
        data=str(data),
        preset="tiny",  # a GRU encoder
        vocab_size=120,
        data_options={"text_column": "review", "label_column": "stars", "validation": 0.25},
    )
    with pytest.raises(ValueError, match="encoder='bigru'"):
        train_task(
            "sentiment",
            settings,
            TrainConfig(max_steps=1, device="cpu"),
            tmp_path / "model",
            context_parallel=2,
        )
