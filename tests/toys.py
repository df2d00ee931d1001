"""Small models, data and folders that several test modules build: a toy classifier and its
training pieces, sequence-reversal data, a tiny translation setup, random Hugging Face-layout
encoder folders, DDP helpers. Test modules import them from here, never from each other."""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qkv.models import RNNConfig, TransformerConfig
from qkv.models.pretrained import BertConfig, BertEncoder, hf_tensor_names
from qkv.tasks.translation import TranslationSettings as TranslationConfig
from qkv.train import LossOutput, SamplerBatches, TrainConfig


@dataclass(frozen=True)
class ToyBatch:
    x: Tensor  # (B, F)
    y: Tensor  # (B,)

    def to(self, device: torch.device | str) -> ToyBatch:
        return ToyBatch(self.x.to(device), self.y.to(device))


class ToyModel(nn.Module):
    def __init__(self, features: int = 8, classes: int = 4, hidden: int = 32, dropout: float = 0.1):
        super().__init__()
        self.config = {
            "features": features,
            "classes": classes,
            "hidden": hidden,
            "dropout": dropout,
        }
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, classes)


def build_toy(config: dict[str, Any]) -> ToyModel:
    return ToyModel(**config)


class ToyTask:
    name = "toy"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def loss(self, model: nn.Module, batch: ToyBatch) -> LossOutput:
        logits = model(batch.x)
        total = nn.functional.cross_entropy(logits, batch.y, reduction="sum")
        return LossOutput(total=total, count=len(batch.y), tokens=len(batch.y))

    def validate(self, model: nn.Module) -> dict[str, float]:
        accuracy = (model(self.x).argmax(-1) == self.y).float().mean()
        return {"accuracy": float(accuracy)}


class ShuffledBatches:
    """Seeded per-epoch permutation cut into batches (the BatchSampler protocol)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0) -> None:
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        order = list(range(self.n))
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        return [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]


def collate_toy(items: list[tuple[Tensor, Tensor]]) -> ToyBatch:
    return ToyBatch(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))


def toy_data(n: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def toy_source(x: Tensor, y: Tensor, batch_size: int = 8) -> SamplerBatches:
    return SamplerBatches(
        list(zip(x, y, strict=True)), ShuffledBatches(len(y), batch_size), collate_toy
    )


def fast_config(**overrides: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "lr": 1e-2,
        "warmup_steps": 5,
        "max_steps": 20,
        "eval_every": 5,
        "log_every": 5,
        "device": "cpu",
    }
    return TrainConfig(**{**base, **overrides})


def reversal_id_pairs(n: int = 32, vocab: int = 13, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``n`` random sources of 3..6 tokens and their reversals: source (n, 6), target (n, 8)."""
    g = torch.Generator().manual_seed(seed)
    source = torch.zeros(n, 6, dtype=torch.long)
    target = torch.zeros(n, 8, dtype=torch.long)
    for i, length in enumerate(torch.randint(3, 7, (n,), generator=g).tolist()):
        tokens = torch.randint(3, vocab, (length,), generator=g)
        source[i, :length] = tokens
        target[i, 0], target[i, length + 1] = 1, 2
        target[i, 1 : length + 1] = tokens.flip(0)
    return source, target[:, :-1], target[:, 1:]


OVERFIT = {
    "transformer": (
        TransformerConfig.from_name("tiny", src_vocab_size=13, tgt_vocab_size=13),
        5e-3,
    ),
    "rnn-bahdanau-gru": (RNNConfig.from_name("tiny", src_vocab_size=13, tgt_vocab_size=13), 2e-2),
    "rnn-luong-general-lstm": (
        RNNConfig.from_name(
            "tiny", src_vocab_size=13, tgt_vocab_size=13, attention="luong", cell="lstm"
        ),
        2e-2,
    ),
    "rnn-none": (
        RNNConfig.from_name("tiny", src_vocab_size=13, tgt_vocab_size=13, attention="none"),
        2e-2,
    ),
}


def reversal_text_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Random lowercase words and their reversals (a task attention solves by alignment)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6))) for _ in range(n)]
    return [(w, w[::-1]) for w in words]


TINY = {
    "d_model": 32,
    "num_heads": 2,
    "num_encoder_layers": 1,
    "num_decoder_layers": 1,
    "dropout": 0.0,
}


def write_tsv(folder: Path, pairs: list[tuple[str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        (folder / f"{split}.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    return folder


def tiny_translation_config(data: Path, **overrides: object) -> TranslationConfig:
    base: dict[str, object] = {
        "data": str(data),
        "tokenizer": "char",
        "model_overrides": TINY,
        "label_smoothing": 0.0,
        "metric": "exact_match",
        "batch_size": 32,
    }
    return TranslationConfig(**{**base, **overrides})  # type: ignore[arg-type]


def training(steps: int, **overrides: object) -> TrainConfig:
    base: dict[str, object] = {
        "lr": 5e-3,
        "warmup_steps": 10,
        "max_steps": steps,
        "eval_every": steps,
        "schedule": "cosine",
        "device": "cpu",
    }
    return TrainConfig(**{**base, **overrides})  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GlobalBatches:
    """One process's view of the DDP job: step k's batch is the union of the batches that
    ranks 0 and 1 take at step k (each rank takes every 2nd batch of the same order)."""

    def __init__(self, prepared: Any, seed: int) -> None:
        from qkv.data import BucketBatchSampler

        self.prepared = prepared
        self.samplers = [
            BucketBatchSampler(
                prepared.train_set.lengths(),
                batch_size=prepared.batch_size,
                seed=seed,
                num_replicas=2,
                rank=rank,
            )
            for rank in range(2)
        ]

    def num_batches(self, epoch: int) -> int:
        self.samplers[0].set_epoch(epoch)
        return len(self.samplers[0].batches())

    def iter_from(self, epoch: int, start: int) -> Iterator[Any]:
        for sampler in self.samplers:
            sampler.set_epoch(epoch)
        pairs = zip(self.samplers[0].batches(), self.samplers[1].batches(), strict=True)
        for first, second in list(pairs)[start:]:
            items = [self.prepared.train_set[i] for i in [*first, *second]]
            yield self.prepared.collate(items)


def tiny_bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        max_position_embeddings=32,
    )


def write_hf_folder(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(38)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def random_hf_folder(
    folder: Path, *, prefix: str = "", std: float | None = 0.3
) -> tuple[Path, BertEncoder]:
    """A folder with random weights under HF names, and the encoder they came from; ``std``
    replaces the default init (LayerNorms away from (1, 0)); None keeps it."""
    torch.manual_seed(0)
    config = tiny_bert_config()
    source = BertEncoder(config).eval()
    for p in source.parameters() if std is not None else []:
        torch.nn.init.normal_(p, std=std)
    params = dict(source.named_parameters())
    tensors = {prefix + hf: params[ours].detach() for ours, hf in hf_tensor_names(config).items()}
    tensors[prefix + "pooler.dense.weight"] = torch.randn(16, 16)  # a head the loader skips
    hf_config = {"model_type": "bert", "architectures": ["BertModel"], **config.to_dict()}
    return write_hf_folder(folder, tensors, hf_config), source


def killable_run(save: object = None) -> object:
    """The run the SIGKILL test interrupts (also imported by its child process)."""
    from qkv.train import Trainer

    torch.manual_seed(0)
    x, y = toy_data()
    config = fast_config(max_steps=9, eval_every=3, checkpoint_every=3, lr=3e-3)
    return Trainer(ToyModel(dropout=0.0), ToyTask(x, y), toy_source(x, y), config, save=save)  # type: ignore[arg-type]
