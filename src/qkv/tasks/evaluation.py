"""Translation scores: BLEU and chrF (sacrebleu), exact match, and all three by source length.

Length buckets are cut from the **source length in characters**, which does not depend on a
model's tokenizer, so models with different vocabularies are scored on the same buckets.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BucketScores",
    "TranslationScores",
    "format_translation_scores",
    "length_buckets",
    "plot_scores_by_length",
    "score_translations",
]

BLEU_MAX_ORDER = 4  # BLEU's longest n-gram: shorter outputs score 0 on it

SACREBLEU_INSTALL = "pip install 'sacrebleu==2.6.0'  (or: pip install -e '.[tasks]')"


@dataclass(frozen=True)
class BucketScores:
    """Scores of the sentences whose source has ``low <= characters <= high``."""

    low: int
    high: int
    count: int
    bleu: float
    chrf: float
    exact_match: float


@dataclass(frozen=True)
class TranslationScores:
    """Corpus-level scores (BLEU and chrF on a 0-100 scale, exact match a fraction).

    Attributes:
        count: sentences scored.
        bleu: sacrebleu's corpus BLEU (default 13a tokenization).
        chrf: sacrebleu's corpus chrF (character 6-grams, beta 2).
        exact_match: fraction of hypotheses equal to their reference (after stripping spaces at
            the ends).
        by_length: the same per source-length bucket, shortest first.
        short_hypotheses: fraction of hypotheses shorter than 4 tokens (BLEU's longest
            n-gram): when most are, BLEU is near 0 whatever their quality, and chrF (character
            n-grams) is the score to read.
    """

    count: int
    bleu: float
    chrf: float
    exact_match: float
    by_length: list[BucketScores]
    short_hypotheses: float = 0.0

    @property
    def bleu_meaningful(self) -> bool:
        """Whether BLEU says something here (most hypotheses have at least 4 tokens)."""
        return self.short_hypotheses <= 0.5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, float]:
    try:
        import sacrebleu
    except ImportError:
        raise ModuleNotFoundError(
            f"BLEU and chrF need sacrebleu, which is not installed; run: {SACREBLEU_INSTALL}"
        ) from None
    if not hypotheses:
        return 0.0, 0.0
    refs = [list(references)]
    bleu = sacrebleu.corpus_bleu(list(hypotheses), refs).score
    chrf = sacrebleu.corpus_chrf(list(hypotheses), refs).score
    return float(bleu), float(chrf)


def _exact(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    if not hypotheses:
        return 0.0
    same = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True))
    return same / len(hypotheses)


def length_buckets(lengths: Sequence[int], num_buckets: int = 6) -> list[tuple[int, int]]:
    """Up to ``num_buckets`` inclusive ``(low, high)`` ranges holding about equally many of
    ``lengths`` (quantiles; a length never straddles two buckets)."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    ordered = sorted(lengths)
    if not ordered:
        return []
    edges: list[tuple[int, int]] = []
    low = ordered[0]
    for b in range(1, num_buckets + 1):
        high = ordered[min(len(ordered) - 1, b * len(ordered) // num_buckets - 1)]
        if high >= low:
            edges.append((low, high))
            low = high + 1
    if edges[-1][1] < ordered[-1]:
        edges.append((low, ordered[-1]))
    return edges


def score_translations(
    hypotheses: Sequence[str],
    references: Sequence[str],
    sources: Sequence[str],
    *,
    num_buckets: int = 6,
) -> TranslationScores:
    """Score ``hypotheses`` against ``references``, overall and per source-length bucket.

    Raises:
        ValueError: the three lists differ in length.
    """
    if not len(hypotheses) == len(references) == len(sources):
        raise ValueError(
            f"hypotheses ({len(hypotheses)}), references ({len(references)}) and sources "
            f"({len(sources)}) must have the same length"
        )
    bleu, chrf = _corpus_scores(hypotheses, references)
    lengths = [len(s) for s in sources]
    buckets = []
    for low, high in length_buckets(lengths, num_buckets):
        rows = [i for i, n in enumerate(lengths) if low <= n <= high]
        hyp = [hypotheses[i] for i in rows]
        ref = [references[i] for i in rows]
        b_bleu, b_chrf = _corpus_scores(hyp, ref)
        buckets.append(BucketScores(low, high, len(rows), b_bleu, b_chrf, _exact(hyp, ref)))
    short = sum(len(h.split()) < BLEU_MAX_ORDER for h in hypotheses) / max(len(hypotheses), 1)
    return TranslationScores(
        len(hypotheses), bleu, chrf, _exact(hypotheses, references), buckets, short
    )


def format_translation_scores(scores: dict[str, Any]) -> list[str]:
    """Table lines of :meth:`TranslationScores.to_dict`: the totals, a note when BLEU is not
    meaningful, then one row per source-length bucket."""
    lines = [
        f"  BLEU {scores['bleu']:.2f}  chrF {scores['chrf']:.2f}  "
        f"exact match {100 * scores['exact_match']:.2f}%"
    ]
    short = float(scores.get("short_hypotheses", 0.0))
    if short > 0.5:
        lines.append(
            f"  note: {100 * short:.0f}% of the outputs are shorter than {BLEU_MAX_ORDER} tokens, "
            "so BLEU (up to 4-grams) is not meaningful here; read chrF and exact match"
        )
    lines.append(f"  {'source chars':>14} {'pairs':>6} {'BLEU':>7} {'chrF':>7} {'exact':>8}")
    for b in scores["by_length"]:
        span = f"{b['low']}-{b['high']}"
        lines.append(
            f"  {span:>14} {b['count']:>6} {b['bleu']:7.2f} {b['chrf']:7.2f} "
            f"{100 * b['exact_match']:7.2f}%"
        )
    return lines


def plot_scores_by_length(
    results: dict[str, TranslationScores],
    path: str | os.PathLike[str],
    *,
    metric: str = "chrf",
    title: str | None = None,
) -> Path:
    """A PNG of ``metric`` against source length, one line per model.

    Args:
        results: model name -> its scores (with ``by_length``).
        path: where to write the picture (format from the suffix).
        metric: ``"bleu"``, ``"chrf"`` or ``"exact_match"`` (shown in percent).
        title: drawn above the plot.

    Raises:
        ValueError: an unknown metric.
    """
    if metric not in ("bleu", "chrf", "exact_match"):
        raise ValueError(f"metric must be 'bleu', 'chrf' or 'exact_match', got {metric!r}")
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    scale = 100.0 if metric == "exact_match" else 1.0
    for name, scores in results.items():
        middles = [(b.low + b.high) / 2 for b in scores.by_length]
        values = [getattr(b, metric) * scale for b in scores.by_length]
        ax.plot(middles, values, marker="o", label=name)
    ax.set_xlabel("source length (characters, bucket middle)")
    ax.set_ylabel({"bleu": "BLEU", "chrf": "chrF", "exact_match": "exact match (%)"}[metric])
    ax.grid(alpha=0.3)
    ax.legend()
    if title is not None:
        ax.set_title(title)
    from qkv.viz import save_figure

    return save_figure(fig, path, dpi=110)
