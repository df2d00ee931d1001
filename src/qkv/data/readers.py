"""The one place that reads user files: lines, CSV/TSV records, JSONL objects, split files.

Parallel text (:mod:`qkv.data.parallel`) and labeled text (:mod:`qkv.data.labeled`) both read
through here, so every file gets the same checks and the same errors: a :class:`DataError`
whose message starts ``FILE:LINE:`` (like a compiler's, so an editor can jump to it)::

    reviews.csv:12: 4 fields, but the header names 3 (review, stars, date); quote a field
        that holds a comma
    big.tsv:1: the line is 10,485,760 characters long; the limit is 1,000,000 ...
    data.tsv.gz: named .gz but not gzip-compressed (rename it without .gz, or compress it)

Files are UTF-8 (a leading BOM is dropped), optionally gzipped (``.gz``). A line longer than
:data:`MAX_LINE_CHARS` is refused with its number: nothing a model trains on is that long, and
tokenizing and decoding one would take gigabytes.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar

from qkv.data._util import stable_hash
from qkv.data.registry import Splits

__all__ = [
    "MAX_LINE_CHARS",
    "SPLIT_STEMS",
    "SUFFIX_FORMATS",
    "DataError",
    "carve_splits",
    "delimited_records",
    "format_from_suffix",
    "iter_lines",
    "json_records",
    "split_file",
    "table_rows",
]

T = TypeVar("T")
PathLike = str | os.PathLike[str]

#: The longest line (in characters) a reader accepts.
MAX_LINE_CHARS = 1_000_000

#: Data-file extensions and the format each means (``.gz`` of any of them too).
SUFFIX_FORMATS: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}

#: File stems of the splits in a data folder, in order of preference.
SPLIT_STEMS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("validation", "valid", "dev"),
    "test": ("test",),
}

_GZIP_MAGIC = b"\x1f\x8b"


class DataError(ValueError):
    """Malformed data: the message names the file, the 1-based line (when there is one) and
    what is wrong.

    Attributes:
        path: the file.
        line: 1-based line number, or ``None`` for a problem with the file as a whole.
        reason: what is wrong, without the location.
    """

    def __init__(self, path: PathLike, line: int | None, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


# --------------------------------------------------------------------------------------------
# Lines


def _open_binary(path: Path) -> BinaryIO:
    if path.suffix != ".gz":
        return path.open("rb")
    with path.open("rb") as f:
        magic = f.read(2)
    if magic != _GZIP_MAGIC:
        raise DataError(
            path, None, "named .gz but not gzip-compressed (rename it without .gz, or compress it)"
        )
    return gzip.open(path, "rb")  # type: ignore[return-value]


def _raw_lines(path: Path) -> Iterator[bytes]:
    """The file's lines as bytes; a corrupt or truncated gzip stream is a :class:`DataError`."""
    with _open_binary(path) as f:
        try:
            yield from f
        except (gzip.BadGzipFile, EOFError, zlib.error) as error:
            raise DataError(path, None, f"corrupt gzip data ({error})") from None


