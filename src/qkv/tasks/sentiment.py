"""Sentiment analysis (any text classification) end to end: train, save, classify, evaluate.

::

    from qkv.tasks import train_task
    from qkv.tasks.sentiment import SentimentSetup, TextClassifier, evaluate_classifier

    train_task("sentiment", SentimentSetup(data="builtin:rt"), TrainConfig(max_minutes=20), "runs/rt")
    clf = TextClassifier.load("runs/rt")
    clf.classify(["a gorgeous, witty film"])[0].label          # 'positive'
    evaluate_classifier(clf, load_labeled("builtin:rt").test)  # accuracy, macro-F1, confusion

Training is :func:`qkv.tasks.train_task` with :data:`SPEC` (:class:`SentimentTask`: summed
cross-entropy per example, validation accuracy for early stopping); the model folder holds
``config.json`` (``"task": "sentiment"``, the :class:`SentimentSetup` under ``"sentiment"``,
the model config, the label list), ``model.safetensors``, ``tokenizer.json``.

With ``pretrained`` set (``qkv train sentiment --pretrained minilm``), the same lifecycle
fine-tunes a pretrained encoder with a classification head instead
(:mod:`qkv.tasks.pretrained_sentiment` builds it; :meth:`SentimentSpec.load` tells the two
kinds of folder apart).

Long texts keep their head and tail (:func:`head_tail`): the verdict of a review is often in its
last sentences (Sun et al. 2019, "How to Fine-Tune BERT for Text Classification?", found
head+tail truncation best on IMDB).

Shapes: ``B`` texts, ``N`` tokens of the longest, ``C`` classes, ``r`` pooling queries.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from qkv.data.batching import BucketBatchSampler, TensorBatch
from qkv.data.labeled import LabeledText, LabelSet, load_labeled, read_labeled
from qkv.data.parallel import DataError
from qkv.data.registry import Splits
from qkv.data.tokenizer import PairTokenizer, TextTokenizer, pad_ids
from qkv.models.classifier import (
    AttentionClassifier,
    ClassifierConfig,
    ClassifierOutput,
    pooling_penalty,
)
from qkv.tasks.base import (
    EvalOptions,
    Evaluation,
    Flag,
    Prepared,
    Settings,
    TaskSpec,
    load_task_model,
)
from qkv.train import (
    LossOutput,
    read_config,
)

__all__ = [
    "SPEC",
    "LabeledBatch",
    "LabeledDataset",
    "Prediction",
    "SentimentSetup",
    "SentimentSpec",
    "SentimentTask",
    "TextClassifier",
    "classification_metrics",
    "collate_labeled",
    "evaluate_classifier",
    "evaluation_metrics",
    "format_classification",
    "head_tail",
]

logger = logging.getLogger(__name__)

TASK_NAME = "sentiment"
Item = tuple[int, list[int], int]


def head_tail(ids: list[int], max_length: int | None) -> list[int]:
    """``ids`` cut to ``max_length`` by keeping the first and last halves (head + tail)."""
    if max_length is None or len(ids) <= max_length:
        return ids
    head = max_length // 2
    return ids[:head] + ids[len(ids) - (max_length - head) :]


def encode_texts(
    tokenizer: TextTokenizer, texts: Sequence[str], max_length: int | None
) -> list[list[int]]:
    """Token ids of each text (no specials), head+tail-truncated to ``max_length``."""
    rows = tokenizer.encode_all(texts, add_eos=False)
    return [head_tail(row, max_length) or [0] for row in rows]


# --------------------------------------------------------------------------------------------
# Batches


@dataclass(frozen=True)
class LabeledBatch(TensorBatch):
    """Padded token ids with their class indices.

    Attributes:
        ids: ``(B, N)`` int64, right-padded with 0.
        mask: bool ``(B, N)``, True at real tokens.
        labels: ``(B,)`` int64 class indices.
        index: ``(B,)`` int64 position of each example in its dataset.
    """

    ids: Tensor
    mask: Tensor
    labels: Tensor
    index: Tensor


class LabeledDataset(Dataset[Item]):
    """Pre-tokenized examples; item ``i`` is ``(i, ids, label_index)``.

    Raises:
        ValueError: ``ids`` and ``labels`` differ in length.
    """

    def __init__(self, ids: Sequence[list[int]], labels: Sequence[int]) -> None:
        if len(ids) != len(labels):
            raise ValueError(f"ids ({len(ids)}) and labels ({len(labels)}) must align")
        self.ids = list(ids)
        self.labels = list(labels)

    @classmethod
    def from_examples(
        cls,
        examples: Sequence[LabeledText],
        tokenizer: TextTokenizer,
        labels: LabelSet,
        *,
        max_length: int | None,
    ) -> LabeledDataset:
        """Tokenize once. A label outside ``labels`` raises ``ValueError`` naming it."""
        ids = encode_texts(tokenizer, [e.text for e in examples], max_length)
        return cls(ids, [labels.index(e.label) for e in examples])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Item:
        return index, self.ids[index], self.labels[index]

    def lengths(self) -> list[int]:
        return [len(row) for row in self.ids]


def collate_labeled(items: Sequence[Item]) -> LabeledBatch:
    """Pad ``(index, ids, label)`` items into a :class:`LabeledBatch`."""
    padded = pad_ids([ids for _, ids, _ in items])
    labels = torch.tensor([label for _, _, label in items], dtype=torch.long)  # (B,)
    index = torch.tensor([i for i, _, _ in items], dtype=torch.long)  # (B,)
    return LabeledBatch(padded.ids, padded.padding_mask, labels, index)


def _batches(dataset: LabeledDataset, batch_size: int) -> list[LabeledBatch]:
    """Evaluation batches, sorted by length (little padding), covering every example once."""
    sampler = BucketBatchSampler(dataset.lengths(), batch_size=batch_size, shuffle=False)
    return [collate_labeled([dataset[i] for i in b]) for b in sampler.batches()]


# --------------------------------------------------------------------------------------------
# Metrics


def classification_metrics(
    gold: Sequence[int], predicted: Sequence[int], labels: LabelSet
) -> dict[str, Any]:
    """Accuracy, macro-F1 and the confusion matrix (scikit-learn).

    Returns:
        ``{"accuracy": float, "macro_f1": float, "confusion": [[int]] (rows gold, columns
        predicted, in ``labels`` order), "labels": [str], "count": int}``.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    classes = list(range(len(labels)))
    return {
        "accuracy": float(accuracy_score(gold, predicted)),
        "macro_f1": float(
            f1_score(gold, predicted, labels=classes, average="macro", zero_division=0)
        ),
        "confusion": confusion_matrix(gold, predicted, labels=classes).tolist(),
        "labels": list(labels.labels),
        "count": len(gold),
    }


def evaluation_metrics(
    gold: Sequence[int], predicted: Sequence[int], summed_loss: float, labels: LabelSet
) -> dict[str, Any]:
    """:func:`classification_metrics` plus the mean loss and the majority-class baseline: what
    ``qkv evaluate`` reports for any classifier (text or images)."""
    metrics = classification_metrics(gold, predicted, labels)
    metrics["loss"] = summed_loss / len(gold)
    majority = max(range(len(labels)), key=list(gold).count)
    metrics["majority_baseline"] = list(gold).count(majority) / len(gold)
    return metrics


def _predict_batches(
    model: nn.Module, batches: Sequence[LabeledBatch], device: torch.device
) -> tuple[list[int], list[int], float]:
    """Gold and predicted class indices in dataset order, and the summed cross-entropy."""
    gold: dict[int, int] = {}
    predicted: dict[int, int] = {}
    total = 0.0
    for batch in batches:
        batch = batch.to(device)
        logits = model(batch.ids, batch.mask).logits.float()  # (B, C)
        total += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
        for i, g, p in zip(
            batch.index.tolist(), batch.labels.tolist(), logits.argmax(-1).tolist(), strict=True
        ):
            gold[i], predicted[i] = g, p
    order = sorted(gold)
    return [gold[i] for i in order], [predicted[i] for i in order], total


# --------------------------------------------------------------------------------------------
# The task the trainer runs


