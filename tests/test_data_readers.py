"""The shared readers (qkv.data.readers): bad files get one clear line naming file and line."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from qkv.cli.main import main
from qkv.data import DataError, read_pairs
from qkv.data.labeled import read_labeled
from qkv.data.readers import MAX_LINE_CHARS, carve_splits, iter_lines


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_csv_row_with_more_fields_than_the_header(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text('text,label\n"fine, really",pos\na,b,pos\n')
    with pytest.raises(DataError, match=r"reviews.csv:3: 3 fields, but the header names 2"):
        read_labeled(path)
    tsv = tmp_path / "reviews.tsv"
    tsv.write_text("text\tlabel\nok\tpos\nx\ty\tneg\n")
    with pytest.raises(DataError, match=r"reviews.tsv:3: 3 fields, but the header names 2"):
        read_labeled(tsv)
    # Without a header any number of fields is fine: columns are picked by number.
    headless = tmp_path / "headless.csv"
    headless.write_text("a,b,pos\n")
    assert read_labeled(headless, header=False, text_column=0, label_column=2)[0].label == "pos"


def test_gz_file_that_is_not_gzip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pairs.tsv.gz"
    path.write_text("abc\tcba\n")
    with pytest.raises(DataError, match=r"pairs.tsv.gz: named .gz but not gzip-compressed"):
        read_pairs(path)
    argv = ["train", "translation", "--data", str(path), "--out", str(tmp_path / "m")]
    assert main(argv) == 2
    assert f"{path}: named .gz but not gzip-compressed" in _one_error_line(capsys)


def test_truncated_gzip(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(f"src{i}\ttgt{i}\n" for i in range(2000)))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match=r"pairs.tsv.gz: corrupt gzip data"):
        read_pairs(path)


def test_one_class_csv_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tokenizers")
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "".join(f"review number {i},pos\n" for i in range(20)))
    argv = ["train", "sentiment", "--data", str(path), "--out", str(tmp_path / "m"), "--quiet"]
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert str(path) in err and "all have the label 'pos'" in err and "at least 2" in err


def test_a_line_over_the_limit_is_refused_with_its_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "big.tsv"
    long = "x" * (MAX_LINE_CHARS + 1)
    path.write_text(f"short\ttext\n{long}\t{long}\n")
    with pytest.raises(DataError, match=r"big.tsv:2: the line is 2,000,003 characters long"):
        read_pairs(path)
    argv = ["train", "translation", "--data", str(path), "--out", str(tmp_path / "m")]
    assert main(argv) == 2
    assert f"{path}:2: the line is" in _one_error_line(capsys)
    # The limit is per line: many lines of ordinary length are fine.
    assert len(list(iter_lines(path, max_chars=3 * MAX_LINE_CHARS))) == 2


def test_long_target_does_not_set_a_huge_decode_length(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    from qkv.tasks.translation import SPEC, TranslationConfig

    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"w{i}\tv{i}\n" for i in range(8)) + "a\t" + "y" * 50_000 + "\n")
    settings = TranslationConfig(data=str(path), tokenizer="char", max_target_length=64)
    splits = SPEC.load_splits(settings.data, {})
    prepared = SPEC.prepare(settings, splits, folder=None)
    assert prepared.settings.max_decode_length == 128  # 2 x max_target_length, not ~75,000
    assert max(prepared.train_set.lengths()) <= 64


def test_carve_splits_is_disjoint_by_key_and_seeded() -> None:
    items = [f"s{i % 50}" for i in range(200)]  # every key four times
    a = carve_splits(items, str, validation=0.1, test=0.2, seed=3, salt="t")
    b = carve_splits(list(reversed(items)), str, validation=0.1, test=0.2, seed=3, salt="t")
    assert {len(set(a.test)), len(set(a.validation))} == {10, 5}
    assert set(a.test) == set(b.test) and not set(a.test) & set(a.train)
    c = carve_splits(items, str, validation=0.1, test=0.2, seed=4, salt="t")
    assert set(c.test) != set(a.test)
    with pytest.raises(ValueError, match="must be below 1"):
        carve_splits(items, str, validation=0.5, test=0.5, seed=0, salt="t")
