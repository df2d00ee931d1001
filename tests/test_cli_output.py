"""What the task commands print: time-limit progress, colour only on a terminal, BLEU's caveat."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from qkv.cli.main import main


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_time_limited_progress_shows_elapsed_over_limit() -> None:
    from qkv.cli.progress import ProgressBar
    from qkv.cli.train import TrainProgress
    from qkv.train import StepReport

    progress = TrainProgress()
    stream = io.StringIO()
    progress.bar = ProgressBar(60, unit="s", stream=stream)
    report = StepReport(20, None, 1.5, 1e-3, 100.0, elapsed_s=14.2, max_seconds=60.0)
    progress.on_step(report)
    line = stream.getvalue()
    assert "] 14s/60s step 20" in line and "20/60" not in line
    steps = io.StringIO()
    ProgressBar(60, stream=steps).update(20, "note", elapsed=14.0)
    assert "] 20/60    14s note" in steps.getvalue()


def test_colour_only_on_a_terminal_without_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    from qkv.cli.classify import colour_wanted

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert colour_wanted(_Terminal()) and not colour_wanted(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not colour_wanted(_Terminal())


def test_bleu_is_flagged_on_short_outputs() -> None:
    pytest.importorskip("sacrebleu")
    from qkv.tasks.evaluation import format_translation_scores, score_translations

    short = score_translations(["1998", "2001", "x"], ["1998", "2002", "x"], ["a", "b", "c"])
    assert short.short_hypotheses == 1.0 and not short.bleu_meaningful
    lines = format_translation_scores(short.to_dict())
    assert "BLEU (up to 4-grams) is not meaningful here; read chrF" in lines[1]
    sentence = "the cat sat on the mat today"
    long = score_translations([sentence] * 2, [sentence] * 2, ["a", "b"])
    assert long.bleu_meaningful and "note" not in " ".join(
        format_translation_scores(long.to_dict())
    )


@pytest.mark.slow
def test_classify_explain_into_a_pipe_has_no_escape_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tokenizers")
    pytest.importorskip("sklearn")
    data = tmp_path / "reviews.csv"
    rows = [("good great fine", "pos"), ("bad awful dull", "neg")] * 8
    data.write_text("text,label\n" + "".join(f"{t} {i},{y}\n" for i, (t, y) in enumerate(rows)))
    out = tmp_path / "m"
    train = ["train", "sentiment", "--data", str(data), "--preset", "tiny", "--vocab-size", "60",
             "--out", str(out), "--steps", "2", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(train) == 0
    page = tmp_path / "page.html"
    capsys.readouterr()
    argv = ["classify", "--model", str(out), "good film", "--explain", "--html", str(page)]
    assert main(argv) == 0  # capsys: stdout is not a terminal
    printed = capsys.readouterr().out
    assert "\x1b[" not in printed and "  attention: " in printed and page.is_file()
    assert main([*argv, "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["text"] == "good film"
