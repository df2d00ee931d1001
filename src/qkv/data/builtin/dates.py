"""Built-in ``dates``: date strings in many locales and formats -> ISO dates.

``mardi 3 mars 1998`` -> ``1998-03-03``, ``3. března 1998`` -> ``1998-03-03``. Strings come from
babel's ``format_date`` (CLDR data) with dates drawn by Python's seeded ``random`` (faker adds
nothing here that a seeded uniform draw over a date range does not). Gold alignments are known by
construction, which makes this the classic attention demo.

Ambiguity, and why some formats are left out:

- **numeric months** (``3/4/98``, ``03.04.1998``) mean different dates in different locales
  (en_US reads March 4, es_ES 3 April), so no model can reach exact match on a mixture. They are
  left out, unless ``tag_locale=True`` prefixes every source with its locale (``[de_DE] 03.04.1998``),
  which makes the order knowable;
- **two-digit years** (``yy``) cannot tell 1998 from 2098 over a two-century range, so they are
  always left out;
- **identical strings across locales** with different meanings (a month name shared by two
  languages for different months) cannot happen in the default locales:
  :func:`ambiguous_sources` checks a locale/format set exhaustively, and the test suite runs it on
  the defaults. For other sets, a generated source already seen with another target is dropped
  (and counted in the log).

Splits are disjoint by source string and drawn from separate seeded streams in the order test,
validation, train, each avoiding the sources of the ones before. The test split therefore depends
only on ``seed``, ``n_test`` and the locale/format/date-range options, not on ``n_train``.
Reproducible across machines for the same Python and babel versions (CLDR data changes between
babel releases: pin babel to compare numbers).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

from qkv.data._util import require_module, seeded_rng
from qkv.data.parallel import Pair
from qkv.data.registry import Splits

__all__ = [
    "DEFAULT_FORMATS",
    "DEFAULT_LOCALES",
    "AlignedDate",
    "DateFormat",
    "aligned_dates",
    "ambiguous_sources",
    "date_formats",
    "load_dates",
]

logger = logging.getLogger(__name__)

INSTALL = "pip install 'babel>=2.14'  (or: pip install -e '.[data]')"

#: Locales with spelled-out month names in Latin, Cyrillic and Greek script: varied word orders
#: (day-month-year, month-day-year, year-month-day), genitive month forms, abbreviations.
#: Verified free of cross-locale collisions by :func:`ambiguous_sources`.
DEFAULT_LOCALES: tuple[str, ...] = (
    "en_US",
    "en_GB",
    "fr_FR",
    "de_DE",
    "es_ES",
    "it_IT",
    "pt_BR",
    "nl_NL",
    "sv_SE",
    "da_DK",
    "fi_FI",
    "pl_PL",
    "cs_CZ",
    "hu_HU",
    "tr_TR",
    "id_ID",
    "ro_RO",
    "ru_RU",
    "el_GR",
    "lt_LT",
)

#: babel's named formats of each locale, plus a few patterns rendered with each locale's names.
DEFAULT_FORMATS: tuple[str, ...] = (
    "full",
    "long",
    "medium",
    "short",
    "d MMMM y",
    "MMMM d, y",
    "d MMM y",
    "EEE, MMM d, y",
)

_NamedFormat = Literal["full", "long", "medium", "short"]
_NAMED_FORMATS = ("full", "long", "medium", "short")
_FIELD = re.compile(r"%\((\w+)\)s")


@dataclass(frozen=True)
class DateFormat:
    """One way of writing a date: a locale and a resolved CLDR pattern.

    Attributes:
        locale: e.g. ``"fr_FR"``.
        pattern: the CLDR pattern, e.g. ``"EEEE d MMMM y"``.
        numeric_month: the month is written as a number (ambiguous across locales).
    """

    locale: str
    pattern: str
    numeric_month: bool


def _fields(pattern: str) -> list[str]:
    from babel.dates import parse_pattern

    # babel turns "d 'de' MMMM" into "%(d)s de %(MMMM)s": quoted literals drop out.
    return _FIELD.findall(cast(str, parse_pattern(pattern).format))


def _classify(pattern: str) -> tuple[bool, str | None]:
    """``(numeric_month, reason_to_reject)`` for a CLDR date pattern."""
    fields = _fields(pattern)
    days = [f for f in fields if f[0] == "d"]
    months = [f for f in fields if f[0] in "ML"]
    years = [f for f in fields if f[0] in "yYur"]
    if not days or not months or not years:
        return False, "needs a day, a month and a year"
    if any(f[0] != "y" for f in years):
        # 'Y' is the week-based year: wrong for the last days of December.
        return False, "uses a year field other than 'y'"
    if any(len(f) == 2 for f in years):
        return False, "two-digit year"
    return all(len(f) <= 2 for f in months), None


def date_formats(
    locales: Iterable[str], formats: Iterable[str], *, allow_numeric: bool = False
) -> list[DateFormat]:
    """Resolve and filter the (locale, format) combinations used to write dates.

    Args:
        locales: CLDR locale identifiers, e.g. ``"fr_FR"``.
        formats: babel named formats (``full``, ``long``, ``medium``, ``short``) or CLDR
            patterns (``"d MMMM y"``).
        allow_numeric: keep patterns with a numeric month (only safe with locale tags).

    Returns:
        Distinct combinations, in input order, without two-digit years or week-based years.

    Raises:
        MissingPackageError: babel is not installed.
        ValueError: an unknown locale, or nothing left after filtering.
    """
    require_module("babel", INSTALL, needed_for="the builtin 'dates' data set")
    from babel import Locale, UnknownLocaleError
    from babel.dates import get_date_format

    out: list[DateFormat] = []
    seen: set[tuple[str, str]] = set()
    formats = list(formats)
    for name in locales:
        try:
            locale = Locale.parse(name)
        except (UnknownLocaleError, ValueError) as e:
            raise ValueError(f"unknown locale {name!r}: {e}") from None
        for fmt in formats:
            if fmt in _NAMED_FORMATS:
                pattern = get_date_format(cast(_NamedFormat, fmt), locale).pattern
            else:
                pattern = fmt
            if (name, pattern) in seen:
                continue
            seen.add((name, pattern))
            numeric, reject = _classify(pattern)
            if reject is not None or (numeric and not allow_numeric):
                logger.debug("dates: skip %s %r: %s", name, pattern, reject or "numeric month")
                continue
            out.append(DateFormat(name, pattern, numeric))
    if not out:
        raise ValueError("no usable date format left for these locales and formats")
    return out


class _Writer:
    """Formats dates with pre-parsed babel locales (parsing per call would dominate)."""

    def __init__(self, formats: Sequence[DateFormat], tag_locale: bool) -> None:
        from babel import Locale
        from babel.dates import format_date

        self._format_date = format_date
        self.formats = list(formats)
        self.tag_locale = tag_locale
        self._locales = {f.locale: Locale.parse(f.locale) for f in self.formats}

    def __call__(self, date: dt.date, fmt: DateFormat) -> Pair:
        text = self._format_date(date, fmt.pattern, locale=self._locales[fmt.locale])
        # CLDR uses no-break and narrow no-break spaces; one plain space keeps the alphabet small.
        text = " ".join(text.split())
        if self.tag_locale:
            text = f"[{fmt.locale}] {text}"
        return Pair(text, date.isoformat())


def ambiguous_sources(
    locales: Iterable[str] = DEFAULT_LOCALES,
    formats: Iterable[str] = DEFAULT_FORMATS,
    *,
    years: Iterable[int] = (2000, 2001),
    tag_locale: bool = False,
    allow_numeric: bool | None = None,
) -> dict[str, set[str]]:
    """Every source string that two different dates produce, over whole years.

    Written forms repeat with the year (weekday names aside, which only add information), so one
    leap year covers every month/day combination; a second year adds other weekday alignments.

    Args:
        locales, formats: as in :func:`date_formats`.
        years: the years written out in full.
        tag_locale: prefix sources with their locale, as :func:`load_dates` does.
        allow_numeric: keep numeric-month formats (default: ``tag_locale``, as the loader).

    Returns:
        ``{source: {iso_date, ...}}`` for each ambiguous source; empty when the set is safe.
    """
    numeric = tag_locale if allow_numeric is None else allow_numeric
    writer = _Writer(date_formats(locales, formats, allow_numeric=numeric), tag_locale)
    meaning: dict[str, set[str]] = {}
    for year in years:
        day, end = dt.date(year, 1, 1), dt.date(year, 12, 31)
        while day <= end:
            for fmt in writer.formats:
                pair = writer(day, fmt)
                meaning.setdefault(pair.source, set()).add(pair.target)
            day += dt.timedelta(days=1)
    return {source: dates for source, dates in meaning.items() if len(dates) > 1}


def load_dates(
    *,
    n_train: int = 50_000,
    n_validation: int = 1_000,
    n_test: int = 2_000,
    seed: int = 0,
    locales: Sequence[str] = DEFAULT_LOCALES,
    formats: Sequence[str] = DEFAULT_FORMATS,
    start: dt.date = dt.date(1900, 1, 1),
    end: dt.date = dt.date(2099, 12, 31),
    tag_locale: bool = False,
) -> Splits[Pair]:
    """Seeded date-string -> ISO-date pairs.

    Args:
        n_train, n_validation, n_test: split sizes (the held-out test split is 2,000 pairs).
        seed: seed of all three streams.
        locales: CLDR locales (see :data:`DEFAULT_LOCALES`).
        formats: named formats and patterns (see :data:`DEFAULT_FORMATS`).
        start, end: inclusive range the dates are drawn from, uniformly.
        tag_locale: prefix each source with ``[locale]`` and keep numeric-month formats.

    Returns:
        Splits of :class:`~qkv.data.Pair` ``(date string, "YYYY-MM-DD")``, disjoint by source.

    Raises:
        MissingPackageError: babel is not installed.
        ValueError: bad sizes or range, or too few distinct strings for the sizes asked.
    """
    for name, n in (("n_train", n_train), ("n_validation", n_validation), ("n_test", n_test)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    if end < start:
        raise ValueError(f"end ({end}) is before start ({start})")
    writer = _Writer(date_formats(locales, formats, allow_numeric=tag_locale), tag_locale)
    n_days = (end - start).days + 1
    taken: dict[str, str] = {}
    collisions = 0

    def draw(split: str, n: int) -> list[Pair]:
        nonlocal collisions
        rng = seeded_rng(seed, "dates", split)
        out: list[Pair] = []
        budget = 20 * n + 1_000  # rejections are rare unless the space is nearly exhausted
        while len(out) < n:
            budget -= 1
            if budget < 0:
                raise ValueError(
                    f"dates: could not draw {n} distinct {split} pairs from {n_days} days x "
                    f"{len(writer.formats)} formats; ask for fewer or widen the range"
                )
            day = start + dt.timedelta(days=rng.randrange(n_days))
            pair = writer(day, writer.formats[rng.randrange(len(writer.formats))])
            seen = taken.get(pair.source)
            if seen is not None:
                collisions += seen != pair.target
                continue
            taken[pair.source] = pair.target
            out.append(pair)
        return out

    test = draw("test", n_test)
    validation = draw("validation", n_validation)
    train = draw("train", n_train)
    if collisions:
        logger.warning("dates: dropped %d sources that also name another date", collisions)
    return Splits(train, validation, test)


# --------------------------------------------------------------------------------------------
# Gold alignments: which source characters write the year, the month and the day.


@dataclass(frozen=True)
class AlignedDate:
    """A date pair with the source spans of its fields, known by construction.

    Attributes:
        source: the date string, exactly as :func:`load_dates` writes it (untagged).
        target: the ISO date ``YYYY-MM-DD``.
        fields: ``{"year" | "month" | "day": (start, end)}``, the characters
            ``source[start:end]`` that write each field (the month's name or number, the day's
            digits, the year's digits). Weekday names are in no field.
    """

    source: str
    target: str
    fields: dict[str, tuple[int, int]]


_FIELD_OF = {"y": "year", "M": "month", "L": "month", "d": "day"}


def _spans(
    date: dt.date, fmt: DateFormat, locale: object
) -> tuple[str, dict[str, tuple[int, int]]]:
    """The raw babel text of ``date`` in ``fmt`` and the span of each field in it."""
    from babel.dates import DateTimeFormat, parse_pattern

    template = cast(str, parse_pattern(fmt.pattern).format)
    values = DateTimeFormat(date, locale)  # type: ignore[arg-type]
    text, at = "", 0
    spans: dict[str, tuple[int, int]] = {}
    for match in _FIELD.finditer(template):
        text += template[at : match.start()].replace("%%", "%")
        value = str(values[match.group(1)])
        field = _FIELD_OF.get(match.group(1)[0])
        if field is not None:
            spans[field] = (len(text), len(text) + len(value))
        text += value
        at = match.end()
    return text + template[at:].replace("%%", "%"), spans


def _normalized_spans(
    text: str, spans: dict[str, tuple[int, int]]
) -> tuple[str, dict[str, tuple[int, int]]]:
    """``" ".join(text.split())`` (as the writer does) with the spans moved along."""
    where: list[int] = []
    out: list[str] = []
    gap = False
    for ch in text:
        if ch.isspace():
            gap = bool(out)
            where.append(len(out))
            continue
        if gap:
            out.append(" ")
            gap = False
        where.append(len(out))
        out.append(ch)
    where.append(len(out))
    moved = {
        f: (where[a], where[a] + len("".join(text[a:b].split()))) for f, (a, b) in spans.items()
    }
    return "".join(out), moved


def aligned_dates(
    n: int,
    *,
    seed: int = 1,
    locales: Sequence[str] = DEFAULT_LOCALES,
    formats: Sequence[str] = DEFAULT_FORMATS,
    start: dt.date = dt.date(1900, 1, 1),
    end: dt.date = dt.date(2099, 12, 31),
) -> list[AlignedDate]:
    """``n`` seeded date pairs with gold field spans, for scoring attention as alignment.

    Drawn like :func:`load_dates` (same writer, locales, formats and range) from a stream of
    their own (``seed``, ``"aligned"``), so they are not the test split and may, rarely, repeat a
    training string. Each source is checked to equal the writer's string.

    Raises:
        MissingPackageError: babel is not installed.
        ValueError: ``n < 0`` or an empty range.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if end < start:
        raise ValueError(f"end ({end}) is before start ({start})")
    writer = _Writer(date_formats(locales, formats), tag_locale=False)
    rng = seeded_rng(seed, "dates", "aligned")
    n_days = (end - start).days + 1
    out: list[AlignedDate] = []
    while len(out) < n:
        day = start + dt.timedelta(days=rng.randrange(n_days))
        fmt = writer.formats[rng.randrange(len(writer.formats))]
        pair = writer(day, fmt)
        text, spans = _normalized_spans(*_spans(day, fmt, writer._locales[fmt.locale]))
        if text != pair.source or set(spans) != {"year", "month", "day"}:
            raise AssertionError(f"dates: field spans do not fit {pair.source!r} ({fmt})")
        out.append(AlignedDate(pair.source, pair.target, spans))
    return out
