"""Padded batches of (document, summary) for the pointer-generator.

Shapes: ``B`` examples, ``Ns`` / ``Nt`` longest document / summary, ``X`` the most OOV words of
any document in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from qkv.data.batching import TensorBatch
from qkv.data.parallel import Pair
from qkv.data.tokenizer import BOS_ID, UNK_ID, TextTokenizer, pad_ids
from qkv.tasks.summarization.vocab import EncodedText, encode_target, encode_with_oov

__all__ = ["Item", "PointerBatch", "PointerDataset", "collate_pointer"]

Item = tuple[int, EncodedText, list[int]]


@dataclass(frozen=True)
class PointerBatch(TensorBatch):
    """A padded batch for the pointer-generator.

    Attributes:
        source: ``(B, Ns)`` int64 fixed-vocabulary ids.
        source_ext: ``(B, Ns)`` int64 extended ids.
        target_in: ``(B, Nt)`` int64 ``<bos> y1 .. y(n-1)``, OOV words as ``<unk>``.
        target_out: ``(B, Nt)`` int64 ``y1 .. yn <eos>`` in extended ids (padding 0).
        index: ``(B,)`` int64 positions in the dataset.
        num_oov: ``X``.
        oovs: each example's OOV words (to turn extended ids back into words).
    """

    source: Tensor
    source_ext: Tensor
    target_in: Tensor
    target_out: Tensor
    index: Tensor
    num_oov: int
    oovs: list[list[str]]


class PointerDataset(Dataset[Item]):
    """Tokenized (document, summary) pairs; item ``i`` is ``(i, document, target_ext_ids)``."""

    def __init__(self, documents: Sequence[EncodedText], targets: Sequence[list[int]]) -> None:
        if len(documents) != len(targets):
            raise ValueError(
                f"documents ({len(documents)}) and targets ({len(targets)}) must align"
            )
        self.documents = list(documents)
        self.targets = list(targets)

    @classmethod
    def from_pairs(
        cls,
        pairs: Sequence[Pair],
        tokenizer: TextTokenizer,
        *,
        max_source_length: int | None,
        max_target_length: int | None,
    ) -> PointerDataset:
        documents = [encode_with_oov(tokenizer, p.source, max_source_length) for p in pairs]
        targets = [
            encode_target(tokenizer, p.target, d.oovs, max_target_length)
            for p, d in zip(pairs, documents, strict=True)
        ]
        return cls(documents, targets)

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> Item:
        return index, self.documents[index], self.targets[index]

    def lengths(self) -> list[int]:
        return [max(len(d.ids), len(t)) for d, t in zip(self.documents, self.targets, strict=True)]


def collate_pointer(items: Sequence[Item], vocab_size: int) -> PointerBatch:
    """Pad items into a :class:`PointerBatch` (``vocab_size`` maps copies back to ``<unk>``)."""
    documents = [d for _, d, _ in items]
    source = pad_ids([d.ids or [UNK_ID] for d in documents])
    source_ext = pad_ids([d.ext_ids or [UNK_ID] for d in documents])
    target_out = pad_ids([t for _, _, t in items])
    target_in = pad_ids(
        [[BOS_ID, *(UNK_ID if i >= vocab_size else i for i in t[:-1])] for _, _, t in items]
    )
    index = torch.tensor([i for i, _, _ in items], dtype=torch.long)  # (B,)
    num_oov = max(len(d.oovs) for d in documents)
    return PointerBatch(
        source.ids,
        source_ext.ids,
        target_in.ids,
        target_out.ids,
        index,
        num_oov,
        [d.oovs for d in documents],
    )