def iter_lines(path: PathLike, *, max_chars: int = MAX_LINE_CHARS) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` without the line ending, decoding each line on its own.

    Reading bytes and splitting on ``\\n`` only (not ``str.splitlines``, which also splits on
    U+2028 and friends) keeps line numbers equal to what an editor shows, and a decoding error
    can name its line.

    Raises:
        DataError: no such file, invalid UTF-8, a line over ``max_chars``, bad gzip data.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "no such file")
    for number, raw in enumerate(_raw_lines(path), start=1):
        if raw.endswith(b"\n"):
            raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        if len(raw) > max_chars:  # a UTF-8 character is at least one byte: check cheaply first
            text_length = len(raw.decode("utf-8", errors="replace"))
            if text_length > max_chars:
                raise DataError(
                    path,
                    number,
                    f"the line is {text_length:,} characters long; the limit is {max_chars:,} "
                    "(nothing a model reads is that long: split or cut the text)",
                )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                path, number, f"not valid UTF-8 (byte {e.start + 1} of the line)"
            ) from None
        if number == 1:
            text = text.removeprefix("\ufeff")  # BOM written by some editors
        yield number, text


# --------------------------------------------------------------------------------------------
# Records


def json_records(
    path: PathLike, fields: Sequence[tuple[str, str]]
) -> Iterator[tuple[int, list[object]]]:
    """``(line_number, values)`` of every non-blank JSONL line, ``values`` being the line's
    object's ``fields`` (each a ``(key, role)`` pair; the role names it in errors).

    Raises:
        DataError: invalid JSON, a line that is not an object, a missing field.
    """
    path = Path(path)
    for number, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, number, f"invalid JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(record, dict):
            raise DataError(path, number, f"expected a JSON object, got {type(record).__name__}")
        for field, role in fields:
            if field not in record:
                present = ", ".join(map(repr, record)) or "none"
                raise DataError(
                    path, number, f"missing field {field!r} ({role}); fields present: {present}"
                )
        yield number, [record[field] for field, _ in fields]


def delimited_records(path: PathLike, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """``(first_line, fields)`` per CSV (``","``, with quoting) or TSV (``"\\t"``, no
    quoting: a quote character is text) record; blank records skipped.

    Raises:
        DataError: malformed quoting (and what :func:`iter_lines` raises).
    """
    path = Path(path)
    csv.field_size_limit(sys.maxsize)  # the line limit above is the one that applies
    lines = (text + "\n" for _, text in iter_lines(path))
    if delimiter == ",":
        reader = csv.reader(lines, delimiter=",", quoting=csv.QUOTE_MINIMAL, strict=True)
    else:
        reader = csv.reader(lines, delimiter=delimiter, quoting=csv.QUOTE_NONE, strict=True)
    kind = "CSV" if delimiter == "," else "TSV"
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(path, start, f"malformed {kind}: {e}") from None
        if any(cell.strip() for cell in row):
            yield start, row
        start = reader.line_num + 1


def table_rows(
    path: PathLike,
    delimiter: str,
    columns: Sequence[tuple[str | int, str]],
    *,
    header: bool = True,
) -> Iterator[tuple[int, list[str]]]:
    """``(line, values)`` of the ``columns`` of every CSV/TSV record after the header.

    Args:
        path: the file.
        delimiter: ``","`` (CSV) or ``"\\t"`` (TSV).
        columns: ``(column, role)`` pairs: a header name (or, without a header, a 0-based
            number or its digits) and what it is, for the errors.
        header: the first record names the columns; a record with more fields than the header
            is then an error (an unquoted comma would otherwise shift the columns silently).

    Raises:
        DataError: an empty file, an unknown column, a record with too few or (with a header)
            too many fields; the message names file and line.
    """
    path = Path(path)
    records = delimited_records(path, delimiter)
    names: list[str] | None = None
    if header:
        first = next(records, None)
        if first is None:
            raise DataError(path, None, "no examples found (the file is empty or blank)")
        names = [name.strip() for name in first[1]]
    index = [_column_index(path, names, column, role) for column, role in columns]
    needed = max(index) + 1
    for line, row in records:
        if names is not None and len(row) > len(names):
            hint = "quote a field that holds a comma" if delimiter == "," else "a tab in a field?"
            raise DataError(
                path,
                line,
                f"{len(row)} fields, but the header names {len(names)} "
                f"({', '.join(names)}); {hint}",
            )
        if len(row) < needed:
            raise DataError(path, line, f"expected at least {needed} columns, found {len(row)}")
        yield line, [row[i] for i in index]


def _column_index(path: Path, header: list[str] | None, column: str | int, role: str) -> int:
    if isinstance(column, int):
        return column
    if column.isdigit() and header is None:
        return int(column)
    if header is None:
        raise DataError(path, None, f"{role} column {column!r} given by name, but header=False")
    if column not in header:
        raise DataError(
            path, 1, f"no {role} column {column!r}; the header has {', '.join(map(repr, header))}"
        )
    return header.index(column)


# --------------------------------------------------------------------------------------------
# Formats, split files, carving


def format_from_suffix(path: Path, formats: Mapping[str, T]) -> T:
    """The format of ``path`` from its extension (``.gz`` looked through).

    Raises:
        DataError: an unknown extension, naming the known ones.
    """
    suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    try:
        return formats[suffix.lower()]
    except KeyError:
        known = ", ".join(formats)
        raise DataError(
            path,
            None,
            f"cannot tell the format from the extension (known: {known}); rename the file, or "
            "pass format=... when calling the reader from Python",
        ) from None


def split_file(directory: Path, split: str, suffixes: Sequence[str]) -> Path | None:
    """The file of ``split`` in a data folder (``train.tsv``, ``dev.jsonl.gz``...), if any."""
    for stem in SPLIT_STEMS[split]:
        for suffix in (*suffixes, *(s + ".gz" for s in suffixes)):
            candidate = directory / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def carve_splits(
    examples: Sequence[T],
    key: Callable[[T], str],
    *,
    validation: float,
    test: float,
    seed: int,
    salt: str,
) -> Splits[T]:
    """Carve seeded validation and test splits out of ``examples``, disjoint by ``key``.

    Distinct keys are ranked by a seeded hash (machine-independent); the first
    ``round(test * n)`` go to test, the next ``round(validation * n)`` to validation. Every
    example with a key lands in that key's split, so repeats never straddle splits; file order
    is kept within a split. The rule depends only on the keys, the seed and ``salt``.

    Raises:
        ValueError: a fraction outside ``[0, 1)`` or fractions summing to 1 or more.
    """
    for name, fraction in (("validation", validation), ("test", test)):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"{name} fraction must be in [0, 1), got {fraction}")
    if validation + test >= 1.0:
        raise ValueError(f"validation ({validation}) + test ({test}) must be below 1")
    keys = sorted({key(e) for e in examples}, key=lambda s: (stable_hash(seed, salt, s), s))
    n_test, n_validation = round(test * len(keys)), round(validation * len(keys))
    split_of = dict.fromkeys(keys[:n_test], "test")
    split_of.update(dict.fromkeys(keys[n_test : n_test + n_validation], "validation"))
    out: dict[str, list[T]] = {"train": [], "validation": [], "test": []}
    for example in examples:
        out[split_of.get(key(example), "train")].append(example)
    return Splits(out["train"], out["validation"], out["test"])