class SentimentTask:
    """Cross-entropy over examples; validation accuracy (early stopping), macro-F1 and loss.

    Args:
        validation: the validation examples, tokenized.
        labels: the label set.
        batch_size: validation batch size.
        penalty: weight of Lin et al.'s pooling penalty (used when ``r > 1``).
    """

    name = TASK_NAME
    metric = "accuracy"
    higher_is_better = True

    def __init__(
        self,
        validation: LabeledDataset,
        labels: LabelSet,
        *,
        batch_size: int = 64,
        penalty: float = 0.0,
    ) -> None:
        self.labels = labels
        self.penalty = penalty
        self._validation = _batches(validation, batch_size) if len(validation) else []

    def loss(self, model: nn.Module, batch: LabeledBatch) -> LossOutput:
        out: ClassifierOutput = model(batch.ids, batch.mask)
        total = F.cross_entropy(out.logits.float(), batch.labels, reduction="sum")
        if self.penalty > 0 and out.weights.shape[1] > 1:
            total = total + self.penalty * len(batch) * pooling_penalty(out.weights.float())
        return LossOutput(total, len(batch), int(batch.mask.sum()))

    def validate(self, model: nn.Module) -> dict[str, float]:
        if not self._validation:
            return {"accuracy": float("nan")}
        device = next(model.parameters()).device
        gold, predicted, total = _predict_batches(model, self._validation, device)
        metrics = classification_metrics(gold, predicted, self.labels)
        return {
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
            "loss": total / len(gold),
        }


# --------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class SentimentSetup(Settings):
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


def label_set(settings: SentimentSetup, examples: Sequence[LabeledText]) -> LabelSet:
    found = sorted({e.label for e in examples})
    if len(found) < 2:
        raise DataError(
            settings.data,
            None,
            f"the training examples all have the label {found[0]!r}: a classifier needs at "
            "least 2 labels (check --label-column)",
        )
    return LabelSet(found)


#: The ``qkv train`` flags that only apply to a classifier trained from scratch.
SCRATCH_ONLY_FLAGS = ("preset", "vocab_size")


