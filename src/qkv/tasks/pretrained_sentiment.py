"""Fine-tuning a pretrained encoder for text classification: build, load, classify.

::

    qkv train sentiment --pretrained minilm --data builtin:rt --out runs/rt-minilm --steps 428
    qkv classify --model runs/rt-minilm "a gorgeous, witty film"
    qkv evaluate --model runs/rt-minilm

    from qkv.tasks import train_task
    from qkv.tasks.sentiment import SentimentSettings
    train_task("sentiment", SentimentSettings(data="builtin:rt", pretrained="minilm", max_length=128),
               default_finetune_config(max_steps=428), "runs/rt-minilm")
    clf = PretrainedTextClassifier.load("runs/rt-minilm")
    clf.classify(["a gorgeous, witty film"])[0].label               # 'positive'
    evaluate_pretrained(clf, load_labeled("builtin:rt").test)       # accuracy, macro-F1, ...

This is the sentiment task (:data:`qkv.tasks.sentiment.SPEC`) with ``pretrained`` set, trained
by :func:`qkv.tasks.train_task` like every task (one folder rule, one resume rule, DDP,
keep-best): :func:`prepare_pretrained` is what its ``prepare`` builds then. The model is a
:class:`qkv.models.pretrained.PretrainedClassifier` (the encoder's weights from
:func:`qkv.models.load_pretrained`, a new pooling + linear head) trained end to end with
:class:`qkv.tasks.text_classification.TextObjective` (summed cross-entropy, validation accuracy). The
folder is a normal qkv model folder: ``config.json`` (``"task": "sentiment"``, the settings
under ``"sentiment"``, the model config with ``"kind": "pretrained-classifier"`` and the
encoder's config, the labels), ``model.safetensors`` (encoder and head, qkv's names),
``tokenizer.json`` (the pretrained WordPiece tokenizer), ``training_state.pt``. Any labeled
data :func:`qkv.data.load_labeled` reads works, with any number of classes.

Shapes: ``B`` texts, ``N`` tokens of the longest, ``C`` classes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from qkv.data.labeled import LabeledText, LabelSet
from qkv.data.registry import Splits
from qkv.models.pretrained import (
    PretrainedClassifier,
    PretrainedClassifierConfig,
    load_pretrained,
    load_tokenizer,
    resolve_pretrained,
)
from qkv.models.pretrained.classifier import KIND, Pooling, encode
from qkv.tasks.base import Prepared, load_task_model, train_task
from qkv.tasks.classification import label_set
from qkv.tasks.sentiment_settings import SCRATCH_ONLY_FLAGS, SentimentSettings
from qkv.tasks.text_classification import (
    LabeledDataset,
    TextObjective,
    TextPredictor,
    collate_labeled,
    evaluate_classifier,
)
from qkv.train import ModelFolderError, TrainConfig, TrainResult, read_config
from qkv.train.trainer import EvalReport, StepReport

__all__ = [
    "FINETUNE_DEFAULTS",
    "PRETRAINED",
    "PretrainedRecipe",
    "PretrainedSetup",
    "PretrainedTextClassifier",
    "default_finetune_config",
    "evaluate_pretrained",
    "finetune_defaults",
    "is_pretrained_folder",
    "prepare_pretrained",
    "train_pretrained_sentiment",
]

logger = logging.getLogger(__name__)
TASK_NAME = "sentiment"
TOKENIZER_FILE = "tokenizer.json"

#: Training settings that suit fine-tuning (not training from scratch): a small peak learning
#: rate and cosine decay; the warmup is a tenth of the steps (:func:`finetune_defaults`).
FINETUNE_DEFAULTS: dict[str, Any] = {"lr": 1e-4, "schedule": "cosine"}


def finetune_defaults(max_steps: int | None) -> dict[str, Any]:
    """:data:`FINETUNE_DEFAULTS` with a warmup of a tenth of ``max_steps`` (100 steps when
    the run is limited by time only)."""
    warmup = max(max_steps // 10, 1) if max_steps else 100
    return {**FINETUNE_DEFAULTS, "warmup_steps": warmup}


def default_finetune_config(**overrides: Any) -> TrainConfig:
    """A :class:`~qkv.train.TrainConfig` for fine-tuning: :func:`finetune_defaults`, 2000
    steps, evaluation every 200 steps, keep-best; ``overrides`` replace any of them."""
    steps = overrides.get("max_steps", 2000)
    values: dict[str, Any] = {
        **finetune_defaults(steps),
        "max_steps": 2000,
        "eval_every": 200,
        "keep_best": True,
    }
    values.update(overrides)
    return TrainConfig(**values)


@dataclass(frozen=True)
class PretrainedSetup:
    """The fine-tuning choices of :func:`train_pretrained_sentiment` (which turns them into a
    :class:`~qkv.tasks.sentiment.SentimentSettings`, what the folder saves).

    Attributes:
        pretrained: ``"minilm"`` or an HF-layout folder (see :func:`qkv.models.load_pretrained`).
        pooling: ``"mean"`` or ``"attention"``.
        pool_queries: learned queries for attention pooling.
        dropout: on the pooled vector.
        max_length: tokens kept per text (head and the final ``[SEP]``).
        batch_size: examples per training batch.
        backend: the :func:`qkv.attention` backend of the encoder.
        data_options: options of :func:`qkv.data.load_labeled`.
    """

    pretrained: str = "minilm"
    pooling: Pooling = "mean"
    pool_queries: int = 1
    dropout: float = 0.1
    max_length: int = 128
    batch_size: int = 32
    backend: str = "auto"
    data_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def settings(self, data: str) -> SentimentSettings:
        """The sentiment task's settings for fine-tuning on ``data``."""
        return SentimentSettings(
            data=data,
            max_length=self.max_length,
            batch_size=self.batch_size,
            model_overrides={"dropout": self.dropout, "pool_queries": self.pool_queries},
            data_options=dict(self.data_options or {}),
            pretrained=str(self.pretrained),
            pooling=self.pooling,
        )


