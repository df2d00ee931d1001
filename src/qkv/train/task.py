"""What the trainer needs from a task, and where its batches come from.

The trainer knows nothing about translation, sentiment or summaries: a :class:`Task` turns a
batch into a summed loss and scores the model on its validation data; a :class:`BatchSource`
hands out the batches of an epoch from any position, which is what makes a resumed run see
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["BatchSource", "LossOutput", "SamplerBatches", "Task"]


@dataclass(frozen=True)
class LossOutput:
    """One batch's loss, **summed** over its units, so the trainer can normalise by the global
    count across data-parallel processes (a mean of per-process means would weight a short
    batch like a long one, and DDP would no longer equal one process on the global batch).

    Attributes:
        total: scalar tensor, the loss summed over the ``count`` units (tokens, examples).
        count: units in ``total``, e.g. non-pad target tokens.
        tokens: tokens processed (source + target), for the tokens/s figure.
    """

    total: Tensor
    count: int
    tokens: int


@runtime_checkable
class Task(Protocol):
    """A training objective and its validation.

    Attributes:
        name: e.g. ``"translation"``; saved in config.json.
        metric: the key of :meth:`validate`'s result that early stopping watches.
        higher_is_better: whether a larger ``metric`` is better (exact match) or worse (loss).
    """

    name: str
    metric: str
    higher_is_better: bool

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        """The summed loss of ``batch`` (already on the model's device) under ``model``.

        ``model`` may be a ``DistributedDataParallel`` wrapper: call it, do not reach into it.
        """
        ...

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Scores on the task's validation data (called in eval mode under ``no_grad``)."""
        ...


class BatchSource(Protocol):
    """The batches of each epoch, in a fixed order for a given epoch."""

    def num_batches(self, epoch: int) -> int:
        """Batches in ``epoch`` (for this process)."""
        ...

    def iter_from(self, epoch: int, start: int) -> Iterator[Any]:
        """The batches of ``epoch`` from the ``start``-th (0-based) on."""
        ...


class _EpochSampler(Protocol):
    def set_epoch(self, epoch: int) -> None: ...

    def batches(self) -> Sequence[Sequence[int]]: ...


class SamplerBatches:
    """A :class:`BatchSource` over a dataset, a per-epoch batch sampler (such as
    :class:`qkv.data.BucketBatchSampler`) and a collate function.

    Collating in the training process (no ``DataLoader`` workers) keeps skipping to a batch
    free: a resumed run jumps to its position without building the batches before it.

    Args:
        dataset: indexable examples.
        sampler: ``set_epoch(e)`` then ``batches()`` -> lists of indices.
        collate: list of examples -> batch (an object with ``.to(device)``).
    """

    def __init__(
        self,
        dataset: Any,
        sampler: _EpochSampler,
        collate: Callable[[list[Any]], Any],
    ) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.collate = collate

    def num_batches(self, epoch: int) -> int:
        self.sampler.set_epoch(epoch)
        return len(self.sampler.batches())

    def iter_from(self, epoch: int, start: int) -> Iterator[Any]:
        self.sampler.set_epoch(epoch)
        for indices in list(self.sampler.batches())[start:]:
            yield self.collate([self.dataset[i] for i in indices])
