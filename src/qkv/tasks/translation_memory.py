"""A translation memory as extra input: neural fuzzy repair (Bulte and Tezcan 2019).

On a small in-domain corpus the target of the most similar training pair (a *fuzzy match*) is
often most of the answer: the retrieval baseline of :mod:`qkv.tasks.translation_baselines`
returns it unchanged. Neural fuzzy repair gives it to the model instead, appended to the source
after a separator token, so that the model learns to repair a close match (and, with copy
attention, to copy words from it) rather than to write every sentence from nothing::

    source text<sep>target of the most similar training pair

- **training**: each training source gets the match of the most similar *other* training pair
  (leave-one-out: a pair never sees its own target, which it would learn to copy whole).
- **translation** (greedy and beam, ``qkv translate`` and ``qkv evaluate``): each source gets
  the match of the most similar training pair.

Similarity is the retrieval baseline's: sentence chrF of the sources, after a character
3-gram shortlist (:func:`~qkv.tasks.translation_baselines.nearest_sources`). A match whose
chrF is below ``threshold`` is left out (the input is the source alone). The memory (the
training pairs and the threshold) is saved in the model folder as ``memory.json``, so a saved
model translates from its folder alone.

The separator is a special token (:data:`SEPARATOR`) added to the source vocabulary. A text
that literally contains ``<sep>`` reads it as that token, as with ``<eos>``.

It pays where test sentences have near twins among the training pairs; among a few hundred
Bible verses, whose nearest verse is rarely close, it scored lower by validation than the model
without it, so the sized defaults leave it off (docs/small-corpus.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkv.data import PairTokenizer
from qkv.tasks.translation_baselines import nearest_sources

__all__ = [
    "MEMORY_FILE",
    "SEPARATOR",
    "FolderParts",
    "TranslationMemory",
    "add_separator",
    "memory_input",
]

#: The token between a source and its match's target.
SEPARATOR = "<sep>"

#: The memory's file in a model folder.
MEMORY_FILE = "memory.json"


@dataclass(frozen=True)
class TranslationMemory:
    """The pairs a model retrieves its fuzzy matches from.

    Args:
        pairs: ``(source, target)`` training pairs (at least one).
        threshold: the lowest sentence chrF (0-100) of an attached match; a weaker one is
            left out.

    Raises:
        ValueError: no pairs, a pair that is not two strings, or ``threshold`` outside
            ``[0, 100]``.
    """

    pairs: tuple[tuple[str, str], ...]
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ValueError("a translation memory needs pairs; got none")
        for i, pair in enumerate(self.pairs):
            if len(pair) != 2 or not all(isinstance(text, str) for text in pair):
                raise ValueError(
                    f"pairs[{i}] must be a (source, target) pair of strings, got {pair!r}"
                )
        if not 0.0 <= self.threshold <= 100.0:
            raise ValueError(f"threshold must be in [0, 100] (a chrF), got {self.threshold}")

    @classmethod
    def from_pairs(cls, pairs: Sequence[Any], *, threshold: float = 0.0) -> TranslationMemory:
        """A memory of ``pairs``: :class:`~qkv.data.Pair` objects or ``(source, target)``."""
        return cls(tuple(_as_tuple(p) for p in pairs), threshold=threshold)

    @property
    def sources(self) -> list[str]:
        return [source for source, _ in self.pairs]

    def matches(
        self, texts: Sequence[str], *, leave_one_out: bool = False
    ) -> list[tuple[str | None, float]]:
        """Per text, the target of the most similar memory pair (``None`` below the
        threshold or when there is none) and its chrF.

        Args:
            texts: sources to find matches for.
            leave_one_out: ``texts[i]`` is the memory's own ``i``-th source, which may not
                match itself (training inputs).

        Raises:
            ValueError: ``leave_one_out`` with a number of texts other than the memory's.
        """
        exclude = None
        if leave_one_out:
            if len(texts) != len(self.pairs):
                raise ValueError(
                    f"leave_one_out needs the memory's own {len(self.pairs)} sources, "
                    f"got {len(texts)} texts"
                )
            exclude = list(range(len(texts)))
        found = nearest_sources(texts, self.sources, exclude=exclude)
        return [
            (self.pairs[i][1] if i >= 0 and score >= self.threshold else None, score)
            for i, score in found
        ]

    def inputs(self, texts: Sequence[str]) -> list[str]:
        """The model inputs of ``texts``: each with its match after :data:`SEPARATOR`."""
        return [
            memory_input(text, match)
            for text, (match, _) in zip(texts, self.matches(texts), strict=True)
        ]

    def training_inputs(self) -> list[str]:
        """The model inputs of the memory's own sources, each matched with another pair."""
        found = self.matches(self.sources, leave_one_out=True)
        return [
            memory_input(text, match) for text, (match, _) in zip(self.sources, found, strict=True)
        ]

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write :data:`MEMORY_FILE` into ``folder``."""
        record = {"threshold": self.threshold, "pairs": [list(p) for p in self.pairs]}
        (Path(folder) / MEMORY_FILE).write_text(
            json.dumps(record, ensure_ascii=False), encoding="utf-8"
        )

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> TranslationMemory:
        """Read what :meth:`save` wrote.

        Raises:
            FileNotFoundError: no :data:`MEMORY_FILE` in ``folder``.
            ValueError: the file is not a memory.
        """
        path = Path(folder) / MEMORY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no translation memory saved here")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_pairs(record["pairs"], threshold=float(record["threshold"]))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a translation memory ({error!r})") from None


def memory_input(source: str, match: str | None) -> str:
    """``source<sep>match``, or ``source`` alone without a match."""
    return source if match is None else f"{source}{SEPARATOR}{match}"


def _as_tuple(pair: Any) -> tuple[str, str]:
    if hasattr(pair, "source") and hasattr(pair, "target"):
        return (pair.source, pair.target)
    source, target = pair
    return (source, target)


def add_separator(tokenizer: PairTokenizer) -> int:
    """Add :data:`SEPARATOR` to the source vocabulary (the shared one: both sides) as a
    special token, unless it is there; returns its id."""
    hf = tokenizer.source.hf
    found = hf.token_to_id(SEPARATOR)
    if found is None:
        hf.add_special_tokens([SEPARATOR])
        found = hf.token_to_id(SEPARATOR)
    if found is None:
        raise RuntimeError(f"the tokenizer did not take the special token {SEPARATOR!r}")
    return int(found)


class FolderParts:
    """Several things that save into one model folder, saved as one (a tokenizer and a
    memory)."""

    def __init__(self, *parts: Any) -> None:
        self.parts = parts

    def save(self, folder: str | os.PathLike[str]) -> None:
        for part in self.parts:
            part.save(folder)