class _TokenizerFile:
    """Writes the pretrained tokenizer as ``tokenizer.json`` of a model folder."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def save(self, directory: str | os.PathLike[str]) -> None:
        self.tokenizer.save(str(Path(directory) / TOKENIZER_FILE))


def _dataset(
    examples: Sequence[LabeledText], tokenizer: Any, labels: LabelSet, max_length: int | None
) -> LabeledDataset:
    """Tokenize once (with ``[CLS]``/``[SEP]``; the first ``max_length - 1`` tokens and the
    final ``[SEP]``); the ids keep no padding (the collate pads with 0, BERT's ``[PAD]``)."""
    rows = [list(e.ids) for e in tokenizer.encode_batch([x.text for x in examples])]
    if max_length is not None:
        rows = [r if len(r) <= max_length else [*r[: max_length - 1], r[-1]] for r in rows]
    return LabeledDataset(rows, [labels.index(e.label) for e in examples])


def _max_length(settings: SentimentSettings, config: PretrainedClassifierConfig) -> int:
    """Tokens kept per text: the settings', at most the encoder's positions."""
    positions = int(config.encoder.get("max_position_embeddings", 512))
    return positions if settings.max_length is None else min(settings.max_length, positions)


def prepare_pretrained(
    settings: SentimentSettings, splits: Splits[LabeledText], *, folder: Path | None
) -> Prepared:
    """The sentiment task's run when ``settings.pretrained`` is set: the pretrained encoder
    with a new head (or, resuming from ``folder``, the saved model's architecture, tokenizer
    and labels; :func:`~qkv.tasks.train_task` then loads its weights).

    Raises:
        PretrainedError: the pretrained model cannot be found or read (what to install).
        ValueError: bad head settings (``model_overrides``), naming the field.
    """
    if folder is not None:
        saved = read_config(folder)
        tokenizer = load_tokenizer(folder)
        labels = LabelSet(saved["labels"])
        config = PretrainedClassifierConfig.from_dict(saved["model"])
        model = PretrainedClassifier(config)
    else:
        assert settings.pretrained is not None
        encoder, tokenizer = load_pretrained(settings.pretrained)
        labels = label_set(
            settings.data, splits.train, what="examples", hint="labels (check --label-column)"
        )
        config = PretrainedClassifierConfig(
            encoder=encoder.config.to_dict(),
            num_classes=len(labels),
            pooling=settings.pooling,
            source=settings.pretrained,
            **settings.model_overrides,
        )
        model = PretrainedClassifier(config, encoder)  # the head is seeded by train_task
    logger.info("pretrained sentiment: %s, labels %s, %s", splits.sizes(), labels.labels, config)
    length = _max_length(settings, config)
    task = TextObjective(
        _dataset(splits.validation, tokenizer, labels, length),
        labels,
        batch_size=2 * settings.batch_size,
        penalty=settings.penalty,
    )
    return Prepared(
        settings=settings,
        model=model.train(),
        model_config=config.to_dict(),
        objective=task,
        train_set=_dataset(splits.train, tokenizer, labels, length),
        collate=collate_labeled,
        batch_size=settings.batch_size,
        tokenizer=_TokenizerFile(tokenizer),
        extra={"labels": list(labels.labels)},
    )


def train_pretrained_sentiment(
    data: str,
    out: str | os.PathLike[str],
    *,
    setup: PretrainedSetup | None = None,
    train: TrainConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[StepReport], None] | None = None,
    on_eval: Callable[[EvalReport], None] | None = None,
) -> TrainResult:
    """:func:`qkv.tasks.train_task` of the sentiment task with ``setup``'s pretrained model.

    Args:
        data: a spec for :func:`qkv.data.load_labeled`, with any number of classes.
        out: the model folder.
        setup: the pretrained model, pooling and batching (default :class:`PretrainedSetup`).
        train: the trainer's settings (default :func:`default_finetune_config`).
        resume, overwrite, on_step, on_eval: as :func:`~qkv.tasks.train_task` takes them
            (a resumed run must give the saved settings; only the limits may change).

    Raises:
        PretrainedError: the pretrained model cannot be found or read; DataError: malformed
            data; ModelFolderError: an unusable ``out``; ValueError: changed settings on resume.
    """
    setup = setup or PretrainedSetup()
    outcome = train_task(
        TASK_NAME,
        setup.settings(data),
        train or default_finetune_config(),
        out,
        resume=resume,
        overwrite=overwrite,
        backend=setup.backend,
        on_step=on_step,
        on_eval=on_eval,
    )
    return outcome.result


