r"""Cross-attention against gold alignments: the alignment error rate of every head.

The built-in ``dates`` and ``numbers`` data know, by construction, which source characters write
each target character (:func:`qkv.data.builtin.dates.aligned_dates`,
:func:`qkv.data.builtin.number_words.aligned_numbers`). Teacher-forcing the gold target through a
translation model gives, per decoder layer ``l`` and head ``h``, the attention row each target
token was produced with; its argmax is the head's alignment link for that token.

Gold links (Och & Ney 2003, "A Systematic Comparison of Various Statistical Alignment Models"):

- **possible** ``P``: target character ``t`` to every source token of the field (dates: the year,
  month or day as written; numbers: the word that writes the digit) that determines ``t``;
- **sure** ``S ⊆ P``: where a target digit copies a source digit (the year's digits one to one,
  the day's digits right-aligned: ``3`` -> ``03`` links the ``3``). Month names and number words
  have no sure link, only possible ones.

Target characters no field writes (the date's hyphens, zeros no number word writes, ``</s>``) are
not scored. With one predicted link per scored target token, ``A``::

    AER = 1 - (|A ∩ S| + |A ∩ P|) / (|A| + |S|)          hit rate = |A ∩ P| / |A|

0 is a perfect alignment. For ``numbers``, ``S`` is empty and ``AER = 1 - hit rate``.

Shapes: ``L`` decoder layers, ``H`` heads, ``Nt`` target tokens (with ``</s>``), ``Ns`` source
tokens (with ``</s>``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "AlignmentReport",
    "GoldAlignment",
    "alignment_counts",
    "alignment_error_rate",
    "alignment_report",
    "gold_alignments",
    "load_translator",
]


@dataclass(frozen=True)
class GoldAlignment:
    """One sentence pair with gold links in token positions.

    Attributes:
        source: the source text.
        target: the target text.
        sure: ``{(target token, source token)}`` sure links.
        possible: ``{(target token, source token)}`` possible links (a superset of ``sure``).
        scored: target token positions that have gold links (the others are not scored).
    """

    source: str
    target: str
    sure: frozenset[tuple[int, int]]
    possible: frozenset[tuple[int, int]]
    scored: tuple[int, ...]


def _token_spans(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Character span of each token of ``text`` (as the model sees it, no specials)."""
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)
    return [tuple(span) for span in encoding.offsets]


def _tokens_of(spans: list[tuple[int, int]], chars: tuple[int, int]) -> list[int]:
    a, b = chars
    return [j for j, (s, e) in enumerate(spans) if s < b and e > a]


def _char_links(
    source: str, target: str, spec: str, item: Any
) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """Gold links ``(target char, source char)``: sure and possible."""
    sure: set[tuple[int, int]] = set()
    possible: set[tuple[int, int]] = set()
    if spec == "builtin:dates":
        positions = {"year": range(0, 4), "month": range(5, 7), "day": range(8, 10)}
        for field, targets in positions.items():
            a, b = item.fields[field]
            written = source[a:b]
            for t in targets:
                possible.update((t, s) for s in range(a, b))
            if written.isdigit():  # copy links, right-aligned: "3" -> "03"
                for i, t in enumerate(reversed(targets)):
                    if i < len(written):
                        sure.add((t, b - 1 - i))
    else:
        for t, span in enumerate(item.digits):
            if span is not None:
                possible.update((t, s) for s in range(span[0], span[1]))
    return sure, possible


def gold_alignments(
    spec: str,
    tokenizer_source: Any,
    tokenizer_target: Any,
    *,
    examples: int,
    seed: int = 1,
) -> list[GoldAlignment]:
    """Generated pairs of ``spec`` (``"builtin:dates"`` or ``"builtin:numbers"``) with gold links
    mapped to the tokens of the given source and target tokenizers (``TextTokenizer``)."""
    if spec == "builtin:dates":
        from qkv.data.builtin.dates import aligned_dates

        items: Sequence[Any] = aligned_dates(examples, seed=seed)
    elif spec == "builtin:numbers":
        from qkv.data.builtin.number_words import aligned_numbers

        items = aligned_numbers(examples, seed=seed)
    else:
        raise ValueError(f"spec must be 'builtin:dates' or 'builtin:numbers'; got {spec!r}")
    out = []
    for item in items:
        sure_chars, possible_chars = _char_links(item.source, item.target, spec, item)
        source_spans = _token_spans(tokenizer_source, item.source)
        target_spans = _token_spans(tokenizer_target, item.target)
        sure: set[tuple[int, int]] = set()
        possible: set[tuple[int, int]] = set()
        for chars, tokens in ((sure_chars, sure), (possible_chars, possible)):
            for t, s in chars:
                for tt in _tokens_of(target_spans, (t, t + 1)):
                    tokens.update((tt, ss) for ss in _tokens_of(source_spans, (s, s + 1)))
        scored = tuple(sorted({t for t, _ in possible}))
        out.append(
            GoldAlignment(item.source, item.target, frozenset(sure), frozenset(possible), scored)
        )
    return out


