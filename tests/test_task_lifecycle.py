"""One lifecycle for every task (qkv.tasks.base): train, resume, evaluate, the same report keys.

Each task trains a few steps on a tiny file through the CLI; a run stopped and resumed with
more ``--steps`` must give the uninterrupted run's loss curve exactly, a resume with another
``--lr`` is refused naming it, and ``qkv evaluate`` on a file scores every line of it.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qkv.cli.main import main

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")
pytest.importorskip("sacrebleu")
pytest.importorskip("sklearn")
pytest.importorskip("rouge_score")

REPORT_KEYS = {"task", "model", "data", "split", "examples", "metrics"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def _words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6))) for _ in range(n)]


def translation_file(folder: Path) -> tuple[Path, int]:
    lines = [f"{w}\t{w[::-1]}" for w in _words(40, seed=1)]
    path = folder / "pairs.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path, len(lines)


def sentiment_file(folder: Path) -> tuple[Path, int]:
    rng = random.Random(2)
    good, bad = ["good", "great", "fine", "lovely"], ["bad", "awful", "dull", "poor"]
    rows = []
    for i in range(32):
        words = good if i % 2 else bad
        text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
        rows.append(f"{text},{'pos' if i % 2 else 'neg'}")
    path = folder / "reviews.csv"
    path.write_text("review,stars\n" + "\n".join(rows) + "\n")
    return path, len(rows)


def summarization_file(folder: Path) -> tuple[Path, int]:
    lines = [
        f"the function {w} returns a list . it never fails .\treturn {w} list"
        for w in _words(24, 3)
    ]
    path = folder / "docs.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path, len(lines)


TASKS = {
    "translation": (
        translation_file,
        ["--tokenizer", "char", "--preset", "tiny", "--dropout", "0.1", "--valid-size", "4"],
    ),
    "sentiment": (
        sentiment_file,
        ["--text-column", "review", "--label-column", "stars", "--preset", "tiny",
         "--vocab-size", "60", "--dropout", "0.1"],
    ),
    "summarization": (
        summarization_file,
        ["--preset", "tiny", "--vocab-size", "30", "--valid-size", "4"],
    ),
}  # fmt: skip

COMMON = ["--lr", "0.003", "--warmup", "0", "--batch-size", "8", "--eval-every", "3",
          "--log-every", "1", "--device", "cpu"]  # fmt: skip


def losses(folder: Path) -> list[float]:
    state = torch.load(folder / "training_state.pt", weights_only=True)
    return list(state["trainer"]["losses"])


@pytest.mark.parametrize("task", list(TASKS))
def test_train_resume_evaluate(
    task: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_data, flags = TASKS[task]
    data, lines = make_data(tmp_path)
    train = ["train", task, "--data", str(data), *flags, *COMMON]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main([*train, "--out", str(whole), "--steps", "6", "--quiet"]) == 0
    assert "trained 6 steps" in capsys.readouterr().out
    # The split run's first half also prints the sizes of the user's file once split.
    assert main([*train, "--out", str(split), "--steps", "3"]) == 0
    err = capsys.readouterr().err
    assert f"data {data}: " in err and " train / " in err
    # A resume takes the saved settings: only the new limit is given.
    assert main(["train", task, "--out", str(split), "--resume", "--steps", "6"]) == 0
    captured = capsys.readouterr()
    assert "resuming from step 3" in captured.err and "trained 6 steps" in captured.out
    assert len(losses(whole)) == 6 and losses(split) == losses(whole)
    # Another learning rate is refused, naming the setting and both values.
    assert main(["train", task, "--out", str(split), "--resume", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "lr is 0.01 but the run saved in" in err and "used 0.003" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # evaluate on a file scores every line of it; the report keys are the same for each task.
    assert main(["evaluate", "--model", str(whole), "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == REPORT_KEYS and report["task"] == task
    assert report["examples"] == lines and report["split"] == "all"
    assert report["data"] == str(data) and report["model"] == str(whole)
    # Without --data: the held-out split of the training file, as it was carved for training.
    assert main(["evaluate", "--model", str(whole), "--json", "--split", "validation"]) == 0
    held = json.loads(capsys.readouterr().out)
    assert set(held) == REPORT_KEYS and held["split"] == "validation"
    assert 0 < held["examples"] < lines
    # --split is for built-in sets, folders and the training data, not a file.
    assert main(["evaluate", "--model", str(whole), "--data", str(data), "--split", "test"]) == 2
    assert "is scored whole" in capsys.readouterr().err


def test_resume_accepts_the_same_settings_given_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_data, flags = TASKS["sentiment"]
    data, _ = make_data(tmp_path)
    train = ["train", "sentiment", "--data", str(data), *flags, *COMMON, "--quiet"]
    out = tmp_path / "m"
    assert main([*train, "--out", str(out), "--steps", "2"]) == 0
    assert main([*train, "--out", str(out), "--steps", "3", "--resume"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    assert main([*train, "--out", str(out), "--resume", "--preset", "bigru-fast"]) == 2
    assert "preset is 'bigru-fast' but the run saved" in capsys.readouterr().err


def test_library_resume_rule_names_the_setting(tmp_path: Path) -> None:
    from qkv.tasks import train_task
    from qkv.tasks.sentiment import SentimentSetup
    from qkv.train import TrainConfig

    data, _ = sentiment_file(tmp_path)
    settings = SentimentSetup(
        data=str(data),
        preset="tiny",
        vocab_size=60,
        batch_size=8,
        data_options={"text_column": "review", "label_column": "stars"},
    )
    training = TrainConfig(lr=3e-3, warmup_steps=0, max_steps=2, eval_every=2, device="cpu")
    train_task("sentiment", settings, training, tmp_path / "m")
    with pytest.raises(ValueError, match=r"batch_size is 4 but the run saved in .* used 8"):
        train_task(
            "sentiment", replace(settings, batch_size=4), training, tmp_path / "m", resume=True
        )
    with pytest.raises(ValueError, match=r"warmup_steps is 5 .* used 0"):
        train_task(
            "sentiment", settings, replace(training, warmup_steps=5), tmp_path / "m", resume=True
        )
    more = train_task(
        "sentiment", settings, replace(training, max_steps=3), tmp_path / "m", resume=True
    )
    assert more.resumed_from == 2 and more.result.state.step == 3


def test_evaluate_from_another_folder_and_a_moved_training_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    make_data, flags = TASKS["sentiment"]
    make_data(work)
    monkeypatch.chdir(work)  # a relative --data, as a user types it
    train = ["train", "sentiment", "--data", "reviews.csv", *flags, *COMMON, "--quiet"]
    assert main([*train, "--out", "m", "--steps", "2"]) == 0
    config = json.loads((work / "m" / "config.json").read_text())
    assert config["sentiment"]["data"] == str(work / "reviews.csv")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["evaluate", "--model", "work/m", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["split"] == "test"
    shutil.move(work / "reviews.csv", tmp_path / "moved.csv")
    assert main(["evaluate", "--model", "work/m"]) == 2
    err = capsys.readouterr().err
    assert f"{work / 'reviews.csv'}, which is missing" in err and "--data FILE" in err
    # The moved file, given with --data, is read with the columns saved in the folder.
    assert main(["evaluate", "--model", "work/m", "--data", "moved.csv", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 32


def test_evaluate_reader_options_override_the_saved_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_data, flags = TASKS["sentiment"]
    data, lines = make_data(tmp_path)
    train = ["train", "sentiment", "--data", str(data), *flags, *COMMON, "--quiet"]
    assert main([*train, "--out", str(tmp_path / "m"), "--steps", "2"]) == 0
    renamed = tmp_path / "tweets.csv"
    renamed.write_text(data.read_text().replace("review,stars", "tweet,feeling", 1))
    argv = ["evaluate", "--model", str(tmp_path / "m"), "--data", str(renamed), "--json"]
    assert main(argv) == 2
    assert "no text column 'review'" in capsys.readouterr().err
    assert main([*argv, "--text-column", "tweet", "--label-column", "feeling"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == lines
    assert main([*argv, "--document-field", "x"]) == 2
    assert "--document-field: not an option of a sentiment model's data" in capsys.readouterr().err


def test_a_folder_in_the_older_layout_still_loads_and_evaluates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_data, flags = TASKS["sentiment"]
    data, lines = make_data(tmp_path)
    out = tmp_path / "m"
    train = ["train", "sentiment", "--data", str(data), *flags, *COMMON, "--quiet"]
    assert main([*train, "--out", str(out), "--steps", "2"]) == 0
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    settings = config.pop("sentiment")  # the layout before settings had their own section
    config["data"] = {
        "spec": settings["data"],
        "options": settings["data_options"],
        "max_length": settings["max_length"],
        "preset": settings["preset"],
    }
    config_file.write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == lines
    del config["data"]
    config_file.write_text(json.dumps(config))
    assert main(["evaluate", "--model", str(out)]) == 2
    assert "no 'sentiment' settings section" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["sentiment", "summarization"])
def test_keep_best_and_early_stopping_for_every_task(
    task: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_data, flags = TASKS[task]
    data, _ = make_data(tmp_path)
    out = tmp_path / "m"
    # A learning rate too small to change any prediction: the first validation stays the best.
    argv = ["train", task, "--data", str(data), *flags, "--out", str(out), "--steps", "20",
            "--lr", "1e-9", "--warmup", "0", "--batch-size", "8", "--eval-every", "2",
            "--patience", "1", "--keep-best", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "trained 4 steps" in printed and "early_stopping" in printed
    assert "(the weights of step 2)" in printed
    state = torch.load(out / "training_state.pt", weights_only=True)
    assert state["trainer"]["step"] == 2 and state["trainer"]["best_step"] == 2


def test_backend_reaches_every_attention_layer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from qkv.models import TransformerConfig, build_model
    from qkv.nn import MultiHeadAttention
    from qkv.tasks.base import set_attention_backend

    config = TransformerConfig.from_name("tiny", src_vocab_size=12, tgt_vocab_size=12)
    model = build_model(config.to_dict())
    set_attention_backend(model, "reference")
    layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    assert layers and all(m.backend == "reference" for m in layers)
    with pytest.raises(ValueError, match=r"backend must be .auto. or one of .*reference"):
        set_attention_backend(model, "nope")
    make_data, flags = TASKS["sentiment"]
    data, _ = make_data(tmp_path)
    argv = ["train", "sentiment", "--data", str(data), *flags, "--out", str(tmp_path / "m"),
            "--steps", "1", "--device", "cpu", "--quiet", "--backend", "nope"]  # fmt: skip
    assert main(argv) == 2
    assert "backend must be 'auto' or one of" in capsys.readouterr().err
