r"""Text classification on a pretrained encoder: :class:`PretrainedClassifier`.

::

    ids (B, N) --BertEncoder--> h (B, N, E)
         --pooling: mean over the real tokens, or r learned queries (attention)--> (B, r, E)
         --flatten, dropout, linear--> logits (B, C)

Mean pooling is what all-MiniLM-L6-v2 was trained with (sentence-transformers' mean of the token
states); attention pooling is :class:`qkv.models.classifier.AttentionPooling` (Lin et al. 2017),
through :func:`qkv.attention`. The forward returns a
:class:`~qkv.models.classifier.ClassifierOutput`, as :class:`~qkv.models.AttentionClassifier`
does, so :class:`qkv.tasks.sentiment.SentimentTask` trains either.

Notation: ``B`` texts, ``N`` tokens of the longest, ``E`` hidden size, ``r`` pooling queries
(1 for mean pooling), ``C`` classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from qkv.models.classifier import AttentionPooling, ClassifierOutput
from qkv.models.pretrained.bert import BertConfig, BertEncoder

__all__ = ["KIND", "Pooling", "PretrainedClassifier", "PretrainedClassifierConfig", "encode"]

KIND = "pretrained-classifier"
Pooling = Literal["mean", "attention"]


@dataclass(frozen=True)
class PretrainedClassifierConfig:
    """A classifier over a pretrained encoder.

    Attributes:
        encoder: the encoder's :class:`~qkv.models.pretrained.bert.BertConfig` as a dict.
        num_classes: ``C``, at least 2.
        pooling: ``"mean"`` (over real tokens) or ``"attention"`` (``pool_queries`` learned
            queries).
        pool_queries: ``r`` for attention pooling.
        pool_dim: size of the pooling keys for attention pooling.
        dropout: on the pooled vector.
        source: where the encoder's weights came from (a name or a folder), for the record.
        kind: ``"pretrained-classifier"``.
    """

    encoder: dict[str, Any]
    num_classes: int
    pooling: Pooling = "mean"
    pool_queries: int = 1
    pool_dim: int = 128
    dropout: float = 0.1
    source: str = ""
    kind: str = field(default=KIND)

    def __post_init__(self) -> None:
        BertConfig.from_dict(self.encoder)  # validates the encoder fields
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise ValueError(f"num_classes must be an int >= 2; got {self.num_classes!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2; got num_classes={self.num_classes}")
        if self.pooling not in ("mean", "attention"):
            raise ValueError(f"pooling must be 'mean' or 'attention'; got {self.pooling!r}")
        if self.pool_queries < 1 or self.pool_dim < 1:
            raise ValueError(
                f"pool_queries and pool_dim must be >= 1; got {self.pool_queries}, {self.pool_dim}"
            )
        if self.pooling == "mean" and self.pool_queries != 1:
            raise ValueError("pool_queries must be 1 with pooling='mean'")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got dropout={self.dropout!r}")
        if self.kind != KIND:
            raise ValueError(f"kind must be {KIND!r}; got kind={self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "encoder": dict(self.encoder),
            "num_classes": self.num_classes,
            "pooling": self.pooling,
            "pool_queries": self.pool_queries,
            "pool_dim": self.pool_dim,
            "dropout": self.dropout,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PretrainedClassifierConfig:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown pretrained-classifier fields: {sorted(unknown)}")
        return cls(**values)


class PretrainedClassifier(nn.Module):
    """A :class:`BertEncoder` with a pooling and a linear classification head.

    Args:
        config: the :class:`PretrainedClassifierConfig`.
        encoder: an encoder to use (e.g. from :func:`~qkv.models.pretrained.load_pretrained`);
            by default a freshly initialised one of ``config.encoder`` (load the weights after).
    """

    def __init__(
        self, config: PretrainedClassifierConfig, encoder: BertEncoder | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder or BertEncoder(BertConfig.from_dict(config.encoder))
        dim = self.encoder.config.hidden_size
        self.pooling = (
            AttentionPooling(dim, config.pool_dim, config.pool_queries)
            if config.pooling == "attention"
            else None
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.pool_queries * dim, config.num_classes)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> ClassifierOutput:
        """``ids (B, N)``, ``mask`` bool ``(B, N)`` (True = real token; None: all real) ->
        logits ``(B, C)`` and pooling weights ``(B, r, N)``."""
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        states = self.encoder(ids, mask)  # (B, N, E)
        if self.pooling is None:
            weights = (mask / mask.sum(-1, keepdim=True).clamp(min=1)).unsqueeze(1)  # (B, 1, N)
            pooled = weights.to(states.dtype) @ states  # (B, 1, E)
        else:
            pooled, weights = self.pooling(states, mask)  # (B, r, E), (B, r, N)
        logits = self.head(self.dropout(pooled.flatten(1)))  # (B, C)
        return ClassifierOutput(logits, weights)

    def predict_proba(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(B, C)`` class probabilities (call in eval mode)."""
        return self(ids, mask).logits.softmax(-1)


def encode(
    tokenizer: Any, texts: Sequence[str], *, max_length: int | None = 128
) -> tuple[Tensor, Tensor]:
    """Tokenize and right-pad ``texts`` with the pretrained tokenizer.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` whose padding id is 0 (BERT's ``[PAD]``).
        texts: the texts.
        max_length: tokens kept per text (the first ``max_length - 1`` and the final ``[SEP]``);
            None keeps what the tokenizer gives.

    Returns:
        ``ids (B, N)`` int64 and ``mask (B, N)`` bool, True at real tokens.
    """
    rows = [list(e.ids) for e in tokenizer.encode_batch(list(texts))]
    if max_length is not None:
        rows = [r if len(r) <= max_length else [*r[: max_length - 1], r[-1]] for r in rows]
    width = max((len(r) for r in rows), default=0)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, N), 0 = [PAD]
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask
