"""Choices sized to a small translation corpus, each said with its reason and each a flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qkv.cli.main import main
from qkv.tasks.translation import TranslationConfig
from qkv.tasks.translation_defaults import SMALL_CORPUS, size_to_data, suggested_steps

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")


def test_a_small_corpus_gets_a_small_vocabulary_and_more_dropout() -> None:
    settings, overrides, notes = size_to_data(TranslationConfig(data="x.tsv"), 500)
    assert settings.vocab_size == 1000 and overrides == {"dropout": 0.3}
    assert notes[0].startswith("a small corpus (500 training pairs)")
    text = "\n".join(notes)
    for flag in ("--vocab-size", "--dropout", "--separate-vocab", "--copy", "--steps"):
        assert flag in text
    assert size_to_data(TranslationConfig(data="x.tsv"), 2000)[0].vocab_size == 4000
    assert size_to_data(TranslationConfig(data="x.tsv"), 9000)[0].vocab_size == 8000


def test_choices_the_user_made_are_kept() -> None:
    given = TranslationConfig(data="x.tsv", vocab_size=300, model_overrides={"dropout": 0.05})
    settings, overrides, notes = size_to_data(given, 500)
    assert settings == given and overrides == {}
    assert not any("vocabulary 300" in n or "dropout 0.3" in n for n in notes)
    chars = TranslationConfig(data="x.tsv", tokenizer="char")
    assert size_to_data(chars, 500)[0].vocab_size is None  # characters need no vocabulary size
    off = TranslationConfig(data="x.tsv", size_defaults=False)
    assert size_to_data(off, 500) == (off, {}, [])
    assert size_to_data(TranslationConfig(data="x.tsv"), SMALL_CORPUS)[2] == []


def test_suggested_steps_are_bounded() -> None:
    assert suggested_steps(100, 64) == 1000
    assert suggested_steps(2000, 64) == 1900  # 60 passes of 32 batches
    assert suggested_steps(100_000, 64) == 8000


def test_cli_prints_the_choices_and_every_one_is_a_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "train.tsv"
    data.write_text("".join(f"item {i} blue\tobjet {i} bleu\n" for i in range(60)))
    argv = ["train", "translation", "--data", str(data), "--steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "a small corpus (" in err and "BPE vocabulary 500" in err and "dropout 0.3" in err
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["model"]["dropout"] == 0.3 and config["translation"]["vocab_size"] == 500
    assert config["translation"]["model_overrides"] == {}  # resuming with the same flags is fine
    assert main([*argv, "--out", str(tmp_path / "a"), "--resume", "--steps", "2"]) == 0
    capsys.readouterr()
    flags = ["--no-size-defaults", "--dropout", "0.1", "--vocab-size", "600"]
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
    assert config["model"]["dropout"] == 0.1 and config["translation"]["size_defaults"] is False
    assert "small corpus" not in err
