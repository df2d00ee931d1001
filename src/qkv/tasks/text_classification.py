"""Text classification: texts tokenized once, padded batches, the text objective, predictions.

Shared by the sentiment task's two recipes (:mod:`qkv.tasks.sentiment_scratch`,
:mod:`qkv.tasks.pretrained_sentiment`); the metrics and the validation are the classification
room's (:mod:`qkv.tasks.classification`).

Long texts keep their head and tail (:func:`head_tail`): the verdict of a review is often in its
last sentences (Sun et al. 2019, "How to Fine-Tune BERT for Text Classification?", found
head+tail truncation best on IMDB).

Shapes: ``B`` texts, ``N`` tokens of the longest, ``C`` classes, ``r`` pooling queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from qkv.data.batching import BucketBatchSampler, TensorBatch
from qkv.data.labeled import LabeledText, LabelSet
from qkv.data.tokenizer import TextTokenizer, pad_ids
from qkv.models.classifier import ClassifierOutput, pooling_penalty
from qkv.tasks.classification import ClassificationObjective, evaluation_metrics, predict_batches
from qkv.train import LossOutput

__all__ = [
    "LabeledBatch",
    "LabeledDataset",
    "Prediction",
    "TextObjective",
    "TextPredictor",
    "check_texts",
    "collate_labeled",
    "encode_texts",
    "evaluate_classifier",
    "head_tail",
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


def text_logits(model: nn.Module, batch: LabeledBatch) -> Tensor:
    """``(B, C)`` float32 logits of a text classifier (``model(ids, mask).logits``)."""
    return model(batch.ids, batch.mask).logits.float()


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
            (sums to 1 over ``tokens``); for a mean-pooling classifier, whose pooling weighs
            every token alike, the attention rollout of its encoder to the pooled output.
        weights_kind: what ``weights`` are, in words (for captions).
    """

    label: str
    probabilities: dict[str, float]
    tokens: list[str]
    weights: list[float]
    weights_kind: str = "attention pooling"


def check_texts(texts: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the position of an empty (or whitespace-only) text."""
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text {i} is empty: there is nothing to classify")


class TextPredictor:
    """What a text classifier loaded from a model folder is: its network (eval mode), its
    tokenizer, its labels and the tokens it keeps per text; a kind of model says how texts
    become ids (:meth:`encode`) and how it reads them (:meth:`dataset`).

    Args:
        model: the network; ``model(ids (B, N), mask (B, N))`` gives ``logits (B, C)`` and
            pooling ``weights (B, r, N)``.
        tokenizer: its tokenizer.
        labels: its labels.
        max_length: tokens kept per text.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, labels: LabelSet, max_length: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.labels = labels
        self.max_length = max_length

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor, list[list[str]]]:
        """``ids (B, N)``, bool ``mask (B, N)`` and each text's tokens as the model reads them."""
        raise NotImplementedError

    def dataset(self, examples: Sequence[LabeledText]) -> LabeledDataset:
        """``examples`` tokenized as this classifier reads them."""
        raise NotImplementedError

    def token_weights(self, ids: Tensor, mask: Tensor, pooling: Tensor) -> tuple[Tensor, str]:
        """What each token weighed in the decision ``(B, N)``, and what that is in words: the
        pooling weights ``pooling (B, N)`` by default."""
        return pooling, "attention pooling"

    @torch.no_grad()
    def classify(self, texts: Sequence[str], *, batch_size: int = 64) -> list[Prediction]:
        """Classify ``texts`` (the pooling weights say which tokens the decision read).

        Raises:
            ValueError: an empty (or whitespace-only) text, naming its position.
        """
        check_texts(texts)
        predictions: list[Prediction] = []
        for start in range(0, len(texts), batch_size):
            ids, mask, tokens = self.encode(texts[start : start + batch_size])
            out = self.model(ids.to(self._device()), mask.to(self._device()))
            probs = F.softmax(out.logits.float(), dim=-1).cpu()  # (B, C)
            pooling = out.weights.float().mean(dim=1).cpu()  # (B, N)
            weights, kind = self.token_weights(ids, mask, pooling)
            for row, p, w in zip(tokens, probs, weights, strict=True):
                predictions.append(
                    Prediction(
                        label=self.labels[int(p.argmax())],
                        probabilities={
                            lab: float(x) for lab, x in zip(self.labels.labels, p, strict=True)
                        },
                        tokens=row,
                        weights=w[: len(row)].tolist(),
                        weights_kind=kind,
                    )
                )
        return predictions


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
            classifier.model, text_batches(dataset, batch_size), device, text_logits
        )
    return evaluation_metrics(gold, predicted, total, classifier.labels)
