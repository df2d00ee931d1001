"""A translation memory as extra input (neural fuzzy repair, ``--memory``)."""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import torch_threads
from qkv.cli.main import main
from qkv.tasks.translation import TranslationConfig, Translator, train_translation
from qkv.tasks.translation_baselines import nearest_sources
from qkv.tasks.translation_memory import (
    MEMORY_FILE,
    SEPARATOR,
    TranslationMemory,
    memory_input,
)
from qkv.train import TrainConfig
from qkv.train.checkpoint import ModelFolderError
from toys import TINY

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")
pytest.importorskip("sacrebleu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def letters(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def grouped(groups: int, names: int, seed: int) -> list[list[tuple[str, str]]]:
    """Per group, ``names`` pairs ``"KEY name" -> "phrase name"``: the phrase of a group is
    random, so only a pair of the same group (a fuzzy match: the same key) tells it."""
    rng = random.Random(seed)
    upper, lower = string.ascii_uppercase, "abcdefghijklm"
    out = []
    for _ in range(groups):
        key, phrase = letters(rng, upper, 6), letters(rng, lower, 8)
        group = []
        for _ in range(names):
            name = letters(rng, "nopqrstuvwxyz", 4)
            group.append((f"{key} {name}", f"{phrase} {name}"))
        out.append(group)
    return out


# --- the retrieval ------------------------------------------------------------------------------


def test_leave_one_out_never_returns_the_pair_itself() -> None:
    rng = random.Random(0)
    sources = [letters(rng, "abcdef ", rng.randint(8, 30)) for _ in range(80)]
    sources += sources[:5]  # duplicates: another pair with the same source may be returned
    found = nearest_sources(sources, sources, exclude=list(range(len(sources))))
    assert all(i != j for j, (i, _) in enumerate(found))
    assert all(0 <= i < len(sources) for i, _ in found)
    for j in range(5):  # the duplicate is the best other source: chrF 100
        assert found[j] == (80 + j, 100.0) and found[80 + j] == (j, 100.0)
    # without the exclusion each source finds itself (or its twin, an earlier index)
    assert [i for i, _ in nearest_sources(sources[:80], sources)] == list(range(80))
    assert nearest_sources(["abc"], ["abc"], exclude=[0]) == [(-1, 0.0)]

    memory = TranslationMemory.from_pairs([(s, f"target {i}") for i, s in enumerate(sources)])
    inputs = memory.training_inputs()
    for i, text in enumerate(inputs):
        source, separator, match = text.partition(SEPARATOR)
        assert source == sources[i] and separator == SEPARATOR
        assert match != f"target {i}"


def test_threshold_leaves_weak_matches_out() -> None:
    pairs = [("the cat sat on the mat", "le chat"), ("a dog ran far away", "un chien")]
    memory = TranslationMemory.from_pairs(pairs, threshold=50.0)
    assert memory.inputs(["the cat sat on a mat", "zzzz"]) == [
        "the cat sat on a mat" + SEPARATOR + "le chat",
        "zzzz",
    ]
    (_, strong), (none, weak) = memory.matches(["the cat sat on a mat", "zzzz"])
    assert strong >= 50.0 and none is None and weak < 50.0
    assert memory_input("x", None) == "x"


def test_bad_inputs_are_refused_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="a translation memory needs pairs; got none"):
        TranslationMemory(())
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 100\] \(a chrF\), got 150"):
        TranslationMemory((("a", "b"),), threshold=150)
    with pytest.raises(ValueError, match=r"pairs\[1\] must be a \(source, target\) pair"):
        TranslationMemory((("a", "b"), ("c", 3)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"memory_threshold must be in \[0, 100\].*got -1"):
        TranslationConfig(memory=True, memory_threshold=-1)
    with pytest.raises(ValueError, match=r"memory_threshold=30 \(--memory-threshold\).*--memory"):
        TranslationConfig(memory=False, memory_threshold=30)
    with pytest.raises(ValueError, match="exclude has 1 entries for 2 queries"):
        nearest_sources(["a", "b"], ["a", "b"], exclude=[0])
    memory = TranslationMemory.from_pairs([("a b", "c d"), ("e f", "g h")])
    with pytest.raises(ValueError, match="leave_one_out needs the memory's own 2 sources"):
        memory.matches(["a"], leave_one_out=True)
    with pytest.raises(FileNotFoundError, match=MEMORY_FILE):
        TranslationMemory.load(Path("/nonexistent-folder"))


# --- through the task ---------------------------------------------------------------------------


def write_data(folder: Path, train: list[tuple[str, str]], test: list[tuple[str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, pairs in (("train", train), ("validation", test), ("test", test)):
        (folder / f"{split}.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    return folder


def settings(data: Path, *, memory: bool, copy: bool = False) -> TranslationConfig:
    return TranslationConfig(
        data=str(data),
        tokenizer="char",
        model_overrides=TINY,
        memory=memory,
        copy=copy,
        label_smoothing=0.0,
        metric="exact_match",
        batch_size=32,
        valid_size=32,
    )


def test_memory_is_saved_with_the_model_and_resumed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    groups = grouped(12, 3, seed=1)
    train = [p for g in groups for p in g[:2]]
    test = [g[2] for g in groups]
    data = write_data(tmp_path / "data", train, test)
    config = settings(data, memory=True, copy=True)

    def training(steps: int) -> TrainConfig:
        return TrainConfig(max_steps=steps, eval_every=6, warmup_steps=2, device="cpu")

    whole = train_translation(config, training(12), tmp_path / "whole")
    assert whole.settings.memory is True
    saved = json.loads((tmp_path / "whole" / MEMORY_FILE).read_text())
    assert [tuple(p) for p in saved["pairs"]] == train
    loaded = Translator.load(tmp_path / "whole", device="cpu")
    assert loaded.memory == TranslationMemory.from_pairs(train)
    assert loaded.tokenizer.source.hf.token_to_id(SEPARATOR) is not None
    # the same model with the memory built again from the data translates alike
    again = Translator(
        loaded.model, loaded.tokenizer, loaded.config, memory=TranslationMemory.from_pairs(train)
    )
    sources = [s for s, _ in test]
    assert loaded.translate(sources) == again.translate(sources)
    assert loaded.translate(sources, beam_size=3) == again.translate(sources, beam_size=3)
    weights, source_labels, _ = loaded.attention(sources[0])
    assert SEPARATOR in source_labels and weights.shape[1] == len(source_labels)
    # a run resumed from its folder keeps its memory and its loss curve
    train_translation(config, training(6), tmp_path / "split")
    resumed = train_translation(config, training(12), tmp_path / "split", resume=True)
    assert resumed.result.state.losses == whole.result.state.losses
    # the folder alone: qkv evaluate, with the retrieval baseline from the saved memory
    (tmp_path / "whole-copy").mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", MEMORY_FILE):
        (tmp_path / "whole-copy" / name).write_bytes((tmp_path / "whole" / name).read_bytes())
    (data / "train.tsv").unlink()
    capsys.readouterr()
    args = ["evaluate", "--model", str(tmp_path / "whole-copy"), "--data", str(data / "test.tsv")]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "retrieval" in report["metrics"]["baselines"]
    (tmp_path / "whole-copy" / MEMORY_FILE).unlink()
    with pytest.raises(ModelFolderError, match="no translation memory saved here"):
        Translator.load(tmp_path / "whole-copy")
    with pytest.raises(ValueError, match="memory is None but the model was trained with memory"):
        Translator(loaded.model, loaded.tokenizer, loaded.config)


def test_cli_memory_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_data(tmp_path / "data", grouped(4, 2, seed=2)[0] * 4, grouped(1, 2, seed=3)[0])
    base = ["train", "translation", "--data", str(data), "--tokenizer", "char", "--steps", "2"]
    assert main([*base, "--memory", "--no-memory", "--out", str(tmp_path / "a")]) == 2
    assert "--memory and --no-memory contradict each other" in capsys.readouterr().err
    assert main([*base, "--memory", "--memory-threshold", "20", "--out", str(tmp_path / "b")]) == 0
    saved = json.loads((tmp_path / "b" / "config.json").read_text())["translation"]
    assert saved["memory"] is True and saved["memory_threshold"] == 20.0
    assert main([*base, "--no-memory", "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    assert main([*base, "--memory-threshold", "20", "--out", str(tmp_path / "d")]) == 2
    assert "add memory=True (--memory)" in capsys.readouterr().err
    assert not (tmp_path / "c" / MEMORY_FILE).exists()


@pytest.mark.slow
def test_memory_model_repairs_a_match_that_the_plain_model_cannot(tmp_path: Path) -> None:
    """Each group's phrase is random: a model sees it for a new name only in the memory (the
    target of another pair of the group), the name only in the source."""
    groups = grouped(60, 4, seed=4)
    train = [p for g in groups for p in g[:3]]
    test = [g[3] for g in groups]
    data = write_data(tmp_path / "data", train, test)
    training = TrainConfig(
        lr=5e-3, warmup_steps=10, max_steps=300, eval_every=300, schedule="cosine", device="cpu"
    )
    scores = {}
    for memory in (True, False):
        train_translation(
            settings(data, memory=memory, copy=True), training, tmp_path / f"{memory}"
        )
        translator = Translator.load(tmp_path / f"{memory}", device="cpu")
        hypotheses = translator.translate([s for s, _ in test])
        scores[memory] = sum(h == t for h, (_, t) in zip(hypotheses, test, strict=True)) / len(test)
    assert scores[True] >= 0.8, scores
    assert scores[False] <= 0.2, scores