class SentimentSpec(TaskSpec[SentimentSetup, Any]):
    """Text classification as a :class:`~qkv.tasks.base.TaskSpec`: an
    :class:`~qkv.models.AttentionClassifier` from scratch, or a pretrained encoder fine-tuned
    (``pretrained``); the predictor is a :class:`TextClassifier` or a
    :class:`~qkv.tasks.pretrained_sentiment.PretrainedTextClassifier`."""

    name = TASK_NAME
    settings_type = SentimentSetup
    summary = (
        "text classification (sentiment) with an attention-pooling classifier, or a "
        "fine-tuned pretrained encoder (--pretrained minilm)"
    )
    metric_name = "accuracy"
    train_flags = (
        Flag(
            "--text-column",
            "data_options.text_column",
            "text column or field (default text)",
            reader=True,
        ),
        Flag(
            "--label-column",
            "data_options.label_column",
            "label column or field (default label)",
            reader=True,
        ),
        Flag(
            "--preset",
            "preset",
            "model",
            choices=("tiny", "bigru-fast", "bigru-small", "bigru-base", "transformer-small"),
        ),
        Flag("--dropout", "model_overrides.dropout", "override the preset's dropout", float),
        Flag("--pool-queries", "model_overrides.pool_queries", "attention-pooling queries r", int),
        Flag("--vocab-size", "vocab_size", "BPE vocabulary", int),
        Flag("--max-length", "max_length", "tokens kept per text, head + tail", int),
        Flag("--penalty", "penalty", "Lin et al.'s pooling penalty weight", float),
        Flag(
            "--pretrained",
            "pretrained",
            "fine-tune a pretrained encoder with a classification head: minilm or an HF-layout "
            "folder (not with --preset/--vocab-size); unless given, training then uses --lr "
            "1e-4, --schedule cosine and --warmup a tenth of --steps",
        ),
        Flag(
            "--pooling",
            "pooling",
            "head pooling over the pretrained encoder (only with --pretrained)",
            choices=("mean", "attention"),
        ),
    )

    def check_train_flags(self, given: dict[str, Any], base: SentimentSetup) -> None:
        """Refuse flags that do not go together (``given``: the flags set, by settings field;
        ``base``: the settings they apply to, a resumed run's saved ones or the defaults).

        Raises:
            ValueError: ``--preset``/``--vocab-size`` with ``--pretrained``, or ``--pooling``
                without it.
            PretrainedError: a ``--pretrained`` that is no folder or named model, or whose
                package is missing (checked before the data is read).
        """
        if given.get("pretrained") is not None:
            from qkv.models.pretrained import resolve_pretrained

            resolve_pretrained(given["pretrained"])
        if given.get("pretrained", base.pretrained) is not None:
            clash = [name for name in SCRATCH_ONLY_FLAGS if given.get(name) is not None]
            if clash:
                flags = "/".join("--" + name.replace("_", "-") for name in clash)
                raise ValueError(
                    f"{flags} sets up a model trained from scratch; --pretrained fine-tunes "
                    "the pretrained model as it is (drop one of them)"
                )
        elif given.get("pooling") is not None:
            raise ValueError("--pooling chooses the head of a --pretrained model; add --pretrained")

    def training_defaults(self, settings: SentimentSetup, max_steps: int | None) -> dict[str, Any]:
        """Training settings a new run takes unless given: fine-tuning ones with
        ``pretrained`` (see :data:`qkv.tasks.pretrained_sentiment.FINETUNE_DEFAULTS`)."""
        if settings.pretrained is None:
            return {}
        from qkv.tasks.pretrained_sentiment import finetune_defaults

        return finetune_defaults(max_steps)

    def legacy_settings(self, config: dict[str, Any]) -> dict[str, Any] | None:
        # Folders written before the settings had a section kept a few of them under "data".
        data = config.get("data")
        if not isinstance(data, dict) or "spec" not in data:
            return None
        values = {
            "data": data["spec"],
            "data_options": data.get("options") or {},
            "max_length": data.get("max_length"),
            "preset": data.get("preset", SentimentSetup.preset),
        }
        model = config.get("model")
        if data.get("pretrained") is not None and isinstance(model, dict):
            values["pretrained"] = data["pretrained"]
            values["pooling"] = model.get("pooling", "mean")
        return values

    def load_splits(self, data: str, options: dict[str, Any]) -> Splits[LabeledText]:
        return load_labeled(data, **options)

    def read_file(self, path: str, options: dict[str, Any]) -> list[LabeledText]:
        return read_labeled(path, **options)

    def prepare(
        self, settings: SentimentSetup, splits: Splits[LabeledText], *, folder: Path | None
    ) -> Prepared:
        if settings.pretrained is not None:
            from qkv.tasks.pretrained_sentiment import prepare_pretrained

            return prepare_pretrained(settings, splits, folder=folder)
        if folder is not None:
            saved = read_config(folder)
            tokenizer = TextTokenizer.load(folder / "tokenizer.json")
            labels = LabelSet(saved["labels"])
            config = ClassifierConfig.from_dict(saved["model"])
        else:
            tokenizer = TextTokenizer.train(
                [e.text for e in splits.train], mode="bpe", vocab_size=settings.vocab_size
            )
            labels = label_set(settings, splits.train)
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
        task = SentimentTask(
            dataset(splits.validation),
            labels,
            batch_size=2 * settings.batch_size,
            penalty=settings.penalty,
        )
        return Prepared(
            settings=settings,
            model=AttentionClassifier(config),
            model_config=config.to_dict(),
            objective=task,
            train_set=dataset(splits.train),
            collate=collate_labeled,
            batch_size=settings.batch_size,
            tokenizer=PairTokenizer(tokenizer),
            extra={"labels": list(labels.labels)},
        )

    def load(self, folder: Path, *, device: str = "auto") -> Any:
        """A :class:`TextClassifier`, or a
        :class:`~qkv.tasks.pretrained_sentiment.PretrainedTextClassifier` for a fine-tuned
        pretrained folder (both classify into :class:`Prediction`)."""
        from qkv.tasks.pretrained_sentiment import PretrainedTextClassifier, is_pretrained_folder

        if is_pretrained_folder(folder):
            return PretrainedTextClassifier.load(folder, device=device)
        return TextClassifier.load(folder, device=device)

    def evaluate(
        self, predictor: Any, examples: Sequence[LabeledText], options: EvalOptions
    ) -> dict[str, Any]:
        return evaluate_classifier(predictor, examples, batch_size=options.batch_size)

    def format_metrics(self, evaluation: Evaluation) -> list[str]:
        return format_classification(evaluation.metrics)


def format_classification(metrics: dict[str, Any]) -> list[str]:
    """Accuracy, macro-F1, the majority-class baseline (as percentages, like every rate qkv
    prints) and the mean loss, then the confusion matrix."""
    lines = [
        f"  accuracy {100 * metrics['accuracy']:.2f}%   macro-F1 {100 * metrics['macro_f1']:.2f}%   "
        f"majority class {100 * metrics['majority_baseline']:.2f}%   loss {metrics['loss']:.4f}"
    ]
    labels = [str(label) for label in metrics["labels"]]
    width = max(8, *(len(label) for label in labels))
    lines.append("  confusion (rows: gold, columns: predicted)")
    lines.append("  " + " " * width + "".join(f" {label:>{width}}" for label in labels))
    for label, row in zip(labels, metrics["confusion"], strict=True):
        lines.append(f"  {label:>{width}}" + "".join(f" {count:>{width}}" for count in row))
    return lines


