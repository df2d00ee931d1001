"""Fine-tuning a pretrained encoder for text classification: train, save, load, classify.

::

    from qkv.tasks.pretrained_sentiment import (
        train_pretrained_sentiment, PretrainedTextClassifier, evaluate_pretrained)

    train_pretrained_sentiment("builtin:rt", "runs/rt-minilm", pretrained="minilm",
                               train=TrainConfig(max_minutes=20, lr=1e-4))
    clf = PretrainedTextClassifier.load("runs/rt-minilm")
    clf.classify(["a gorgeous, witty film"])[0].label               # 'positive'
    evaluate_pretrained(clf, load_labeled("builtin:rt").test)       # accuracy, macro-F1, ...

The model is a :class:`qkv.models.pretrained.PretrainedClassifier` (the encoder's weights from
:func:`qkv.models.load_pretrained`, a new pooling + linear head), trained end to end by the
shared :class:`qkv.train.Trainer` with :class:`qkv.tasks.sentiment.SentimentTask` (summed
cross-entropy, validation accuracy). The result is a normal qkv model folder
(:func:`qkv.train.save_model_folder`): ``config.json`` (``"task": "sentiment"``, the model
config with ``"kind": "pretrained-classifier"`` and the encoder's config, the labels),
``model.safetensors`` (encoder and head, qkv's names), ``tokenizer.json`` (the pretrained
tokenizer), ``training_state.pt``. Any labeled data :func:`qkv.data.load_labeled` reads works,
with any number of classes.

Shapes: ``B`` texts, ``N`` tokens of the longest, ``C`` classes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qkv.data.batching import BucketBatchSampler
from qkv.data.labeled import LabeledText, LabelSet, load_labeled
from qkv.models.pretrained import (
    PretrainedClassifier,
    PretrainedClassifierConfig,
    load_pretrained,
    load_tokenizer,
)
from qkv.models.pretrained.classifier import KIND, Pooling, encode
from qkv.tasks.sentiment import (
    LabeledDataset,
    Prediction,
    SentimentTask,
    classification_metrics,
    collate_labeled,
)
from qkv.train import (
    ModelFolderError,
    SamplerBatches,
    TrainConfig,
    Trainer,
    TrainResult,
    load_model,
    load_training_state,
    prepare_output_folder,
    read_config,
    save_model_folder,
    seed_everything,
)
from qkv.train.trainer import EvalReport, StepReport

__all__ = [
    "PretrainedSetup",
    "PretrainedTextClassifier",
    "default_finetune_config",
    "evaluate_pretrained",
    "is_pretrained_folder",
    "train_pretrained_sentiment",
]

logger = logging.getLogger(__name__)
TASK_NAME = "sentiment"
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class PretrainedSetup:
    """What to build before fine-tuning (saved in ``config.json``).

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


def default_finetune_config(**overrides: Any) -> TrainConfig:
    """Settings that suit fine-tuning (not training from scratch): a small peak learning rate,
    a short warmup, cosine decay, evaluation every 200 steps."""
    values: dict[str, Any] = {
        "lr": 1e-4,
        "warmup_steps": 100,
        "schedule": "cosine",
        "max_steps": 2000,
        "eval_every": 200,
        "keep_best": True,
    }
    values.update(overrides)
    return TrainConfig(**values)


