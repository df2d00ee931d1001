"""One rule for the texts every verb reads: one output line per input, so an empty input is an
error naming it (an argument, a stdin line, a file line), never silently dropped."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from qkv.cli.inputs import read_lines
from qkv.cli.main import main
from qkv.cli.summarize import read_documents
from qkv.train.checkpoint import FORMAT


def _fake_model(folder: Path, task: str) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"format": FORMAT, "task": task}))
    return folder


@pytest.mark.parametrize("verb", ["translate", "classify"])
def test_an_empty_text_argument_is_refused_by_every_verb(
    verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _fake_model(tmp_path / "m", "translation" if verb == "translate" else "sentiment")
    assert main([verb, "--model", str(model), "", "3 mars 1998"]) == 2
    err = capsys.readouterr().err
    assert f"qkv {verb}: error: text argument 1 is empty: there is nothing to {verb}" in err


def test_stdin_and_file_lines_each_give_one_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "more.txt"
    file.write_text("d\ne\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("b\nc\n"))
    assert read_lines(["a", "-"], file, verb="translate") == ["a", "b", "c", "d", "e"]
    monkeypatch.setattr("sys.stdin", io.StringIO("b\n\nc\n"))
    with pytest.raises(ValueError, match="stdin line 2 is empty: there is nothing to classify"):
        read_lines(["-"], None, verb="classify")
    file.write_text("d\n   \ne\n")
    with pytest.raises(ValueError, match=r"--file .*more.txt line 2 is empty"):
        read_lines([], file, verb="translate")
    with pytest.raises(ValueError, match="nothing to translate"):
        read_lines([], None, verb="translate")


def test_summarize_lines_refuses_an_empty_line(tmp_path: Path) -> None:
    documents = tmp_path / "docs.txt"
    documents.write_text("first document\nsecond one\n")
    assert read_documents(str(documents), lines=True) == ["first document", "second one"]
    documents.write_text("first document\n\nsecond one\n")
    with pytest.raises(ValueError, match=r"docs.txt line 2 is empty: there is nothing to summ"):
        read_documents(str(documents), lines=True)
    # a whole document may hold blank lines (paragraphs)
    assert read_documents(str(documents), lines=False) == ["first document\n\nsecond one\n"]
