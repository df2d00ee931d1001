"""What every classifying task shares: text batches, metrics, the objective, predictions.

The sentiment task (from scratch and fine-tuned pretrained, :mod:`qkv.tasks.sentiment` and
:mod:`qkv.tasks.pretrained_sentiment`) and the image task (:mod:`qkv.tasks.image`) import
these from here, so none of them imports another:

- text examples tokenized once (:class:`LabeledDataset`), padded into :class:`LabeledBatch`;
- :func:`classification_metrics` / :func:`evaluation_metrics` (accuracy, macro-F1, the
  confusion matrix, the mean loss, the majority-class baseline) and their table
  (:func:`format_classification`);
- :class:`ClassificationObjective`: validation accuracy (early stopping), macro-F1 and loss
  for the :class:`~qkv.train.Trainer`; a task supplies its loss and how a batch becomes logits;
- :class:`Prediction` and :func:`evaluate_classifier` for any text classifier.

Shapes: ``B`` examples, ``N`` tokens of the longest, ``C`` classes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from qkv.data.batching import BucketBatchSampler, TensorBatch
from qkv.data.labeled import LabeledText, LabelSet
from qkv.data.parallel import DataError
from qkv.data.tokenizer import TextTokenizer, pad_ids
from qkv.models.classifier import ClassifierOutput, pooling_penalty
from qkv.train import LossOutput

__all__ = [
    "ClassificationObjective",
    "LabeledBatch",
    "LabeledDataset",
    "Prediction",
    "TextObjective",
    "check_texts",
    "classification_metrics",
    "collate_labeled",
    "encode_texts",
    "evaluate_classifier",
    "evaluation_metrics",
    "format_classification",
    "head_tail",
    "label_set",
    "predict_batches",
    "text_batches",
    "text_logits",
]

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


def label_set(data: str, examples: Sequence[Any], *, what: str, hint: str = "") -> LabelSet:
    """The sorted labels of the training ``examples`` (anything with a ``label``).

    Raises:
        DataError: fewer than two labels (``what``: "examples" or "images"; ``hint``: what to
            check, appended to the message).
    """
    found = sorted({e.label for e in examples})
    if len(found) < 2:
        raise DataError(
            data,
            None,
            f"the training {what} all have the label {found[0]!r}: a classifier needs at "
            f"least 2 {hint}",
        )
    return LabelSet(found)


# --------------------------------------------------------------------------------------------
# Text batches


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


def text_batches(dataset: LabeledDataset, batch_size: int) -> list[LabeledBatch]:
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


def format_classification(metrics: dict[str, Any]) -> list[str]:
    """Accuracy, macro-F1, the majority-class baseline and the confusion matrix."""
    lines = [
        f"  accuracy {metrics['accuracy']:.4f}   macro-F1 {metrics['macro_f1']:.4f}   "
        f"majority class {metrics['majority_baseline']:.4f}   loss {metrics['loss']:.4f}"
    ]
    labels = [str(label) for label in metrics["labels"]]
    width = max(8, *(len(label) for label in labels))
    lines.append("  confusion (rows: gold, columns: predicted)")
    lines.append("  " + " " * width + "".join(f" {label:>{width}}" for label in labels))
    for label, row in zip(labels, metrics["confusion"], strict=True):
        lines.append(f"  {label:>{width}}" + "".join(f" {count:>{width}}" for count in row))
    return lines


def text_logits(model: nn.Module, batch: LabeledBatch) -> Tensor:
    """``(B, C)`` float32 logits of a text classifier (``model(ids, mask).logits``)."""
    return model(batch.ids, batch.mask).logits.float()


def predict_batches(
    model: nn.Module,
    batches: Sequence[Any],
    device: torch.device,
    logits_of: Any = text_logits,
) -> tuple[list[int], list[int], float]:
    """Gold and predicted class indices in dataset order (by the batches' ``index``), and the
    summed cross-entropy; ``logits_of(model, batch) -> (B, C)`` reads a batch."""
    gold: dict[int, int] = {}
    predicted: dict[int, int] = {}
    total = 0.0
    for batch in batches:
        batch = batch.to(device)
        logits = logits_of(model, batch)  # (B, C)
        total += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
        for i, g, p in zip(
            batch.index.tolist(), batch.labels.tolist(), logits.argmax(-1).tolist(), strict=True
        ):
            gold[i], predicted[i] = g, p
    order = sorted(gold)
    return [gold[i] for i in order], [predicted[i] for i in order], total


# --------------------------------------------------------------------------------------------
# The objective the trainer runs


class ClassificationObjective(ABC):
    """Validation accuracy (the early-stopping metric), macro-F1 and mean loss over the
    validation ``batches``; a task adds its :meth:`loss` and :meth:`logits`.

    Args:
        name: the task's name.
        batches: the validation batches (empty: validation reports NaN accuracy).
        labels: the label set.
    """

    metric = "accuracy"
    higher_is_better = True

    def __init__(self, name: str, batches: Sequence[Any], labels: LabelSet) -> None:
        self.name = name
        self.labels = labels
        self._validation = list(batches)

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        """The summed loss of ``batch`` (see :class:`qkv.train.Task`)."""

    @abstractmethod
    def logits(self, model: nn.Module, batch: Any) -> Tensor:
        """``(B, C)`` float32 logits of ``batch``."""

    def validate(self, model: nn.Module) -> dict[str, float]:
        if not self._validation:
            return {"accuracy": float("nan")}
        device = next(model.parameters()).device
        gold, predicted, total = predict_batches(model, self._validation, device, self.logits)
        metrics = classification_metrics(gold, predicted, self.labels)
        return {
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
            "loss": total / len(gold),
        }


class TextObjective(ClassificationObjective):
    """Summed cross-entropy over texts (plus Lin et al.'s pooling penalty when the model pools
    with several queries); validation as :class:`ClassificationObjective`.

    Args:
        validation: the validation examples, tokenized.
        labels: the label set.
        batch_size: validation batch size.
        penalty: weight of the pooling penalty (used when ``r > 1``).
        name: the task's name.
    """

    def __init__(
        self,
        validation: LabeledDataset,
        labels: LabelSet,
        *,
        batch_size: int = 64,
        penalty: float = 0.0,
        name: str = "sentiment",
    ) -> None:
        batches = text_batches(validation, batch_size) if len(validation) else []
        super().__init__(name, batches, labels)
        self.penalty = penalty

    def logits(self, model: nn.Module, batch: LabeledBatch) -> Tensor:
        return text_logits(model, batch)

    def loss(self, model: nn.Module, batch: LabeledBatch) -> LossOutput:
        out: ClassifierOutput = model(batch.ids, batch.mask)
        total = F.cross_entropy(out.logits.float(), batch.labels, reduction="sum")
        if self.penalty > 0 and out.weights.shape[1] > 1:
            total = total + self.penalty * len(batch) * pooling_penalty(out.weights.float())
        return LossOutput(total, len(batch), int(batch.mask.sum()))


# --------------------------------------------------------------------------------------------
# Text predictions


@dataclass(frozen=True)
class Prediction:
    """One text's classification.

    Attributes:
        label: the most probable label.
        probabilities: ``{label: probability}`` for every label, in label order.
        tokens: the text's tokens as the model read them (after truncation).
        weights: the pooling weight of each token, averaged over the pooling queries
            (sums to 1 over ``tokens``).
    """

    label: str
    probabilities: dict[str, float]
    tokens: list[str]
    weights: list[float]


def check_texts(texts: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the position of an empty (or whitespace-only) text."""
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text {i} is empty: there is nothing to classify")


def evaluate_classifier(
    classifier: Any, examples: Sequence[LabeledText], *, batch_size: int = 64
) -> dict[str, Any]:
    """Accuracy, macro-F1, the confusion matrix, the mean loss and the majority-class
    baseline of a text ``classifier`` (a :class:`~qkv.tasks.sentiment.TextClassifier` or a
    :class:`~qkv.tasks.pretrained_sentiment.PretrainedTextClassifier`: anything with
    ``dataset(examples)``, ``model``, ``labels``) on ``examples``.

    Raises:
        ValueError: an example's label is not one the model knows (named in the message), or
            no examples.
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    dataset = classifier.dataset(examples)
    device = next(classifier.model.parameters()).device
    with torch.no_grad():
        gold, predicted, total = predict_batches(
            classifier.model, text_batches(dataset, batch_size), device
        )
    return evaluation_metrics(gold, predicted, total, classifier.labels)
