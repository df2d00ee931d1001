"""The smaller things a new user trips over: colour codes in a pipe, one format for rates,
float noise in demo.json, qkv check repeating one reason per case, raw reStructuredText in a
--help, the preset list in the docs, the wrong-column error, a silent setup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qkv.cli.main import main
from qkv.cli.train import format_metric
from qkv.data.labeled import read_labeled
from qkv.data.readers import DataError
from qkv.models.classifier import PRESETS
from qkv.tasks.demo import _rounded
from qkv.tasks.sentiment import format_classification

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_viz_example_writes_no_colour_codes_into_a_pipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    assert main(["viz", "example", "--out", str(tmp_path)]) == 0  # capsys is not a terminal
    out = capsys.readouterr().out
    assert "\x1b[" not in out
    first = out.splitlines()[0].split()
    assert first[0::2] == ["a", "quietly", "brilliant", "film", "with", "one", "dull", "scene"]
    assert sum(float(w) for w in first[1::2]) == pytest.approx(1.0, abs=0.03)


def test_rates_are_percentages_everywhere() -> None:
    metrics = {
        "accuracy": 0.580327, "macro_f1": 0.5, "majority_baseline": 0.25, "loss": 0.68123,
        "labels": ["a", "b"], "confusion": [[1, 0], [0, 1]],
    }  # fmt: skip
    line = format_classification(metrics)[0]
    assert line == "  accuracy 58.03%   macro-F1 50.00%   majority class 25.00%   loss 0.6812"
    assert format_metric("exact_match", 1.0) == "exact match 100.00%"
    assert format_metric("accuracy", 0.5803) == "accuracy 58.03%"
    assert format_metric("chrf", 91.25) == "chrf 91.25"
    assert format_metric("loss", 0.412345) == "loss 0.4123"


def test_demo_json_rounds_float_noise() -> None:
    document = {"bleu": 100.00000000000004, "rows": [{"x": 0.1 + 0.2}], "steps": 40, "s": "a"}
    assert _rounded(document) == {"bleu": 100.0, "rows": [{"x": 0.3}], "steps": 40, "s": "a"}
    assert json.dumps(_rounded(0.123456789)) == "0.123457"


def test_check_says_a_backend_that_serves_no_case_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qkv.backends.triton import support

    monkeypatch.setattr(support, "triton_installed", lambda: False)  # a CPU user's machine
    assert main(["check", "--q-len", "9", "--kv-len", "13", "--head-dim", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("triton is not installed") == 1
    assert "triton: serves none of these cases: triton is not installed" in out
    assert "not served: score function softcap" in out  # a per-case reason stays per case


def test_bench_approx_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "approx", "--help"])
    out = capsys.readouterr().out
    assert "``" not in out and ":mod:" not in out
    assert "Approximate attention" in out and "against exact" in out


def test_sentiment_docs_list_every_preset() -> None:
    text = (DOCS / "sentiment.md").read_text()
    config = text[text.index("- **Config**") :].split("\n\n")[0]
    for name in PRESETS:
        assert f"`{name}`" in config, name


def test_wrong_column_error_names_the_flags(tmp_path: Path) -> None:
    data = tmp_path / "reviews.csv"
    data.write_text("review,label\ngood film,pos\n")
    with pytest.raises(DataError, match=r"no text column 'text'.*--text-column and --label"):
        read_labeled(data)
    jsonl = tmp_path / "reviews.jsonl"
    jsonl.write_text('{"review": "good", "label": "pos"}\n')
    with pytest.raises(DataError, match=r"missing field 'text'.*--text-column"):
        read_labeled(jsonl)
    assert read_labeled(data, text_column="review")[0].text == "good film"


def test_sentiment_training_says_what_it_does_before_setup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tokenizers")
    data = tmp_path / "reviews.csv"
    rows = [f"{w} film {i},{'pos' if w == 'good' else 'neg'}" for i in range(20) for w in ("good", "bad")]  # fmt: skip
    data.write_text("text,label\n" + "\n".join(rows) + "\n")
    argv = ["train", "sentiment", "--data", str(data), "--out", str(tmp_path / "m"), "--steps"]
    # On a terminal the header comes at once and says what the setup seconds are spent on.
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert main([*argv, "1", "--preset", "tiny", "--device", "cpu"]) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("qkv train sentiment: into ")
    assert "CPU thread" in first and first.endswith("reading the data and building the model ...")
