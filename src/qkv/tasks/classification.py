"""What every classifying task shares: metrics, their table, the objective, the label set.

The text classifiers (:mod:`qkv.tasks.text_classification`, used by both sentiment recipes)
and the image task (:mod:`qkv.tasks.image`) import these from here, so none of them imports
another:

- :func:`classification_metrics` / :func:`evaluation_metrics` (accuracy, macro-F1, the
  confusion matrix, the mean loss, the majority-class baseline) and their table
  (:func:`format_classification`);
- :class:`ClassificationObjective`: validation accuracy (early stopping), macro-F1 and loss
  for the :class:`~qkv.train.Trainer`; a task supplies its loss and how a batch becomes logits;
- :func:`predict_batches` and :func:`label_set`.

Shapes: ``B`` examples, ``C`` classes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv.data.labeled import LabelSet
from qkv.data.parallel import DataError
from qkv.train import LossOutput

__all__ = [
    "ClassificationObjective",
    "classification_metrics",
    "evaluation_metrics",
    "format_classification",
    "label_set",
    "predict_batches",
]

Item = tuple[int, list[int], int]


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


def predict_batches(
    model: nn.Module,
    batches: Sequence[Any],
    device: torch.device,
    logits_of: Callable[[nn.Module, Any], Tensor],
) -> tuple[list[int], list[int], float]:
    """Gold and predicted class indices in dataset order (by the batches' ``index``), and the
    summed cross-entropy; ``logits_of(model, batch) -> (B, C)`` reads a batch (a batch has
    ``labels`` and ``index``, ``(B,)`` int64 each)."""
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