def is_pretrained_config(config: dict[str, Any]) -> bool:
    """Whether a model folder's ``config.json`` holds a fine-tuned pretrained classifier."""
    model = config.get("model")
    return isinstance(model, dict) and model.get("kind") == KIND


def is_pretrained_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether a model folder holds a fine-tuned pretrained classifier (for dispatch)."""
    return is_pretrained_config(read_config(folder))


class PretrainedTextClassifier(TextPredictor):
    """A fine-tuned pretrained classifier with its tokenizer and labels, from a model folder.

    Args:
        model: the network (eval mode).
        tokenizer: its ``tokenizers.Tokenizer``.
        labels: its labels.
        max_length: tokens kept per text.
    """

    model: PretrainedClassifier

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike[str],
        *,
        device: str = "auto",
        config: dict[str, Any] | None = None,
    ) -> PretrainedTextClassifier:
        """Load a folder of a fine-tuned pretrained classifier, on ``device`` (``config``: its
        ``config.json`` when the caller has read it already).

        Raises:
            ModelFolderError: not such a folder, or inconsistent files.
        """
        config = read_config(folder) if config is None else config
        if config.get("task") != TASK_NAME or not is_pretrained_config(config):
            raise ModelFolderError(
                f"{folder}: holds a {config.get('task')!r} model, not a "
                "fine-tuned pretrained classifier"
            )
        model, config, settings = load_task_model(
            folder,
            TASK_NAME,
            lambda c: PretrainedClassifier(PretrainedClassifierConfig.from_dict(c)),
            device=device,
            model_type=PretrainedClassifier,
            config=config,
        )
        length = _max_length(settings, model.config)
        return cls(model, load_tokenizer(folder), LabelSet(config["labels"]), length)

    def dataset(self, examples: Sequence[LabeledText]) -> LabeledDataset:
        """``examples`` tokenized as this classifier reads them."""
        return _dataset(examples, self.tokenizer, self.labels, self.max_length)

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor, list[list[str]]]:
        ids, mask = encode(self.tokenizer, texts, max_length=self.max_length)
        tokens = [
            [self.tokenizer.id_to_token(int(i)) for i in row[: int(real.sum())]]
            for row, real in zip(ids, mask, strict=True)
        ]
        return ids, mask, tokens

    def token_weights(self, ids: Tensor, mask: Tensor, pooling: Tensor) -> tuple[Tensor, str]:
        """Attention pooling's weights, or for mean pooling (which weighs every real token
        alike) the encoder's rollout to the pooled output."""
        if self.model.pooling is None:
            return self._mean_pooling_rollout(ids, mask, pooling)
        return pooling, "attention pooling"

    def _mean_pooling_rollout(
        self, ids: Tensor, mask: Tensor, pooling: Tensor
    ) -> tuple[Tensor, str]:
        """Mean pooling weighs every real token ``1/n``: the attention that decides is the
        encoder's. Its rollout (Abnar and Zuidema 2020) to the pooled output gives each input
        token's share: ``pooling (B, N) @ rollout (B, N, N)``, summing to 1 over real tokens."""
        from qkv.viz import attention_rollout

        device = self._device()
        maps = self.model.encoder.attention_maps(ids.to(device), mask.to(device))  # L x (B,H,N,N)
        rollout = attention_rollout([m.float() for m in maps]).cpu()  # (B, N, N)
        shares = (pooling.unsqueeze(1) @ rollout).squeeze(1)  # (B, N)
        return shares, "attention rollout to the mean-pooled output"