def alignment_counts(weights: Tensor, gold: GoldAlignment) -> Tensor:
    """``(..., 4)`` counts ``|A|, |S|, |A ∩ S|, |A ∩ P|`` of the argmax links of ``weights
    (..., Nt, Ns)`` (any leading axes, e.g. ``(L, H)``) over the scored target tokens."""
    links = weights.argmax(dim=-1)  # (..., Nt)
    counts = torch.zeros(*weights.shape[:-2], 4)
    counts[..., 0] = len(gold.scored)
    counts[..., 1] = sum(1 for t, _ in gold.sure if t in gold.scored)
    for t in gold.scored:
        chosen = links[..., t]
        counts[..., 2] += sum((chosen == s).float() for tt, s in gold.sure if tt == t)
        counts[..., 3] += sum((chosen == s).float() for tt, s in gold.possible if tt == t)
    return counts


def alignment_error_rate(counts: Tensor) -> Tensor:
    """AER ``1 - (|A ∩ S| + |A ∩ P|) / (|A| + |S|)`` of summed :func:`alignment_counts`."""
    a, s, a_s, a_p = counts.unbind(-1)
    return 1 - (a_s + a_p) / (a + s).clamp_min(1)


@dataclass
class AlignmentReport:
    """AER of every cross-attention head of a model over ``examples`` gold-aligned pairs.

    Attributes:
        spec: the data.
        examples: pairs scored.
        aer: ``[layer][head]`` AER (``L x H``).
        hit_rate: ``[layer][head]`` share of argmax links inside the gold field.
        layer_mean_aer: ``[layer]`` AER of the head-averaged attention of each layer.
        best: ``(layer, head, aer)`` of the best head.
    """

    spec: str
    examples: int
    aer: list[list[float]]
    hit_rate: list[list[float]]
    layer_mean_aer: list[float]
    best: tuple[int, int, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self, title: str = "") -> str:
        """Markdown: AER (hit rate) per layer and head, the head mean and the best head."""
        heads = len(self.aer[0])
        lines = [f"### {title}", ""] if title else []
        lines += [
            f"AER of the argmax cross-attention link vs gold, {self.examples} pairs "
            "(hit rate: argmax inside the gold field):",
            "",
            "| decoder layer | "
            + " | ".join(f"head {h}" for h in range(heads))
            + " | mean of heads |",
            "|---|" + "---|" * (heads + 1),
        ]
        for layer, (row, hits) in enumerate(zip(self.aer, self.hit_rate, strict=True)):
            cells = [f"{a:.3f} ({h:.2f})" for a, h in zip(row, hits, strict=True)]
            lines.append(
                f"| {layer} | " + " | ".join(cells) + f" | {self.layer_mean_aer[layer]:.3f} |"
            )
        layer, head, aer = self.best
        lines += ["", f"Best head: layer {layer}, head {head}, AER {aer:.3f}."]
        return "\n".join(lines) + "\n"


def load_translator(folder: str | os.PathLike[str]) -> tuple[nn.Module, Any, dict[str, Any]]:
    """A translation model folder's model (on the CPU), its ``PairTokenizer`` and its config,
    loaded through the translation task's spec.

    Raises:
        ModelFolderError: not a model folder, or not a translation model.
    """
    from qkv.tasks.base import get_task
    from qkv.train import read_config

    translator = get_task("translation").load(Path(folder), device="cpu")
    return translator.model.eval(), translator.tokenizer, read_config(folder)


def _cross_attention(model: nn.Module, tokenizer: Any, gold: GoldAlignment) -> Tensor:
    """``(L, H, Nt, Ns)`` cross-attention with the gold target teacher-forced."""
    source = torch.tensor([tokenizer.source.encode(gold.source, add_eos=True)])
    target = tokenizer.target.encode(gold.target, add_bos=True, add_eos=True)
    target_in = torch.tensor([target[:-1]])  # row t produces target token t
    cross_attention: Any = model.cross_attention  # a Seq2SeqModel method
    weights: Tensor = cross_attention(source, target_in, layer=None, per_head=True)
    return weights.float()


def alignment_report(
    model: nn.Module, tokenizer: Any, spec: str, *, examples: int = 300, seed: int = 1
) -> AlignmentReport:
    """Score every cross-attention head of ``model`` (a ``Seq2SeqModel``, e.g. from
    :func:`load_translator`, with its ``PairTokenizer``) against ``examples`` generated
    gold-aligned pairs of ``spec``."""
    golds = gold_alignments(spec, tokenizer.source, tokenizer.target, examples=examples, seed=seed)
    per_head: Tensor | None = None
    per_layer: Tensor | None = None
    for gold in golds:
        weights = _cross_attention(model, tokenizer, gold)  # (L, H, Nt, Ns)
        heads = alignment_counts(weights, gold)
        layers = alignment_counts(weights.mean(dim=1), gold)
        per_head = heads if per_head is None else per_head + heads
        per_layer = layers if per_layer is None else per_layer + layers
    assert per_head is not None and per_layer is not None
    aer = alignment_error_rate(per_head)  # (L, H)
    hit = per_head[..., 3] / per_head[..., 0].clamp_min(1)
    best = int(aer.argmin())
    layer, head = divmod(best, aer.shape[1])
    return AlignmentReport(
        spec=spec,
        examples=len(golds),
        aer=aer.tolist(),
        hit_rate=hit.tolist(),
        layer_mean_aer=alignment_error_rate(per_layer).tolist(),
        best=(layer, head, float(aer[layer, head])),
    )
