"""Batches of token-id pairs: a Dataset, a seeded length-bucketing sampler, a collate function.

Padding costs compute in proportion to ``B * max(N)``; grouping examples of similar length makes
the padded fraction small. :class:`BucketBatchSampler` shuffles, cuts the shuffled order into
pools of ``pool_size`` examples, sorts each pool by length and cuts it into batches (by count or
by a token budget), then shuffles the batches: batches are length-homogeneous, while which
examples meet in a pool changes every epoch. Everything is driven by ``random.Random`` seeded
from ``(seed, epoch)``, so a run is reproducible and a resumed run sees the same batches.

Shapes: ``B`` pairs per batch, ``Ns`` / ``Nt`` the longest source / target in the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from qkv.data._util import seeded_rng
from qkv.data.tokenizer import PAD_ID, pad_ids

if TYPE_CHECKING:
    from qkv.data.parallel import Pair
    from qkv.data.tokenizer import PairTokenizer

__all__ = [
    "BucketBatchSampler",
    "PairBatch",
    "PairDataset",
    "collate_pairs",
    "make_loader",
]

Item = tuple[int, list[int], list[int]]


class TensorBatch:
    """Mixin of the batch dataclasses: ``to(device)`` moves every tensor field (non-blocking
    from pinned memory) and keeps the others; ``len`` is the first field's batch size."""

    def to(self: _BatchT, device: torch.device | str) -> _BatchT:
        """The same batch on ``device``."""
        moved = {
            f.name: value.to(device, non_blocking=True)
            for f in fields(self)  # type: ignore[arg-type]
            if isinstance(value := getattr(self, f.name), Tensor)
        }
        return replace(self, **moved)  # type: ignore[type-var]

    def __len__(self) -> int:
        first = getattr(self, fields(self)[0].name)  # type: ignore[arg-type]
        return int(first.shape[0])


_BatchT = TypeVar("_BatchT", bound=TensorBatch)