def evaluate_pretrained(
    classifier: PretrainedTextClassifier,
    examples: Sequence[LabeledText],
    *,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Accuracy, macro-F1, the confusion matrix, the mean loss and the majority-class baseline
    on ``examples`` (:func:`qkv.tasks.text_classification.evaluate_classifier`).

    Raises:
        ValueError: no examples, or a label the model does not know (named).
    """
    return evaluate_classifier(classifier, examples, batch_size=batch_size)


class PretrainedRecipe:
    """The sentiment task's recipe when ``pretrained`` is set: a pretrained encoder with a new
    classification head, fine-tuned (see :class:`qkv.tasks.sentiment.Recipe`)."""

    def check_flags(self, given: dict[str, Any]) -> None:
        """Raises ``PretrainedError`` for a ``--pretrained`` that cannot be found (before the
        data is read), ``ValueError`` for a flag of a model trained from scratch."""
        if given.get("pretrained") is not None:
            resolve_pretrained(given["pretrained"])
        clash = [name for name in SCRATCH_ONLY_FLAGS if given.get(name) is not None]
        if clash:
            flags = "/".join("--" + name.replace("_", "-") for name in clash)
            raise ValueError(
                f"{flags} sets up a model trained from scratch; --pretrained fine-tunes "
                "the pretrained model as it is (drop one of them)"
            )

    def training_defaults(self, max_steps: int | None) -> dict[str, Any]:
        return finetune_defaults(max_steps)

    def prepare(
        self, settings: SentimentSettings, splits: Splits[LabeledText], *, folder: Path | None
    ) -> Prepared:
        return prepare_pretrained(settings, splits, folder=folder)

    def owns(self, config: dict[str, Any]) -> bool:
        return is_pretrained_config(config)

    def load(
        self, folder: Path, config: dict[str, Any], *, device: str
    ) -> PretrainedTextClassifier:
        return PretrainedTextClassifier.load(folder, device=device, config=config)


#: The recipe of a fine-tuned pretrained classifier (``pretrained`` set).
PRETRAINED = PretrainedRecipe()
