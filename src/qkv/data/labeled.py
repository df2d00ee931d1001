"""Labeled text for classification and (document, summary) pairs for summarization.

Labeled text comes from the user's files or a built-in set (``builtin:imdb``, ``builtin:rt``):

==============================  ==========================================================
CSV (``.csv``)                  a header row naming the columns, then one example per
                                record (quoted fields may span lines)
TSV (``.tsv``, ``.tab``)        the same with tabs and no quoting
JSONL (``.jsonl``, ``.json``)   one JSON object per line
==============================  ==========================================================

The text and label columns default to ``text`` and ``label``; any names work, and for a CSV/TSV
without a header row they may be 0-based column numbers. A record with more fields than the
header is an error (an unquoted comma would shift the columns). Files are read through
:mod:`qkv.data.readers`, shared with the parallel-text readers. Labels are any strings (a JSON number
or boolean is read as its text). Malformed input raises :class:`~qkv.data.DataError` whose
message starts ``FILE:LINE:``, as the parallel-text readers do::

    reviews.csv:12: empty text (column 'review')

(document, summary) pairs reuse :class:`~qkv.data.Pair` and the parallel-text readers
(:func:`load_documents`): a JSONL file with ``document`` and ``summary`` fields (names
configurable), or a TSV ``document<TAB>summary``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from qkv.data.parallel import Pair, load_pairs
from qkv.data.readers import (
    SPLIT_STEMS,
    SUFFIX_FORMATS,
    DataError,
    carve_splits,
    format_from_suffix,
    json_records,
    split_file,
    table_rows,
)
from qkv.data.registry import Splits, load_builtin

__all__ = [
    "LabelSet",
    "LabeledFormat",
    "LabeledText",
    "load_documents",
    "load_labeled",
    "read_labeled",
    "split_labeled",
]

LabeledFormat = Literal["csv", "tsv", "jsonl"]
PathLike = str | os.PathLike[str]
Column = str | int

_SUFFIX_FORMATS = cast("dict[str, LabeledFormat]", SUFFIX_FORMATS)


@dataclass(frozen=True, slots=True)
class LabeledText:
    """One classification example: a text and its label (any string)."""

    text: str
    label: str


class LabelSet:
    """The ordered label vocabulary of a classifier: label string <-> class index.

    Args:
        labels: distinct label strings, in class-index order.

    Raises:
        ValueError: fewer than two labels, a duplicate, or an empty label.
    """

    def __init__(self, labels: Sequence[str]) -> None:
        labels = [str(label) for label in labels]
        if len(labels) < 2:
            raise ValueError(f"a classifier needs at least 2 labels, got {labels}")
        if len(set(labels)) != len(labels) or not all(labels):
            raise ValueError(f"labels must be distinct non-empty strings, got {labels}")
        self.labels: tuple[str, ...] = tuple(labels)
        self._index = {label: i for i, label in enumerate(self.labels)}

    @classmethod
    def from_examples(cls, examples: Iterable[LabeledText]) -> LabelSet:
        """The labels seen in ``examples``, sorted (so the order is the same on every run)."""
        return cls(sorted({e.label for e in examples}))

    def index(self, label: str) -> int:
        """Class index of ``label``.

        Raises:
            ValueError: ``label`` is not one of the labels; the message lists them.
        """
        try:
            return self._index[label]
        except KeyError:
            known = ", ".join(map(repr, self.labels))
            raise ValueError(f"unknown label {label!r}; this model knows {known}") from None

    def __getitem__(self, index: int) -> str:
        return self.labels[index]

    def __len__(self) -> int:
        return len(self.labels)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSet) and other.labels == self.labels

    def __hash__(self) -> int:
        return hash(self.labels)

    def __repr__(self) -> str:
        return f"LabelSet({list(self.labels)})"


# --------------------------------------------------------------------------------------------
# Readers


def _format_of(path: Path, format: LabeledFormat | None) -> LabeledFormat:
    if format is not None:
        if format not in ("csv", "tsv", "jsonl"):
            raise ValueError(f"format must be 'csv', 'tsv' or 'jsonl', got {format!r}")
        return format
    return format_from_suffix(path, _SUFFIX_FORMATS)


def _field(path: Path, line: int, value: object, what: str) -> str:
    if isinstance(value, bool | int | float):
        value = str(value).lower() if isinstance(value, bool) else str(value)
    if not isinstance(value, str):
        raise DataError(path, line, f"{what} must be a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise DataError(path, line, f"empty {what}")
    return text


def _read_delimited(
    path: Path, delimiter: str, text_column: Column, label_column: Column, header: bool
) -> list[LabeledText]:
    columns = ((text_column, "text"), (label_column, "label"))
    return [
        LabeledText(
            _field(path, line, text, f"text (column {text_column!r})"),
            _field(path, line, label, f"label (column {label_column!r})"),
        )
        for line, (text, label) in table_rows(path, delimiter, columns, header=header)
    ]


def _read_jsonl(path: Path, text_field: str, label_field: str) -> list[LabeledText]:
    fields = ((text_field, "text"), (label_field, "label"))
    return [
        LabeledText(
            *(
                _field(path, line, value, f"{role} (field {field!r})")
                for (field, role), value in zip(fields, values, strict=True)
            )
        )
        for line, values in json_records(path, fields)
    ]


#: The readers' messages for a text or label column (field) that is not there.
_WRONG_COLUMN = ("no text column", "no label column", "missing field")
COLUMN_HINT = (
    " (name the columns with --text-column and --label-column; "
    "text_column= and label_column= in Python)"
)


def read_labeled(
    path: PathLike,
    *,
    format: LabeledFormat | None = None,
    text_column: Column = "text",
    label_column: Column = "label",
    header: bool = True,
) -> list[LabeledText]:
    """Read (text, label) examples from a CSV, TSV or JSONL file (``.gz`` is decompressed).

    Args:
        path: the file.
        format: ``"csv"``, ``"tsv"`` or ``"jsonl"``; by default taken from the extension.
        text_column: name (or, without a header, 0-based number) of the text column / field.
        label_column: the same for the label.
        header: CSV/TSV only: the first record names the columns.

    Returns:
        The examples in file order; blank lines are skipped.

    Raises:
        DataError: a missing file or column, an empty text or label, a short row, invalid JSON
            or UTF-8, malformed quoting, or no examples at all; the message names file and line.
    """
    path = Path(path)
    kind = _format_of(path, format)
    try:
        if kind == "jsonl":
            examples = _read_jsonl(path, str(text_column), str(label_column))
        else:
            delimiter = "," if kind == "csv" else "\t"
            examples = _read_delimited(path, delimiter, text_column, label_column, header)
    except DataError as error:
        if error.reason.startswith(_WRONG_COLUMN):  # say how to name the right one
            raise DataError(error.path, error.line, error.reason + COLUMN_HINT) from None
        raise
    if not examples:
        raise DataError(path, None, "no examples found (the file is empty or blank)")
    return examples


# --------------------------------------------------------------------------------------------
# Splits and specs


def split_labeled(
    examples: Sequence[LabeledText], *, validation: float = 0.1, test: float = 0.1, seed: int = 0
) -> Splits[LabeledText]:
    """Carve seeded validation and test splits, disjoint by text, out of ``examples``.

    Distinct texts are ranked by a seeded hash of the text (machine-independent), so the same
    text always lands in the same split whatever the file order; file order is kept within a
    split.

    Raises:
        ValueError: a fraction outside ``[0, 1)`` or fractions summing to 1 or more.
    """
    return carve_splits(
        examples, lambda e: e.text, validation=validation, test=test, seed=seed, salt="labeled"
    )


def load_labeled(
    spec: PathLike,
    *,
    validation: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    **options: Any,
) -> Splits[LabeledText]:
    """Train/validation/test examples from a data spec.

    Args:
        spec: ``"builtin:NAME"`` (options go to its loader), a file (seeded validation and test
            splits carved out) or a folder with ``train.*`` and optionally ``validation.*`` /
            ``valid.*`` / ``dev.*`` and ``test.*`` (a missing validation file is carved out of
            train, a missing test file leaves test empty).
        validation, test, seed: carving fractions and seed (files only).
        **options: for files, those of :func:`read_labeled`; for a builtin, its loader's.

    Raises:
        DataError: malformed files, or a folder without a train file.
        ValueError: an unknown builtin.
    """
    if isinstance(spec, str) and spec.startswith("builtin:"):
        loaded: Splits[LabeledText] = load_builtin(spec.removeprefix("builtin:"), **options)
        return loaded
    path = Path(spec)
    if not path.is_dir():
        return split_labeled(
            read_labeled(path, **options), validation=validation, test=test, seed=seed
        )
    files = {split: split_file(path, split, list(_SUFFIX_FORMATS)) for split in SPLIT_STEMS}
    if files["train"] is None:
        raise DataError(path, None, "a data folder needs a train file (train.csv, .tsv or .jsonl)")
    train = read_labeled(files["train"], **options)
    test_examples = read_labeled(files["test"], **options) if files["test"] else []
    if files["validation"] is not None:
        return Splits(train, read_labeled(files["validation"], **options), test_examples)
    carved = split_labeled(train, validation=validation, test=0.0, seed=seed)
    return Splits(carved.train, carved.validation, test_examples)


def load_documents(
    spec: PathLike,
    *,
    document_field: str = "document",
    summary_field: str = "summary",
    **options: Any,
) -> Splits[Pair]:
    """(document, summary) pairs from a data spec, as ``Pair(source=document, target=summary)``.

    ``builtin:NAME`` loads a registered summarization set (options go to its loader); a JSONL
    file takes the ``document_field`` and ``summary_field`` fields, a TSV ``document<TAB>summary``
    lines; a folder holds ``train``/``validation``/``test`` files. Splits, errors and the other
    options are those of :func:`qkv.data.load_pairs`.
    """
    if isinstance(spec, str) and spec.startswith("builtin:"):
        return load_pairs(spec, **options)
    return load_pairs(spec, source_field=document_field, target_field=summary_field, **options)
