"""``qkv train summarization``, ``qkv summarize`` and ``qkv evaluate`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qkv.cli.main import main

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")
pytest.importorskip("rouge_score")

NAMES = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]


@pytest.mark.slow
def test_train_summarize_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "docs.tsv"
    data.write_text(
        "".join(
            f"the function {n} returns a list . it never fails .\treturn {n} list\n"
            for n in NAMES * 3
        )
    )
    out = tmp_path / "model"
    code = main(
        ["train", "summarization", "--data", str(data), "--preset", "tiny", "--vocab-size", "12",
         "--out", str(out), "--steps", "40", "--lr", "0.02", "--warmup", "0", "--batch-size", "8",
         "--eval-every", "40", "--device", "cpu", "--quiet"]
    )  # fmt: skip
    assert code == 0 and "trained 40 steps" in capsys.readouterr().out
    document = tmp_path / "doc.txt"
    document.write_text("the function kilo returns a list . it never fails .\n")
    page = tmp_path / "explain.html"
    code = main(
        [
            "summarize",
            "--model",
            str(out),
            str(document),
            "--json",
            "--explain",
            "--html",
            str(page),
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["summary"] == "return kilo list" and "kilo" in result["copied"]
    assert "return kilo list" in page.read_text() and page.read_text().count('class="tok"') == 11
    evaluate = ["evaluate", "--model", str(out), "--data", str(data)]
    code = main([*evaluate, "--limit", "6", "--json"])
    report = json.loads(capsys.readouterr().out)
    metrics = report["metrics"]
    assert code == 0 and metrics["model"]["rougeL"] > 99.0 > metrics["lead"]["rougeL"]
    assert report["model"] == str(out) and report["examples"] == 6
    assert main([*evaluate, "--limit", "6"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == f"{out} on {data} (all, 6 examples)"
    assert table[1].split() == ["ROUGE-1", "ROUGE-2", "ROUGE-L"]
    assert table[2].split()[0] == "model" and float(table[2].split()[3]) > 99.0
    assert table[3].split()[0] == "lead-1"


def test_empty_input_is_reported(tmp_path: Path) -> None:
    from qkv.cli.summarize import read_documents

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(ValueError, match="empty, nothing to summarize"):
        read_documents(str(empty), lines=False)
    with pytest.raises(ValueError, match="cannot be read"):
        read_documents(str(tmp_path / "missing.txt"), lines=True)
