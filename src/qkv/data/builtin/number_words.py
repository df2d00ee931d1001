"""Built-in ``numbers``: number words -> digits, with a controllable length distribution.

``one thousand, nine hundred and ninety-eight`` -> ``1998``, written by num2words (English by
default, any of its languages with ``lang``; ``target_lang`` turns it into words -> words, e.g.
English -> French). Sources grow with the number of digits, from ``zero`` to over a hundred
characters at 12 digits, which is what the length-vs-accuracy experiment needs.

Length distribution: the number of examples with ``d`` digits, ``d`` in
``[min_digits, max_digits]``, follows ``digit_weights`` (uniform by default, so long numbers are as
common as short ones, unlike a uniform draw over values); values are uniform among the ``d``-digit
numbers. Short lengths hold few numbers (ten of one digit): each split gets a share of every
length in proportion to its size, and what a length cannot supply goes to the other lengths by
their weights, so the split sizes asked for are met whenever the digit range holds enough numbers.

Splits are disjoint by value. Within one digit length, test values are drawn first from their own
seeded stream, then validation, then train, each avoiding the values before, so the test split is
independent of ``n_train`` (except at lengths too short to serve every split in full, which are
shuffled whole and sliced).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qkv.data._util import require_module, seeded_rng
from qkv.data.parallel import Pair
from qkv.data.registry import Splits

__all__ = ["AlignedNumber", "aligned_numbers", "digit_counts", "load_numbers"]

logger = logging.getLogger(__name__)

INSTALL = "pip install 'num2words>=0.5.13'  (or: pip install -e '.[data]')"
_SPLITS = ("test", "validation", "train")  # drawing order: held-out data first


def digit_counts(n: int, weights: Sequence[float]) -> list[int]:
    """Split ``n`` into integers proportional to ``weights`` (largest remainder; sums to ``n``).

    Raises:
        ValueError: a negative weight or all weights zero.
    """
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ValueError(f"weights must be >= 0 and not all 0, got {list(weights)}")
    total = float(sum(weights))
    exact = [n * w / total for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _fill(n: int, weights: Sequence[float], capacity: Sequence[int]) -> list[int]:
    """``n`` spread over lengths by ``weights``, none above its ``capacity``: what a full length
    cannot take goes to the others, still in proportion to their weights."""
    counts = [0] * len(weights)
    open_ = [i for i, w in enumerate(weights) if w > 0 and capacity[i] > 0]
    left = n
    while left > 0 and open_:
        share = digit_counts(left, [weights[i] for i in open_])
        for i, k in zip(open_, share, strict=True):
            take = min(k, capacity[i] - counts[i])
            counts[i] += take
            left -= take
        open_ = [i for i in open_ if counts[i] < capacity[i]]
    return counts


def _bucket(digits: int) -> range:
    return range(0 if digits == 1 else 10 ** (digits - 1), 10**digits)


def _draw_bucket(
    values: range, counts: dict[str, int], seed: int, digits: int
) -> dict[str, list[int]]:
    """Distinct values of one digit length for each split, disjoint across splits."""
    out: dict[str, list[int]] = {}
    if 2 * sum(counts.values()) > len(values):
        # Small space: rejection sampling would crawl; shuffle it whole and slice it.
        pool = list(values)
        seeded_rng(seed, "numbers", digits, "pool").shuffle(pool)
        start = 0
        for split in _SPLITS:
            out[split] = pool[start : start + counts[split]]
            start += counts[split]
        return out
    taken: set[int] = set()
    for split in _SPLITS:
        rng = seeded_rng(seed, "numbers", digits, split)
        chosen: list[int] = []
        while len(chosen) < counts[split]:
            value = values[rng.randrange(len(values))]
            if value not in taken:
                taken.add(value)
                chosen.append(value)
        out[split] = chosen
    return out


def _writer(lang: str) -> Callable[[int], str]:
    from num2words import num2words

    try:
        num2words(1, lang=lang)
    except NotImplementedError:
        raise ValueError(f"num2words has no language {lang!r}") from None
    return lambda value: str(num2words(value, lang=lang))


def load_numbers(
    *,
    n_train: int = 20_000,
    n_validation: int = 1_000,
    n_test: int = 2_000,
    seed: int = 0,
    lang: str = "en",
    target_lang: str | None = None,
    min_digits: int = 1,
    max_digits: int = 9,
    digit_weights: Sequence[float] | None = None,
) -> Splits[Pair]:
    """Seeded number-words -> digits pairs.

    Args:
        n_train, n_validation, n_test: split sizes (a length may hold fewer distinct numbers
            than asked: then every split gets proportionally fewer of that length).
        seed: seed of every stream.
        lang: num2words language of the source, e.g. ``"en"``, ``"fr"``, ``"de"``.
        target_lang: write the target as words in this language instead of digits.
        min_digits, max_digits: inclusive range of the number of digits.
        digit_weights: relative frequency of each digit length from ``min_digits`` to
            ``max_digits``; uniform when ``None``.

    Returns:
        Splits of :class:`~qkv.data.Pair` ``(words, digits)``, shuffled, disjoint by value.

    Raises:
        MissingPackageError: num2words is not installed.
        ValueError: bad sizes, digit range, weights or language.
    """
    require_module("num2words", INSTALL, needed_for="the builtin 'numbers' data set")
    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    for name, n in sizes.items():
        if n < 0:
            raise ValueError(f"n_{name} must be >= 0, got {n}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits ({min_digits}) <= max_digits ({max_digits})")
    n_lengths = max_digits - min_digits + 1
    weights = [1.0] * n_lengths if digit_weights is None else list(digit_weights)
    if len(weights) != n_lengths:
        raise ValueError(
            f"digit_weights has {len(weights)} entries, need {n_lengths} "
            f"(one per length {min_digits}..{max_digits})"
        )
    source_words = _writer(lang)
    target_text = _writer(target_lang) if target_lang is not None else str
    lengths = range(min_digits, max_digits + 1)
    # Each split may use a share of every length's numbers in proportion to its size, so short
    # lengths (10 one-digit numbers) are shared out instead of going to whichever split is drawn
    # first; within its shares, each split follows the weights as closely as capacity allows.
    shares = {split: [0] * n_lengths for split in _SPLITS}
    if sum(sizes.values()) > 0:
        for i, digits in enumerate(lengths):
            capacity = digit_counts(len(_bucket(digits)), [sizes[s] for s in _SPLITS])
            for split, share in zip(_SPLITS, capacity, strict=True):
                shares[split][i] = share
    per_split = {split: _fill(sizes[split], weights, shares[split]) for split in _SPLITS}
    values: dict[str, list[int]] = {split: [] for split in _SPLITS}
    for i, digits in enumerate(lengths):
        counts = {split: per_split[split][i] for split in _SPLITS}
        for split, chosen in _draw_bucket(_bucket(digits), counts, seed, digits).items():
            values[split].extend(chosen)
    out: dict[str, list[Pair]] = {}
    for split, chosen in values.items():
        if len(chosen) < sizes[split]:
            logger.warning(
                "numbers: %s has %d pairs, not %d: %d..%d digits hold too few numbers",
                split,
                len(chosen),
                sizes[split],
                min_digits,
                max_digits,
            )
        seeded_rng(seed, "numbers", "order", split).shuffle(chosen)
        out[split] = [Pair(source_words(v), target_text(v)) for v in chosen]
    return Splits(out["train"], out["validation"], out["test"])


# --------------------------------------------------------------------------------------------
# Gold alignments (English): which source word writes each target digit.

_SCALES = ("", "thousand", "million", "billion", "trillion")


@dataclass(frozen=True)
class AlignedNumber:
    """A number pair with, for each target digit, the source word that writes it.

    Attributes:
        source: the English words, as :func:`load_numbers` writes them.
        target: the digits.
        digits: one entry per target character: the ``(start, end)`` characters of the word
            that writes it (``"nine"`` for the 9 of 900, ``"ninety"`` for the 9 of 90, the teen
            word for both digits of 10-19), or ``None`` for a zero no word writes.
    """

    source: str
    target: str
    digits: list[tuple[int, int] | None]


def _group_words(
    words: str, value: int, at: int, say: Callable[[int], str]
) -> dict[int, tuple[int, int]]:
    """Spans of the words for the hundreds (2), tens (1) and units (0) digits of a 3-digit
    group ``value`` whose text starts at ``words[at]``."""
    out: dict[int, tuple[int, int]] = {}

    def find(word: str, start: int) -> tuple[int, int]:
        index = words.find(word, start)
        if index < 0:
            raise ValueError(f"{word!r} not found in {words!r} after {start}")
        return index, index + len(word)

    cursor = at
    hundreds, rest = divmod(value, 100)
    if hundreds:
        out[2] = find(say(hundreds), cursor)
        cursor = find("hundred", out[2][1])[1]
    if 10 <= rest < 20:
        out[1] = out[0] = find(say(rest), cursor)
    elif rest:
        tens, units = divmod(rest, 10)
        if tens:
            out[1] = find(say(10 * tens), cursor)
            cursor = out[1][1]
        if units:
            out[0] = find(say(units), cursor)
    return out


def aligned_numbers(
    n: int, *, seed: int = 1, min_digits: int = 1, max_digits: int = 9
) -> list[AlignedNumber]:
    """``n`` seeded English number pairs with gold digit-to-word spans.

    Lengths are uniform over ``min_digits .. max_digits`` as in :func:`load_numbers` (values
    uniform within a length), from a stream of their own, so they may repeat training values.

    Raises:
        MissingPackageError: num2words is not installed.
        ValueError: bad ``n`` or digit range (at most 15 digits).
    """
    require_module("num2words", INSTALL, needed_for="the builtin 'numbers' data set")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_digits <= max_digits <= 15:
        raise ValueError(f"need 1 <= min_digits ({min_digits}) <= max_digits ({max_digits}) <= 15")
    say = _writer("en")
    rng = seeded_rng(seed, "numbers", "aligned")
    out: list[AlignedNumber] = []
    while len(out) < n:
        bucket = _bucket(rng.randint(min_digits, max_digits))
        value = bucket[rng.randrange(len(bucket))]
        words, target = say(value), str(value)
        spans: list[tuple[int, int] | None] = [None] * len(target)
        cursor = 0
        groups = [(value // 1000**g) % 1000 for g in range(len(_SCALES))]
        for g in reversed(range(len(_SCALES))):
            if not groups[g]:
                continue
            found = _group_words(words, groups[g], cursor, say)
            for place, span in found.items():
                position = len(target) - 1 - (3 * g + place)
                spans[position] = span
            cursor = max(span[1] for span in found.values())
            if g:
                cursor = words.index(_SCALES[g], cursor) + len(_SCALES[g])
        if value == 0:
            spans[0] = (0, len(words))  # "zero"
        out.append(AlignedNumber(words, target, spans))
    return out
