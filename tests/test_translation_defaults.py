"""Choices sized to a small translation corpus, each said with its reason and each a flag."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from qkv.cli.main import main
from qkv.tasks import translation_defaults
from qkv.tasks.translation import TranslationConfig, train_translation
from qkv.tasks.translation_defaults import (
    SMALL_CORPUS,
    SizedChoices,
    size_to_data,
    sized_training,
    suggested_steps,
)
from qkv.train import TrainConfig

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")


SIZED = {"d_model": 128, "num_heads": 4, "num_encoder_layers": 2, "num_decoder_layers": 2}


def test_a_small_corpus_gets_its_vocabulary_batch_model_dropout_and_budget() -> None:
    sized = size_to_data(TranslationConfig(data="x.tsv"), 500)
    assert sized.settings.vocab_size == 1000 and sized.settings.batch_size == 32
    assert sized.model_overrides == {**SIZED, "dropout": 0.1}
    assert sized.training == {
        "max_steps": 1000,
        "max_minutes": None,
        "lr": 3e-3,
        "schedule": "cosine",
        "eval_every": 200,
        "keep_best": True,
    }
    assert sized.notes[0].startswith("a small corpus (500 training pairs)")
    text = "\n".join(sized.notes)
    flags = ("--vocab-size", "--batch-size", "--preset", "--d-model", "--dropout", "--copy")
    for flag in (*flags, "--separate-vocab", "--steps", "--lr", "--schedule", "--eval-every"):
        assert flag in text
    assert "--no-size-defaults" in text and "--no-keep-best" in text
    assert "batch size 32 (not 64)" in text
    assert "model size d_model 128, 2+2 layers, 4 heads (the tiny preset's depth" in text
    assert "1000 steps (about 50 passes over the data, bounded to 1000-8000)" in text
    assert "peak learning rate of 0.003" in text
    assert sized.settings.memory is False  # measured: no higher by validation on 500 verses
    assert "no translation memory" in text and "(--memory)" in text
    two = size_to_data(TranslationConfig(data="x.tsv"), 2000)
    assert two.settings.vocab_size == 4000 and two.training["max_steps"] == 3200
    assert two.training["eval_every"] == 640
    assert size_to_data(TranslationConfig(data="x.tsv"), 9000).settings.vocab_size == 8000
    rnn = size_to_data(TranslationConfig(data="x.tsv", model="rnn"), 500).model_overrides
    assert rnn == {"embed_dim": 32, "hidden_dim": 64, "num_layers": 1, "dropout": 0.1}
    # the batch size of a corpus that is not sized is the task's default, filled in later
    assert size_to_data(TranslationConfig(data="x.tsv"), SMALL_CORPUS).settings.batch_size is None


def test_choices_the_user_made_are_kept() -> None:
    given = TranslationConfig(
        data="x.tsv",
        vocab_size=300,
        batch_size=16,
        preset="small",
        model_overrides={"dropout": 0.05},
    )
    sized = size_to_data(given, 500)
    assert sized.settings == replace(given, memory=False) and sized.model_overrides == {}
    with_memory = size_to_data(replace(given, memory=True), 500)
    assert with_memory.settings.memory is True
    assert not any("translation memory" in n for n in with_memory.notes)
    notes = sized.notes
    assert not any(w in n for n in notes for w in ("BPE", "batch", "dropout", "model size"))
    assert "1600 steps" in notes[-1]  # 50 passes of 32 batches of 16
    # a model field of the user's own wins over the sized model, and the note shows it
    width = size_to_data(TranslationConfig(data="x.tsv", model_overrides={"d_model": 32}), 500)
    assert "d_model" not in width.model_overrides
    assert any("model size d_model 32, 2+2 layers" in n for n in width.notes)
    chars = TranslationConfig(data="x.tsv", tokenizer="char")
    assert size_to_data(chars, 500).settings.vocab_size is None  # characters need no BPE size
    off = TranslationConfig(data="x.tsv", size_defaults=False)
    assert size_to_data(off, 500) == SizedChoices(off)
    assert size_to_data(TranslationConfig(data="x.tsv"), SMALL_CORPUS) == SizedChoices(
        TranslationConfig(data="x.tsv")
    )


def test_suggested_steps_are_bounded() -> None:
    assert suggested_steps(100, 32) == 1000
    assert suggested_steps(1900, 32) == 3000  # 50 passes of 60 batches
    assert suggested_steps(2000, 64) == 1600  # 50 passes of 32 batches
    assert suggested_steps(100_000, 32) == 8000
    assert sized_training(1900, 32)["eval_every"] == 600  # five validations


def test_cli_applies_the_sized_training_unless_limits_are_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a budget of a few steps stands in for the sized one (1,000 steps and more), to keep
    # the test fast; what is checked is that it is applied, printed and overridable
    budget = {"max_steps": 4, "max_minutes": None, "eval_every": 2, "keep_best": True}
    monkeypatch.setattr(translation_defaults, "sized_training", lambda n, b: dict(budget))
    data = tmp_path / "train.tsv"
    data.write_text("".join(f"item {i} blue\tobjet {i} bleu\n" for i in range(60)))
    argv = ["train", "translation", "--data", str(data), "--device", "cpu"]

    def run(out: str, *flags: str) -> tuple[dict[str, Any], str, str]:
        assert main([*argv, "--out", str(tmp_path / out), *flags]) == 0
        captured = capsys.readouterr()
        config = json.loads((tmp_path / out / "config.json").read_text())
        return config, captured.out, captured.err

    config, out, err = run("open")
    assert config["training"] | budget == config["training"]
    assert "trained 4 steps" in out and "the weights of step" in out
    assert "model size d_model 128" in err and config["model"]["d_model"] == 128
    assert "batch size 32" in err and config["translation"]["batch_size"] == 32
    assert "limits given" not in err
    # a training flag given is kept, the others still sized
    config, out, _ = run("own-eval", "--eval-every", "1", "--no-keep-best")
    assert config["training"]["eval_every"] == 1 and config["training"]["keep_best"] is False
    assert config["training"]["max_steps"] == 4 and "trained 4 steps" in out
    # limits of the user's own: the sized training does not apply, and the note says so
    config, out, err = run("own-steps", "--steps", "3")
    assert config["training"]["max_steps"] == 3 and config["training"]["keep_best"] is False
    assert "the limits given replace the training sized to the data (max_steps=4" in err
    # --preset replaces the sized model size, --d-model its width, --batch-size the batch
    config, _, err = run("small", "--steps", "1", "--preset", "small")
    assert config["model"]["d_model"] == 256 and "model size" not in err
    config, _, err = run("narrow", "--steps", "1", "--d-model", "32", "--batch-size", "8")
    assert config["model"]["d_model"] == 32 and "model size d_model 32" in err
    assert config["translation"]["batch_size"] == 8 and "batch size" not in err
    with pytest.raises(ValueError, match=r"d_model=32 \(--d-model\) is the Transformer's width"):
        TranslationConfig(data="x.tsv", model="rnn", model_overrides={"d_model": 32})


def test_cli_prints_the_choices_and_every_one_is_a_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "train.tsv"
    data.write_text("".join(f"item {i} blue\tobjet {i} bleu\n" for i in range(60)))
    argv = ["train", "translation", "--data", str(data), "--steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "a small corpus (" in err and "BPE vocabulary 500" in err and "dropout 0.1" in err
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["model"]["dropout"] == 0.1 and config["translation"]["vocab_size"] == 500
    assert config["translation"]["model_overrides"] == {}  # resuming with the same flags is fine
    assert main([*argv, "--out", str(tmp_path / "a"), "--resume", "--steps", "2"]) == 0
    capsys.readouterr()
    flags = ["--no-size-defaults", "--dropout", "0.2", "--vocab-size", "600"]
    assert (
        main(
            [
                "train",
                "translation",
                "--data",
                str(data),
                "--steps",
                "1",
                *flags,
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["model"]["dropout"] == 0.2 and config["translation"]["size_defaults"] is False
    assert config["model"]["d_model"] == 64 and config["translation"]["batch_size"] == 64
    assert "small corpus" not in err


def test_library_runs_take_the_sized_training_only_without_a_train_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = {"max_steps": 3, "max_minutes": None, "eval_every": 3, "keep_best": True}
    monkeypatch.setattr(translation_defaults, "sized_training", lambda n, b: dict(budget))
    data = tmp_path / "train.tsv"
    data.write_text("".join(f"item {i} red\tobjet {i} rouge\n" for i in range(40)))
    settings = TranslationConfig(data=str(data), valid_size=4)
    sized = train_translation(settings, None, tmp_path / "sized")
    assert sized.result.state.step == 3 and sized.training is not None
    assert sized.training.keep_best is True and sized.training.eval_every == 3
    own = TrainConfig(max_steps=2, eval_every=2, device="cpu")
    given = train_translation(settings, own, tmp_path / "given")
    assert given.result.state.step == 2 and given.training == own
