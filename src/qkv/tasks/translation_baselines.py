"""Two translators that learn nothing, scored beside a model: copy-the-source and retrieval.

A model trained on a small corpus can score *below* doing nothing: when source and target share
names, numbers and product terms, returning the source unchanged already earns BLEU and chrF,
and when the test sentences resemble training ones, returning the target of the most similar
training source earns more. :func:`translation_baselines` scores both on the examples a model is
scored on, and :func:`baseline_verdict` says in one line when the model does not beat them.

- **copy**: the hypothesis is the source itself.
- **retrieval**: the hypothesis is the target of the training pair whose source is most similar
  to the test source by sentence chrF (sacrebleu). Scoring every test source against every
  training source with sacrebleu is slow in Python (seconds per thousand pairs), so each test
  source first keeps the :data:`SHORTLIST` training sources with the largest cosine similarity
  of character 3-gram counts (one sparse product for the whole set), and chrF picks among them.
  With at most :data:`SHORTLIST` training pairs every one is scored by chrF.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from qkv.tasks.evaluation import score_translations

__all__ = [
    "BASELINES",
    "SHORTLIST",
    "baseline_verdict",
    "format_baselines",
    "nearest_sources",
    "retrieve_targets",
    "translation_baselines",
]

#: The baselines, in the order they are reported.
BASELINES: tuple[str, ...] = ("copy", "retrieval")

#: Training sources kept per test source by the n-gram prefilter before chrF ranks them.
SHORTLIST = 16

_NGRAM = 3  # characters per prefilter n-gram (chrF uses 1..6; 3 keeps the index small)
_QUERY_CHUNK = 256  # test sources per sparse product (bounds the dense (chunk, N) scores)


def _char_ngrams(text: str) -> Counter[str]:
    """Character 3-gram counts of ``text`` without whitespace (as chrF reads it); a text
    shorter than 3 characters counts as one n-gram of itself."""
    chars = "".join(text.split())
    if len(chars) < _NGRAM:
        return Counter([chars]) if chars else Counter()
    return Counter(chars[i : i + _NGRAM] for i in range(len(chars) - _NGRAM + 1))


def _count_matrix(texts: Sequence[str], index: dict[str, int], *, grow: bool) -> torch.Tensor:
    """Sparse ``(len(texts), G)`` float32 rows of n-gram counts, L2-normalised; ``grow`` adds
    unseen n-grams to ``index`` (training side), otherwise they are dropped (they match
    nothing)."""
    rows, cols, values = [], [], []
    for r, text in enumerate(texts):
        counts = _char_ngrams(text)
        norm = sum(c * c for c in counts.values()) ** 0.5 or 1.0
        for gram, count in counts.items():
            col = index.get(gram)
            if col is None:
                if not grow:
                    continue
                col = index[gram] = len(index)
            rows.append(r)
            cols.append(col)
            values.append(count / norm)
    indices = torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1)
    return torch.sparse_coo_tensor(
        indices,
        torch.tensor(values, dtype=torch.float32),
        (len(texts), max(len(index), 1)),
        check_invariants=True,
    ).coalesce()


def _shortlists(queries: Sequence[str], sources: Sequence[str], k: int) -> list[list[int]]:
    """Per query, the ``k`` training sources of largest n-gram cosine similarity."""
    index: dict[str, int] = {}
    train = _count_matrix(sources, index, grow=True)  # (N, G)
    train_t = train.t().coalesce().to_dense() if len(index) * len(sources) <= 2**24 else None
    out: list[list[int]] = []
    for start in range(0, len(queries), _QUERY_CHUNK):
        chunk = _count_matrix(queries[start : start + _QUERY_CHUNK], index, grow=False)  # (C, G)
        if train_t is not None:
            scores = torch.sparse.mm(chunk, train_t)  # (C, N)
        else:  # a large corpus: sparse x sparse, then dense (C, N)
            with warnings.catch_warnings():  # torch calls its sparse CSR result "beta"
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
                scores = torch.sparse.mm(chunk, train.t()).to_dense()
        out += scores.topk(min(k, len(sources)), dim=1).indices.tolist()
    return out


def nearest_sources(
    queries: Sequence[str],
    sources: Sequence[str],
    *,
    shortlist: int = SHORTLIST,
    exclude: Sequence[int] | None = None,
) -> list[tuple[int, float]]:
    """For each query, the index of the source with the highest sentence chrF against it and
    that chrF (among the ``shortlist`` closest by character 3-grams; ties: the earlier source).

    Args:
        queries: the texts to find neighbours for.
        sources: the texts searched.
        shortlist: sources kept per query by the 3-gram prefilter before chrF ranks them.
        exclude: per query, a source index it may not return (leave-one-out: query ``i`` is
            ``sources[i]`` itself), or ``-1`` for none.

    Returns:
        ``(index, chrF)`` per query; ``(-1, 0.0)`` when no source is left to return (one
        source, excluded).

    Raises:
        ValueError: no sources, ``shortlist < 1``, or ``exclude`` of another length than
            ``queries``.
    """
    from sacrebleu.metrics import CHRF

    if not sources:
        raise ValueError("retrieval needs training pairs; got none")
    if shortlist < 1:
        raise ValueError(f"shortlist must be >= 1, got {shortlist}")
    if exclude is not None and len(exclude) != len(queries):
        raise ValueError(
            f"exclude has {len(exclude)} entries for {len(queries)} queries: give one per query"
        )
    skip = list(exclude) if exclude is not None else [-1] * len(queries)
    widened = shortlist + (exclude is not None)  # room for the excluded source itself
    chrf = CHRF()
    out = []
    for query, candidates, banned in zip(
        queries, _shortlists(queries, sources, widened), skip, strict=True
    ):
        kept = [i for i in candidates if i != banned][:shortlist]
        if not kept:
            out.append((-1, 0.0))
            continue
        score, negative = max((chrf.sentence_score(sources[i], [query]).score, -i) for i in kept)
        out.append((-negative, score))
    return out


def retrieve_targets(
    queries: Sequence[str], train_pairs: Sequence[tuple[str, str]], *, shortlist: int = SHORTLIST
) -> list[str]:
    """For each query, the target of the training pair whose source has the highest sentence
    chrF against it (:func:`nearest_sources`).

    Raises:
        ValueError: no training pairs, or ``shortlist < 1``.
    """
    if not train_pairs:
        raise ValueError("retrieval needs training pairs; got none")
    sources = [s for s, _ in train_pairs]
    found = nearest_sources(queries, sources, shortlist=shortlist)
    return [train_pairs[i][1] for i, _ in found]


def translation_baselines(
    sources: Sequence[str],
    references: Sequence[str],
    train_pairs: Sequence[tuple[str, str]] | None,
    *,
    num_buckets: int = 6,
) -> dict[str, Any]:
    """BLEU, chrF and exact match of the copy and retrieval baselines on these examples.

    Args:
        sources, references: the scored examples.
        train_pairs: ``(source, target)`` pairs to retrieve from (``None`` or empty: the
            retrieval baseline is left out).
        num_buckets: as in :func:`~qkv.tasks.evaluation.score_translations`.

    Returns:
        ``{"copy": scores, "retrieval": scores}`` (each :meth:`TranslationScores.to_dict`),
        ``retrieval`` only with training pairs.
    """
    results: dict[str, Any] = {
        "copy": score_translations(
            list(sources), references, sources, num_buckets=num_buckets
        ).to_dict()
    }
    if train_pairs:
        retrieved = retrieve_targets(sources, train_pairs)
        results["retrieval"] = score_translations(
            retrieved, references, sources, num_buckets=num_buckets
        ).to_dict()
    return results


def baseline_verdict(metrics: dict[str, Any], baselines: dict[str, Any]) -> str | None:
    """One line naming each baseline the model does not beat on BLEU or chrF (``None``: it
    beats every baseline on both)."""
    misses = []
    for name in BASELINES:
        if name not in baselines:
            continue
        lost = [
            f"{label} {metrics[key]:.2f} <= {baselines[name][key]:.2f}"
            for key, label in (("bleu", "BLEU"), ("chrf", "chrF"))
            if metrics[key] <= baselines[name][key]
        ]
        if lost:
            misses.append(f"{name} ({', '.join(lost)})")
    if not misses:
        return None
    return "the model does not beat the " + "; nor the ".join(misses)


def format_baselines(metrics: dict[str, Any]) -> list[str]:
    """Table lines for the ``baselines`` of a translation report (nothing if absent)."""
    baselines = metrics.get("baselines")
    if not baselines:
        return []
    lines = [f"  {'':>18} {'BLEU':>7} {'chrF':>7} {'exact':>8}"]
    lines.append(
        f"  {'model':>18} {metrics['bleu']:7.2f} {metrics['chrf']:7.2f} "
        f"{100 * metrics['exact_match']:7.2f}%"
    )
    for name in BASELINES:
        if name in baselines:
            b = baselines[name]
            lines.append(
                f"  {name + ' baseline':>18} {b['bleu']:7.2f} {b['chrf']:7.2f} "
                f"{100 * b['exact_match']:7.2f}%"
            )
    if "retrieval" not in baselines and metrics.get("baselines_note"):
        lines.append(f"  note: {metrics['baselines_note']}")
    verdict = baseline_verdict(metrics, baselines)
    if verdict is not None:
        lines.append(f"  warning: {verdict}")
    return lines