class _TokenizerFile:
    """Writes the pretrained tokenizer as ``tokenizer.json`` of a model folder."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def save(self, directory: str | os.PathLike[str]) -> None:
        self.tokenizer.save(str(Path(directory) / TOKENIZER_FILE))


def _dataset(
    examples: Sequence[LabeledText], tokenizer: Any, labels: LabelSet, max_length: int
) -> LabeledDataset:
    """Tokenize once; the ids keep no padding (the collate pads with 0, BERT's ``[PAD]``)."""
    rows = [list(e.ids) for e in tokenizer.encode_batch([x.text for x in examples])]
    rows = [r if len(r) <= max_length else [*r[: max_length - 1], r[-1]] for r in rows]
    return LabeledDataset(rows, [labels.index(e.label) for e in examples])


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
    """Fine-tune a pretrained encoder with a classification head on ``data``; write ``out``.

    Args:
        data: a spec for :func:`qkv.data.load_labeled` (``builtin:rt``, a CSV/TSV/JSONL file,
            a folder), with any number of classes.
        out: the model folder (checked first: :func:`qkv.train.prepare_output_folder`).
        setup: the pretrained model, pooling and batching (default :class:`PretrainedSetup`).
        train: the trainer's settings (default :func:`default_finetune_config`).
        resume: continue the run saved in ``out``: its model (encoder and head), tokenizer,
            labels and training state; ``setup.pretrained`` is not read again.
        overwrite: replace a model already in ``out``.
        on_step, on_eval: progress callbacks, passed to the trainer.

    Raises:
        PretrainedError: the pretrained model cannot be found or read; DataError: malformed
            data; ModelFolderError: an unusable ``out``.
    """
    setup = setup or PretrainedSetup()
    train = train or default_finetune_config()
    prepare_output_folder(out, resume=resume, overwrite=overwrite)
    splits = load_labeled(data, **(setup.data_options or {}))
    state = None
    if resume:
        model, tokenizer, labels, state = _saved_run(out)
        config = model.config
    else:
        encoder, tokenizer = load_pretrained(setup.pretrained, backend=setup.backend)
        labels = LabelSet.from_examples(splits.train)
        config = PretrainedClassifierConfig(
            encoder=encoder.config.to_dict(),
            num_classes=len(labels),
            pooling=setup.pooling,
            pool_queries=setup.pool_queries,
            dropout=setup.dropout,
            source=str(setup.pretrained),
        )
        seed_everything(train.seed)  # the new head's init: same seed, same run
        model = PretrainedClassifier(config, encoder)
    model.train()
    logger.info("pretrained sentiment: %s, labels %s, %s", splits.sizes(), labels.labels, config)
    train_set = _dataset(splits.train, tokenizer, labels, setup.max_length)
    validation = _dataset(splits.validation, tokenizer, labels, setup.max_length)
    task = SentimentTask(validation, labels, batch_size=2 * setup.batch_size)
    sampler = BucketBatchSampler(train_set.lengths(), batch_size=setup.batch_size, seed=train.seed)
    folder_config = {
        "task": TASK_NAME,
        "model": config.to_dict(),
        "labels": list(labels.labels),
        "data": {
            "spec": data,
            "options": setup.data_options or {},
            "max_length": setup.max_length,
            "pretrained": str(setup.pretrained),
        },
        "training": train.to_dict(),
    }

    def save(module: torch.nn.Module, state: dict[str, Any], step: int) -> None:
        save_model_folder(
            out,
            model=module,
            config=folder_config,
            tokenizer=_TokenizerFile(tokenizer),
            training_state=state,
            step=step,
        )

    trainer = Trainer(
        model,
        task,
        SamplerBatches(train_set, sampler, collate_labeled),
        train,
        save=save,
        on_step=on_step,
        on_eval=on_eval,
    )
    return trainer.fit(resume=state)


def _saved_run(
    out: str | os.PathLike[str],
) -> tuple[PretrainedClassifier, Any, LabelSet, dict[str, Any]]:
    """The model, tokenizer, labels and training state of a run saved in ``out``."""
    if not is_pretrained_folder(out):
        raise ModelFolderError(f"{out}: not a fine-tuned pretrained classifier; cannot resume it")
    model, saved = load_model(
        out, lambda c: PretrainedClassifier(PretrainedClassifierConfig.from_dict(c))
    )
    if not isinstance(model, PretrainedClassifier):
        raise ModelFolderError(f"{out}: the model is not a PretrainedClassifier")
    state = load_training_state(out, expected_step=saved["step"])
    return model, load_tokenizer(out), LabelSet(saved["labels"]), state


def is_pretrained_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether a model folder holds a fine-tuned pretrained classifier (for dispatch)."""
    model = read_config(folder).get("model")
    return isinstance(model, dict) and model.get("kind") == KIND


class PretrainedTextClassifier:
    """A fine-tuned pretrained classifier with its tokenizer and labels, from a model folder.

    Args:
        model: the network (eval mode).
        tokenizer: its ``tokenizers.Tokenizer``.
        labels: its labels.
        max_length: tokens kept per text.
    """

    def __init__(
        self, model: PretrainedClassifier, tokenizer: Any, labels: LabelSet, max_length: int
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.labels = labels
        self.max_length = max_length

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> PretrainedTextClassifier:
        """Load a folder written by :func:`train_pretrained_sentiment`.

        Raises:
            ModelFolderError: not such a folder, or inconsistent files.
        """
        config = read_config(folder)
        if config.get("task") != TASK_NAME or not is_pretrained_folder(folder):
            raise ModelFolderError(
                f"{folder}: holds a {config.get('task')!r} model, not a fine-tuned pretrained "
                "classifier"
            )
        model, config = load_model(
            folder, lambda c: PretrainedClassifier(PretrainedClassifierConfig.from_dict(c))
        )
        if not isinstance(model, PretrainedClassifier):
            raise ModelFolderError(f"{folder}: the model is not a PretrainedClassifier")
        tokenizer = load_tokenizer(folder)
        return cls(model, tokenizer, LabelSet(config["labels"]), config["data"]["max_length"])

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def classify(self, texts: Sequence[str], *, batch_size: int = 64) -> list[Prediction]:
        """Classify ``texts`` (the pooling weights say which tokens the decision read).

        Raises:
            ValueError: an empty (or whitespace-only) text, naming its position.
        """
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text {i} is empty: there is nothing to classify")
        predictions: list[Prediction] = []
        for start in range(0, len(texts), batch_size):
            predictions.extend(self._classify(texts[start : start + batch_size]))
        return predictions

    def _classify(self, texts: Sequence[str]) -> list[Prediction]:
        ids, mask = encode(self.tokenizer, texts, max_length=self.max_length)
        out = self.model(ids.to(self._device()), mask.to(self._device()))
        probs = F.softmax(out.logits.float(), dim=-1).cpu()  # (B, C)
        weights = out.weights.float().mean(dim=1).cpu()  # (B, N)
        result = []
        for row, real, p, w in zip(ids, mask, probs, weights, strict=True):
            n = int(real.sum())
            result.append(
                Prediction(
                    label=self.labels[int(p.argmax())],
                    probabilities={
                        lab: float(x) for lab, x in zip(self.labels.labels, p, strict=True)
                    },
                    tokens=[self.tokenizer.id_to_token(int(i)) for i in row[:n]],
                    weights=w[:n].tolist(),
                )
            )
        return result


@torch.no_grad()
def evaluate_pretrained(
    classifier: PretrainedTextClassifier,
    examples: Sequence[LabeledText],
    *,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Accuracy, macro-F1, the confusion matrix and the mean loss on ``examples``.

    Raises:
        ValueError: no examples, or a label the model does not know (named).
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    gold = [classifier.labels.index(e.label) for e in examples]
    predicted: list[int] = []
    total = 0.0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        ids, mask = encode(
            classifier.tokenizer, [e.text for e in chunk], max_length=classifier.max_length
        )
        device = classifier._device()
        logits = classifier.model(ids.to(device), mask.to(device)).logits.float().cpu()  # (B, C)
        total += float(
            F.cross_entropy(logits, torch.tensor(gold[start : start + len(chunk)]), reduction="sum")
        )
        predicted.extend(logits.argmax(-1).tolist())
    metrics = classification_metrics(gold, predicted, classifier.labels)
    metrics["loss"] = total / len(gold)
    return metrics