# --------------------------------------------------------------------------------------------
# Inference


@dataclass(frozen=True)
class Prediction:
    """One text's classification.

    Attributes:
        label: the most probable label.
        probabilities: ``{label: probability}`` for every label, in label order.
        tokens: the text's tokens as the model read them (after truncation).
        weights: the pooling weight of each token, averaged over the pooling queries
            (sums to 1 over ``tokens``); for a mean-pooling classifier, whose pooling weighs
            every token alike, the attention rollout of its encoder to the pooled output.
        weights_kind: what ``weights`` are, in words (for captions).
    """

    label: str
    probabilities: dict[str, float]
    tokens: list[str]
    weights: list[float]
    weights_kind: str = "attention pooling"


class TextClassifier:
    """A trained classifier with its tokenizer and labels, loaded from a model folder.

    Args:
        model: the network (eval mode).
        tokenizer: its tokenizer.
        labels: its labels.
        max_length: tokens kept per text.
    """

    def __init__(
        self,
        model: AttentionClassifier,
        tokenizer: TextTokenizer,
        labels: LabelSet,
        max_length: int | None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.labels = labels
        self.max_length = max_length

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, device: str = "auto") -> TextClassifier:
        """Load a folder written by ``train_task("sentiment", ...)``, on ``device``.

        Raises:
            ModelFolderError: not a sentiment model folder, or inconsistent files.
        """
        model, config, settings = load_task_model(
            folder,
            TASK_NAME,
            lambda c: AttentionClassifier(ClassifierConfig.from_dict(c)),
            device=device,
            model_type=AttentionClassifier,
        )
        tokenizer = TextTokenizer.load(Path(folder) / "tokenizer.json")
        return cls(model, tokenizer, LabelSet(config["labels"]), settings.max_length)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def dataset(self, examples: Sequence[LabeledText]) -> LabeledDataset:
        """``examples`` tokenized as this classifier reads them."""
        return LabeledDataset.from_examples(
            examples, self.tokenizer, self.labels, max_length=self.max_length
        )

    @torch.no_grad()
    def classify(self, texts: Sequence[str], *, batch_size: int = 64) -> list[Prediction]:
        """Classify ``texts``.

        Raises:
            ValueError: an empty (or whitespace-only) text, naming its position.
        """
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"text {i} is empty: there is nothing to classify")
        ids = encode_texts(self.tokenizer, texts, self.max_length)
        predictions: list[Prediction] = []
        for start in range(0, len(ids), batch_size):
            predictions.extend(self._classify_ids(ids[start : start + batch_size]))
        return predictions

    def _classify_ids(self, rows: list[list[int]]) -> list[Prediction]:
        padded = pad_ids(rows)
        out = self.model(padded.ids.to(self._device()), padded.padding_mask.to(self._device()))
        probs = F.softmax(out.logits.float(), dim=-1).cpu()  # (B, C)
        weights = out.weights.float().mean(dim=1).cpu()  # (B, N)
        result = []
        for row, p, w in zip(rows, probs, weights, strict=True):
            tokens = [self.tokenizer.hf.decode([i], skip_special_tokens=False) for i in row]
            result.append(
                Prediction(
                    label=self.labels[int(p.argmax())],
                    probabilities={
                        lab: float(x) for lab, x in zip(self.labels.labels, p, strict=True)
                    },
                    tokens=tokens,
                    weights=w[: len(row)].tolist(),
                )
            )
        return result


def evaluate_classifier(
    classifier: Any, examples: Sequence[LabeledText], *, batch_size: int = 64
) -> dict[str, Any]:
    """Accuracy, macro-F1, the confusion matrix, the mean loss and the majority-class
    baseline of ``classifier`` (a :class:`TextClassifier` or a
    :class:`~qkv.tasks.pretrained_sentiment.PretrainedTextClassifier`) on ``examples``.

    Raises:
        ValueError: an example's label is not one the model knows (named in the message), or
            no examples.
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    dataset = classifier.dataset(examples)
    with torch.no_grad():
        gold, predicted, total = _predict_batches(
            classifier.model, _batches(dataset, batch_size), classifier._device()
        )
    return evaluation_metrics(gold, predicted, total, classifier.labels)


SPEC = SentimentSpec()