@dataclass(frozen=True)
class PairBatch(TensorBatch):
    """A padded batch of (source, target) id sequences.

    Attributes:
        source: ``(B, Ns)`` int64 source ids, right-padded with ``PAD_ID``.
        source_lengths: ``(B,)`` int64.
        target: ``(B, Nt)`` int64 target ids (``<bos> ... <eos>`` when built by
            :meth:`PairDataset.from_pairs`), right-padded.
        target_lengths: ``(B,)`` int64.
        index: ``(B,)`` int64 position of each pair in the dataset (to restore order after
            bucketing).
    """

    source: Tensor
    source_lengths: Tensor
    target: Tensor
    target_lengths: Tensor
    index: Tensor

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) source plus target tokens."""
        return int(self.source_lengths.sum() + self.target_lengths.sum())


class PairDataset(Dataset[Item]):
    """Pre-tokenized pairs; item ``i`` is ``(i, source_ids, target_ids)``.

    Args:
        source_ids: one list of ids per example.
        target_ids: one list of ids per example, aligned with ``source_ids``.

    Raises:
        ValueError: the two lists differ in length.
    """

    def __init__(self, source_ids: Sequence[list[int]], target_ids: Sequence[list[int]]) -> None:
        if len(source_ids) != len(target_ids):
            raise ValueError(
                f"source_ids ({len(source_ids)}) and target_ids ({len(target_ids)}) must align"
            )
        self.source_ids = list(source_ids)
        self.target_ids = list(target_ids)

    @classmethod
    def from_pairs(
        cls,
        pairs: Sequence[Pair],
        tokenizer: PairTokenizer,
        *,
        max_source_length: int | None = None,
        max_target_length: int | None = None,
    ) -> PairDataset:
        """Tokenize once: sources as ``text <eos>``, targets as ``<bos> text <eos>``.

        The decoder input is then ``target[:, :-1]`` and the labels ``target[:, 1:]``.
        """
        sources = tokenizer.source.encode_all(
            [p.source for p in pairs], add_eos=True, max_length=max_source_length
        )
        targets = tokenizer.target.encode_all(
            [p.target for p in pairs], add_bos=True, add_eos=True, max_length=max_target_length
        )
        return cls(sources, targets)

    def __len__(self) -> int:
        return len(self.source_ids)

    def __getitem__(self, index: int) -> Item:
        return index, self.source_ids[index], self.target_ids[index]

    def lengths(self) -> list[int]:
        """Bucketing key per example: the longer of its two sides."""
        return [max(len(s), len(t)) for s, t in zip(self.source_ids, self.target_ids, strict=True)]


def collate_pairs(items: Sequence[Item], pad_id: int = PAD_ID) -> PairBatch:
    """Pad a list of ``(index, source_ids, target_ids)`` items into a :class:`PairBatch`."""
    source = pad_ids([s for _, s, _ in items], pad_id)
    target = pad_ids([t for _, _, t in items], pad_id)
    index = torch.tensor([i for i, _, _ in items], dtype=torch.long)  # (B,)
    return PairBatch(source.ids, source.lengths, target.ids, target.lengths, index)


class BucketBatchSampler(Sampler[list[int]]):
    """Seeded batches of indices of similar length.

    Args:
        lengths: one length per example (e.g. :meth:`PairDataset.lengths`).
        batch_size: at most this many examples per batch.
        max_tokens: if given, also at most this many padded tokens per batch
            (``examples * longest``); an example longer than the budget gets a batch of its own.
        shuffle: shuffle examples and batches (training); otherwise sort the whole set by length
            and keep a fixed order (evaluation).
        seed: with the epoch (:meth:`set_epoch`), seeds the order.
        pool_size: examples sorted together; larger pools pad less but vary less.
        drop_last: drop a final partial batch of a pool when batching by count.
        num_replicas: data-parallel processes; each takes every ``num_replicas``-th batch, and
            the batch count is cut to a multiple of it so every process steps equally often.
        rank: this process's index in ``[0, num_replicas)``.

    Raises:
        ValueError: non-positive sizes, or a rank outside ``[0, num_replicas)``.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        batch_size: int,
        max_tokens: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        pool_size: int = 4096,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        for name, value in (
            ("batch_size", batch_size),
            ("pool_size", pool_size),
            ("num_replicas", num_replicas),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank ({rank}) must be in [0, num_replicas={num_replicas})")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.pool_size = pool_size
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` (call before each epoch, as with ``DistributedSampler``)."""
        self.epoch = epoch

    def _cut(self, pool: list[int]) -> list[list[int]]:
        batches: list[list[int]] = []
        batch: list[int] = []
        longest = 0
        for i in pool:
            n = max(longest, self.lengths[i])
            full = len(batch) >= self.batch_size
            over = self.max_tokens is not None and (len(batch) + 1) * n > self.max_tokens
            if batch and (full or over):
                batches.append(batch)
                batch, n = [], self.lengths[i]
            batch.append(i)
            longest = n
        if batch and not (
            self.drop_last and len(batch) < self.batch_size and self.max_tokens is None
        ):
            batches.append(batch)
        return batches

    def batches(self) -> list[list[int]]:
        """This process's batches for the current epoch (computed once per epoch)."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._make_batches())
        return self._cache[1]

    def _make_batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        rng = seeded_rng(self.seed, "buckets", self.epoch)
        if self.shuffle:
            rng.shuffle(order)
            pools = [order[i : i + self.pool_size] for i in range(0, len(order), self.pool_size)]
        else:
            pools = [order]
        batches: list[list[int]] = []
        for pool in pools:
            # sorted() is stable: equal lengths keep their (shuffled) order.
            batches.extend(self._cut(sorted(pool, key=self.lengths.__getitem__)))
        if self.shuffle:
            rng.shuffle(batches)
        usable = len(batches) - len(batches) % self.num_replicas
        return batches[self.rank : usable : self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(b) for b in self.batches()])  # copies: callers may mutate

    def __len__(self) -> int:
        return len(self.batches())


def make_loader(
    dataset: PairDataset,
    *,
    batch_size: int,
    max_tokens: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    num_replicas: int = 1,
    rank: int = 0,
) -> DataLoader[Item]:
    """A ``DataLoader`` of :class:`PairBatch` with length bucketing (see
    :class:`BucketBatchSampler` for the arguments). Call ``loader.batch_sampler.set_epoch(e)``
    each epoch for a new order."""
    sampler = BucketBatchSampler(
        dataset.lengths(),
        batch_size=batch_size,
        max_tokens=max_tokens,
        shuffle=shuffle,
        seed=seed,
        num_replicas=num_replicas,
        rank=rank,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_pairs,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
