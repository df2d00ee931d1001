"""The sentiment task's settings, below both of its model recipes.

:class:`SentimentSettings` is what ``config.json`` saves under ``"sentiment"``; the recipe that
trains a classifier from scratch (:mod:`qkv.tasks.sentiment`) and the one that fine-tunes a
pretrained encoder (:mod:`qkv.tasks.pretrained_sentiment`) both read it, and neither imports
the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from qkv.tasks.base import Settings

__all__ = ["SCRATCH_ONLY_FLAGS", "SentimentSettings", "SentimentSetup"]


@dataclass(frozen=True)
class SentimentSettings(Settings):
    """What to train on and what to build (saved in ``config.json`` under ``"sentiment"``).

    Attributes:
        data: a spec for :func:`qkv.data.load_labeled` (``builtin:rt``, a CSV/TSV/JSONL file,
            a folder).
        preset: a :data:`qkv.models.classifier.PRESETS` name.
        vocab_size: BPE vocabulary size.
        max_length: tokens kept per text (head + tail); ``None`` keeps all.
        batch_size: examples per training batch.
        penalty: weight of the pooling penalty (only with several pooling queries).
        model_overrides: fields of :class:`ClassifierConfig` replacing the preset's (with
            ``pretrained``: ``dropout``, ``pool_queries``, ``pool_dim`` of the head).
        data_options: options of :func:`qkv.data.load_labeled` (column names, loader options).
        pretrained: fine-tune this pretrained encoder (``"minilm"`` or an HF-layout folder,
            see :func:`qkv.models.load_pretrained`) instead of training ``preset`` from scratch;
            ``preset`` and ``vocab_size`` are then unused (its WordPiece tokenizer is kept).
        pooling: the head's pooling over the pretrained encoder's states, ``"mean"`` or
            ``"attention"`` (only with ``pretrained``).
    """

    data: str = "builtin:rt"
    preset: str = "bigru-small"
    vocab_size: int = 8000
    max_length: int | None = 256
    batch_size: int = 32
    penalty: float = 0.0
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data_options: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    pooling: Literal["mean", "attention"] = "mean"

    def __post_init__(self) -> None:
        if self.pooling not in ("mean", "attention"):
            raise ValueError(f"pooling must be 'mean' or 'attention', got {self.pooling!r}")
        if self.vocab_size < 16:
            raise ValueError(f"vocab_size must be >= 16, got {self.vocab_size}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {self.max_length}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.penalty < 0:
            raise ValueError(f"penalty must be >= 0, got {self.penalty}")


#: The ``qkv train`` flags that only apply to a classifier trained from scratch.
SCRATCH_ONLY_FLAGS = ("preset", "vocab_size")


#: The earlier name of :class:`SentimentSettings` (kept so existing code keeps working).
SentimentSetup = SentimentSettings
