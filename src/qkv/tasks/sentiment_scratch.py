"""The sentiment task's recipe for a classifier trained from scratch, and its predictor.

:data:`SCRATCH` builds an :class:`~qkv.models.AttentionClassifier` (a preset) and trains a BPE
tokenizer on the task's data; :class:`TextClassifier` is the trained folder, loaded. The spec
(:mod:`qkv.tasks.sentiment`) picks this recipe when ``pretrained`` is unset; the batches,
metrics and objective are the classification rooms' (:mod:`qkv.tasks.text_classification`,
:mod:`qkv.tasks.classification`).

Shapes: ``B`` texts, ``N`` tokens of the longest, ``C`` classes, ``r`` pooling queries.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from torch import Tensor

from qkv.data.labeled import LabeledText, LabelSet
from qkv.data.registry import Splits
from qkv.data.tokenizer import PairTokenizer, TextTokenizer, pad_ids
from qkv.models.classifier import AttentionClassifier, ClassifierConfig
from qkv.tasks.base import Prepared, load_task_model
from qkv.tasks.classification import label_set
from qkv.tasks.pretrained_sentiment import is_pretrained_config
from qkv.tasks.sentiment_settings import SentimentSettings
from qkv.tasks.text_classification import (
    LabeledDataset,
    TextObjective,
    TextPredictor,
    collate_labeled,
    encode_texts,
)
from qkv.train import read_config

__all__ = ["SCRATCH", "ScratchRecipe", "TextClassifier"]

logger = logging.getLogger(__name__)

TASK_NAME = "sentiment"


class ScratchRecipe:
    """An :class:`~qkv.models.AttentionClassifier` (a preset) and a BPE tokenizer, both
    trained from scratch on the task's data."""

    def check_flags(self, given: dict[str, Any]) -> None:
        if given.get("pooling") is not None:
            raise ValueError("--pooling chooses the head of a --pretrained model; add --pretrained")

    def training_defaults(self, max_steps: int | None) -> dict[str, Any]:
        return {}

    def prepare(
        self, settings: SentimentSettings, splits: Splits[LabeledText], *, folder: Path | None
    ) -> Prepared:
        if folder is not None:
            saved = read_config(folder)
            tokenizer = TextTokenizer.load(folder / "tokenizer.json")
            labels = LabelSet(saved["labels"])
            config = ClassifierConfig.from_dict(saved["model"])
        else:
            tokenizer = TextTokenizer.train(
                [e.text for e in splits.train], mode="bpe", vocab_size=settings.vocab_size
            )
            labels = label_set(
                settings.data, splits.train, what="examples", hint="labels (check --label-column)"
            )
            config = ClassifierConfig.from_name(
                settings.preset,
                vocab_size=tokenizer.vocab_size,
                num_classes=len(labels),
                **settings.model_overrides,
            )
        logger.info("sentiment: %s, labels %s, %s", splits.sizes(), labels.labels, config)
        dataset = partial(
            LabeledDataset.from_examples,
            tokenizer=tokenizer,
            labels=labels,
            max_length=settings.max_length,
        )
        objective = TextObjective(
            dataset(splits.validation),
            labels,
            batch_size=2 * settings.batch_size,
            penalty=settings.penalty,
        )
        return Prepared(
            settings=settings,
            model=AttentionClassifier(config),
            model_config=config.to_dict(),
            objective=objective,
            train_set=dataset(splits.train),
            collate=collate_labeled,
            batch_size=settings.batch_size,
            tokenizer=PairTokenizer(tokenizer),
            extra={"labels": list(labels.labels)},
        )

    def owns(self, config: dict[str, Any]) -> bool:
        return not is_pretrained_config(config)

    def load(self, folder: Path, config: dict[str, Any], *, device: str) -> TextClassifier:
        return TextClassifier.load(folder, device=device, config=config)


#: The recipe of a classifier trained from scratch (``pretrained`` unset).
SCRATCH = ScratchRecipe()


class TextClassifier(TextPredictor):
    """A trained classifier with its tokenizer and labels, loaded from a model folder.

    Args:
        model: the network (eval mode).
        tokenizer: its :class:`~qkv.data.tokenizer.TextTokenizer`.
        labels: its labels.
        max_length: tokens kept per text (head + tail).
    """

    model: AttentionClassifier
    tokenizer: TextTokenizer

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike[str],
        *,
        device: str = "auto",
        config: dict[str, Any] | None = None,
    ) -> TextClassifier:
        """Load a folder written by ``train_task("sentiment", ...)``, on ``device``
        (``config``: its ``config.json`` when the caller has read it already).

        Raises:
            ModelFolderError: not a sentiment model folder, or inconsistent files.
        """
        model, config, settings = load_task_model(
            folder,
            TASK_NAME,
            lambda c: AttentionClassifier(ClassifierConfig.from_dict(c)),
            device=device,
            model_type=AttentionClassifier,
            config=config,
        )
        tokenizer = TextTokenizer.load(Path(folder) / "tokenizer.json")
        return cls(model, tokenizer, LabelSet(config["labels"]), settings.max_length)

    def dataset(self, examples: Sequence[LabeledText]) -> LabeledDataset:
        """``examples`` tokenized as this classifier reads them."""
        return LabeledDataset.from_examples(
            examples, self.tokenizer, self.labels, max_length=self.max_length
        )

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor, list[list[str]]]:
        rows = encode_texts(self.tokenizer, texts, self.max_length)
        padded = pad_ids(rows)
        decode = self.tokenizer.hf.decode
        tokens = [[decode([i], skip_special_tokens=False) for i in row] for row in rows]
        return padded.ids, padded.padding_mask, tokens
