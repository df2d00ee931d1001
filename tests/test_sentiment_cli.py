"""``qkv train sentiment``, ``qkv classify`` (with --explain) and ``qkv evaluate`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qkv.cli.main import main

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")
pytest.importorskip("sklearn")

ROWS = [
    ("a wonderful moving film", "pos"),
    ("brilliant and wonderful acting", "pos"),
    ("a dull boring mess", "neg"),
    ("awful , boring and far too long", "neg"),
]


@pytest.mark.slow
def test_train_classify_explain_evaluate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"review": t, "y": y}) + "\n" for t, y in ROWS * 4))
    out = tmp_path / "model"
    code = main(
        ["train", "sentiment", "--data", str(data), "--text-column", "review", "--label-column", "y",
         "--preset", "tiny", "--vocab-size", "200", "--out", str(out), "--steps", "25",
         "--lr", "0.01", "--warmup", "0", "--batch-size", "8", "--eval-every", "25",
         "--device", "cpu", "--quiet"]
    )  # fmt: skip
    assert code == 0 and "trained 25 steps" in capsys.readouterr().out
    page = tmp_path / "explain.html"
    code = main(
        ["classify", "--model", str(out), "a wonderful film", "boring mess", "--explain",
         "--html", str(page), "--json"]
    )  # fmt: skip
    lines = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    assert code == 0 and [r["label"] for r in lines] == ["pos", "neg"]
    assert sum(lines[0]["probabilities"].values()) == pytest.approx(1.0)
    html = page.read_text()
    assert html.count('class="label"') == 2 and 'class="tok"' in html and "pos (" in html
    # A file given to evaluate is scored whole, with the columns saved in the model folder.
    evaluate = ["evaluate", "--model", str(out), "--data", str(data)]
    code = main([*evaluate, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["task"] == "sentiment" and report["split"] == "all"
    assert report["metrics"]["accuracy"] == 1.0
    assert sum(map(sum, report["metrics"]["confusion"])) == report["examples"] == 16
    assert main(evaluate) == 0
    table = capsys.readouterr().out
    assert "accuracy 100.00%   macro-F1 100.00%" in table and "(all, 16 examples)" in table


def test_empty_text_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qkv.cli.classify import read_texts

    with pytest.raises(ValueError, match="text argument 2 is empty"):
        read_texts(["fine", " "], None)
    with pytest.raises(ValueError, match="nothing to classify"):
        read_texts([], None)
    with pytest.raises(ValueError, match="cannot be read"):
        read_texts([], tmp_path / "missing.txt")


def test_evaluate_prints_a_readable_confusion_matrix(capsys: pytest.CaptureFixture[str]) -> None:
    from qkv.tasks.base import Evaluation

    metrics = {
        "accuracy": 4 / 7, "macro_f1": 0.55, "majority_baseline": 3 / 7, "loss": 0.9,
        "labels": ["negative", "positive", "x"], "confusion": [[2, 1, 0], [1, 1, 0], [0, 1, 1]],
    }  # fmt: skip
    print(Evaluation("sentiment", "m", "d.csv", "test", 7, metrics).table())
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "m on d.csv (test, 7 examples)"
    assert "accuracy 57.14%   macro-F1 55.00%   majority class 42.86%" in lines[1]
    assert lines[3].split() == ["negative", "positive", "x"]
    assert lines[4].split() == ["negative", "2", "1", "0"]
    assert lines[6].split() == ["x", "0", "1", "1"]
