"""``qkv demo`` in its reduced CI mode: trains, scores, draws, and refuses foreign folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("babel")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")
pytest.importorskip("sacrebleu")
pytest.importorskip("matplotlib")

from qkv.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


@pytest.mark.slow
def test_quick_demo_trains_scores_and_draws(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")  # CI=true alone selects the reduced run
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "exact match on the 100 held-out pairs" in printed
    text = (out / "demo.json").read_text()
    assert not re.search(r"\d\.\d{7,}", text), "float noise in demo.json"  # 100.00000000000004
    results = json.loads(text)
    assert results["test_size"] == 100 and results["steps"] == 40
    assert 0.0 <= results["exact_match"] <= 1.0
    assert len(results["samples"]) == 8 and all(len(s) == 3 for s in results["samples"])
    pictures = sorted((out / "attention").glob("*.png"))
    assert [p.name for p in pictures] == ["attention-1.png", "attention-2.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pictures)
    assert (out / "model" / "config.json").is_file()
    # A second run does not silently replace the trained model (the rule of qkv train) ...
    weights = (out / "model" / "model.safetensors").read_bytes()
    assert main(["demo", "--out", str(out), "--device", "cpu", "--quick"]) == 2
    assert "already holds a trained model; pass --overwrite" in capsys.readouterr().err
    assert (out / "model" / "model.safetensors").read_bytes() == weights
    # ... and replaces the previous demo's files with --overwrite.
    assert main(["demo", "--out", str(out), "--device", "cpu", "--quick", "--overwrite"]) == 0


def test_demo_refuses_a_folder_with_other_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 2
    assert "not a previous qkv demo folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"
