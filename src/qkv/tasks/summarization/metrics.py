"""ROUGE and the lead baseline."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["lead_baseline", "rouge_scores"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (x100) with the Porter stemmer (``rouge-score``, Google's
    reimplementation of Lin 2004).

    Raises:
        ValueError: the two lists differ in length or are empty.
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"need as many predictions ({len(predictions)}) as references ({len(references)}), >0"
        )
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for key in totals:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * value / len(predictions) for key, value in totals.items()}


def lead_baseline(document: str, sentences: int = 1) -> str:
    """The first ``sentences`` sentences of ``document`` (split after ``.``, ``!``, ``?``)."""
    return " ".join(_SENTENCE_END.split(document.strip())[:sentences])
