"""Parallel text: (source, target) pairs read from the user's files or from a built-in set.

Three file layouts are understood:

============================  ==========================================================
TSV (``.tsv``, ``.tab``)      one pair per line: ``source<TAB>target``; blank lines skipped
JSONL (``.jsonl``, ``.json``)  one JSON object per line with a source and a target field
                              (``"source"`` / ``"target"`` unless told otherwise)
two aligned text files        line ``i`` of one file translates line ``i`` of the other
============================  ==========================================================

Any of them may be gzipped (``.tsv.gz``). Text is UTF-8 (a leading BOM is dropped), sides are
stripped of surrounding whitespace. Files are read through :mod:`qkv.data.readers` (shared
with the labeled-text readers); malformed input raises :class:`DataError`, whose message starts
``FILE:LINE:`` like a compiler's, so an editor can jump to it::

    data/train.tsv:17: expected 2 tab-separated columns (source, target), found 3

:func:`load_pairs` is the entry point the tasks use; it takes a *spec*:

- ``builtin:NAME`` -> a registered built-in set (:mod:`qkv.data.registry`) with its fixed splits;
- ``PATH`` to a TSV/JSONL file -> its pairs with seeded validation and test splits carved out;
- ``SRC_PATH,TGT_PATH`` (or a 2-tuple) -> two aligned text files, split the same way;
- ``DIR`` holding ``train.{tsv,jsonl}`` and optionally ``validation`` (or ``valid``/``dev``) and
  ``test`` files -> those splits as given.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from qkv.data.readers import (
    SPLIT_STEMS,
    SUFFIX_FORMATS,
    DataError,
    carve_splits,
    format_from_suffix,
    iter_lines,
    json_records,
    split_file,
)
from qkv.data.registry import Splits, load_builtin

__all__ = [
    "DataError",
    "FileFormat",
    "Pair",
    "load_file_pairs",
    "load_pairs",
    "read_aligned",
    "read_jsonl",
    "read_pairs",
    "read_tsv",
    "split_pairs",
]

logger = logging.getLogger(__name__)

FileFormat = Literal["tsv", "jsonl"]
PathLike = str | os.PathLike[str]

# Pairs are TSV or JSONL (CSV is for labeled text).
_SUFFIX_FORMATS = cast(
    "dict[str, FileFormat]", {k: v for k, v in SUFFIX_FORMATS.items() if v != "csv"}
)


@dataclass(frozen=True, slots=True)
class Pair:
    """One example: a source text and the target text it maps to.

    Translation uses (sentence, translation); the other tasks reuse it as (document, summary)
    or (text, label).
    """

    source: str
    target: str


def _side(text: str, path: Path, number: int, what: str) -> str:
    text = text.strip()
    if not text:
        raise DataError(path, number, f"empty {what}")
    return text


def _no_pairs(path: Path, pairs: list[Pair]) -> list[Pair]:
    if not pairs:
        raise DataError(path, None, "no pairs found (the file is empty or blank)")
    return pairs


# --------------------------------------------------------------------------------------------
# Readers


def read_tsv(path: PathLike, *, header: bool = False) -> list[Pair]:
    """Read ``source<TAB>target`` lines.

    Args:
        path: the file (``.gz`` is decompressed).
        header: skip the first line (column names).

    Returns:
        The pairs in file order. Blank lines are skipped.

    Raises:
        DataError: a line without exactly two columns, an empty side, invalid UTF-8, a missing
            file, or no pairs at all.
    """
    path = Path(path)
    pairs: list[Pair] = []
    for number, line in iter_lines(path):
        if (header and number == 1) or not line.strip():
            continue
        columns = line.split("\t")
        if len(columns) != 2:
            raise DataError(
                path,
                number,
                f"expected 2 tab-separated columns (source, target), found {len(columns)}",
            )
        pairs.append(
            Pair(
                _side(columns[0], path, number, "source (column 1)"),
                _side(columns[1], path, number, "target (column 2)"),
            )
        )
    return _no_pairs(path, pairs)


def read_jsonl(
    path: PathLike, *, source_field: str = "source", target_field: str = "target"
) -> list[Pair]:
    """Read one JSON object per line, taking two string fields.

    Args:
        path: the file (``.gz`` is decompressed).
        source_field: key of the source text.
        target_field: key of the target text.

    Returns:
        The pairs in file order. Blank lines are skipped; other keys are ignored.

    Raises:
        DataError: invalid JSON, a line that is not an object, a missing or non-string field,
            an empty side, invalid UTF-8, a missing file, or no pairs at all.
    """
    path = Path(path)
    pairs: list[Pair] = []
    fields = ((source_field, "source"), (target_field, "target"))
    for number, values in json_records(path, fields):
        sides = []
        for (field, what), value in zip(fields, values, strict=True):
            if not isinstance(value, str):
                raise DataError(
                    path,
                    number,
                    f"field {field!r} ({what}) must be a string, got {type(value).__name__}",
                )
            sides.append(_side(value, path, number, f"{what} (field {field!r})"))
        pairs.append(Pair(sides[0], sides[1]))
    return _no_pairs(path, pairs)


def _read_plain_lines(path: Path) -> list[str]:
    lines = [line for _, line in iter_lines(path)]
    while lines and not lines[-1].strip():  # trailing blank lines are not sentences
        lines.pop()
    return lines


def read_aligned(source_path: PathLike, target_path: PathLike) -> list[Pair]:
    """Read two text files aligned line by line: line ``i`` of one translates line ``i`` of the
    other.

    Raises:
        DataError: the files have different numbers of lines (naming the first line without a
            counterpart), a blank line on either side, invalid UTF-8, a missing file, or no
            pairs at all.
    """
    source_path, target_path = Path(source_path), Path(target_path)
    sources = _read_plain_lines(source_path)
    targets = _read_plain_lines(target_path)
    if len(sources) != len(targets):
        longer, shorter = (
            (source_path, target_path)
            if len(sources) > len(targets)
            else (target_path, source_path)
        )
        n_short, n_long = sorted((len(sources), len(targets)))
        raise DataError(
            longer,
            n_short + 1,
            f"no counterpart in {shorter}: aligned files must have the same number of lines "
            f"({longer} has {n_long}, {shorter} has {n_short})",
        )
    pairs = [
        Pair(
            _side(s, source_path, number, "line (source side)"),
            _side(t, target_path, number, "line (target side)"),
        )
        for number, (s, t) in enumerate(zip(sources, targets, strict=True), start=1)
    ]
    return _no_pairs(source_path, pairs)


def _format_of(path: Path, format: FileFormat | None) -> FileFormat:
    if format is not None:
        if format not in ("tsv", "jsonl"):
            raise ValueError(f"format must be 'tsv' or 'jsonl', got {format!r}")
        return format
    return format_from_suffix(path, _SUFFIX_FORMATS)


def read_pairs(
    path: PathLike | tuple[PathLike, PathLike],
    *,
    format: FileFormat | None = None,
    source_field: str = "source",
    target_field: str = "target",
    header: bool = False,
) -> list[Pair]:
    """Read pairs from a TSV or JSONL file, or from two aligned text files.

    Args:
        path: one file, or ``(source_file, target_file)`` for aligned text files.
        format: ``"tsv"`` or ``"jsonl"``; by default taken from the extension.
        source_field: JSONL key of the source text.
        target_field: JSONL key of the target text.
        header: TSV only: skip the first line.

    Raises:
        DataError: malformed input (see the readers).
    """
    if isinstance(path, tuple):
        return read_aligned(*path)
    path = Path(path)
    if _format_of(path, format) == "tsv":
        return read_tsv(path, header=header)
    return read_jsonl(path, source_field=source_field, target_field=target_field)


# --------------------------------------------------------------------------------------------
# Splits


def split_pairs(
    pairs: Sequence[Pair], *, validation: float = 0.05, test: float = 0.05, seed: int = 0
) -> Splits[Pair]:
    """Carve seeded validation and test splits out of ``pairs``.

    Distinct source texts are ranked by a seeded hash (:func:`qkv.data._util.stable_hash`) and
    the first ``round(test * n)`` go to test, the next ``round(validation * n)`` to validation,
    where ``n`` counts distinct sources. Every copy of a source lands in the same split, so the
    splits are disjoint by source even when the file repeats sentences; file order is kept
    within each split. The rule depends only on the texts and the seed, not on the file order.

    Raises:
        ValueError: a fraction outside ``[0, 1)`` or fractions summing to 1 or more.
    """
    return carve_splits(
        pairs, lambda p: p.source, validation=validation, test=test, seed=seed, salt="split"
    )


def load_file_pairs(
    path: PathLike | tuple[PathLike, PathLike],
    *,
    validation: float = 0.05,
    test: float = 0.05,
    seed: int = 0,
    format: FileFormat | None = None,
    source_field: str = "source",
    target_field: str = "target",
    header: bool = False,
) -> Splits[Pair]:
    """Splits from the user's files: one file (or an aligned pair of files) or a folder.

    A single file gets seeded validation and test splits carved out (:func:`split_pairs`). A
    folder gives ``train.*`` (required), ``validation.*`` / ``valid.*`` / ``dev.*`` and
    ``test.*`` as they are; a missing validation file is carved out of train, a missing test
    file leaves test empty (held-out data is the user's to choose).

    Args:
        path: a file, a folder, or ``(source_file, target_file)``.
        validation: fraction of distinct sources for validation when carved.
        test: fraction of distinct sources for test when carved (single files only).
        seed: seed of the carving rule.
        format, source_field, target_field, header: as in :func:`read_pairs`.

    Raises:
        DataError: malformed input, or a folder without a ``train`` file.
    """
    options: dict[str, Any] = {
        "format": format,
        "source_field": source_field,
        "target_field": target_field,
        "header": header,
    }
    if isinstance(path, tuple) or not Path(path).is_dir():
        return split_pairs(read_pairs(path, **options), validation=validation, test=test, seed=seed)
    directory = Path(path)
    files = {split: split_file(directory, split, list(_SUFFIX_FORMATS)) for split in SPLIT_STEMS}
    train_file = files["train"]
    if train_file is None:
        raise DataError(
            directory, None, "a data folder needs a train file (train.tsv or train.jsonl)"
        )
    train = read_pairs(train_file, **options)
    test_pairs = read_pairs(files["test"], **options) if files["test"] else []
    validation_file = files["validation"]
    if validation_file is not None:
        return Splits(train, read_pairs(validation_file, **options), test_pairs)
    carved = split_pairs(train, validation=validation, test=0.0, seed=seed)
    logger.info(
        "%s has no validation file: carved %d pairs out of train", directory, len(carved.validation)
    )
    return Splits(carved.train, carved.validation, test_pairs)


def _as_path_spec(spec: str) -> PathLike | tuple[PathLike, PathLike]:
    # "SRC,TGT" names two aligned files, unless a file of that very name exists.
    if "," in spec and not Path(spec).exists():
        parts = [part.strip() for part in spec.split(",")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(
                f"data spec {spec!r}: two aligned files are written SOURCE_FILE,TARGET_FILE"
            )
        return parts[0], parts[1]
    return spec


def load_pairs(spec: PathLike | tuple[PathLike, PathLike], **options: Any) -> Splits[Pair]:
    """Load train/validation/test pairs from a data spec.

    Args:
        spec: ``"builtin:NAME"``, a file, a folder, ``"SRC_FILE,TGT_FILE"`` or a 2-tuple of
            paths (see the module docstring).
        **options: for a builtin, the loader's options (sizes, ``seed``, ...); for files,
            those of :func:`load_file_pairs`.

    Raises:
        DataError: malformed files.
        ValueError: an unknown builtin name or a malformed spec.
        MissingPackageError: a builtin whose optional package is not installed.
    """
    if isinstance(spec, str) and spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        splits: Splits[Pair] = load_builtin(name, **options)
        return splits
    if isinstance(spec, list | tuple):
        if len(spec) != 2:
            raise ValueError(f"aligned files are given as 2 paths, got {len(spec)}")
        return load_file_pairs((spec[0], spec[1]), **options)
    return load_file_pairs(_as_path_spec(os.fspath(spec)), **options)
