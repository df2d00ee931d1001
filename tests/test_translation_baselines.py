"""Copy-the-source and retrieval baselines beside a translation model's scores."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from qkv.cli.main import main
from qkv.tasks.translation import TranslationConfig, train_translation
from qkv.tasks.translation_baselines import (
    baseline_verdict,
    format_baselines,
    retrieve_targets,
    translation_baselines,
)
from qkv.train import TrainConfig

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")
sacrebleu = pytest.importorskip("sacrebleu")

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "omicron",
    "sigma",
]


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)]


def brute_force(queries: list[str], pairs: list[tuple[str, str]]) -> list[str]:
    """The target of the training source with the highest sentence chrF, over all of them."""
    out = []
    for q in queries:
        scores = [sacrebleu.sentence_chrf(s, [q]).score for s, _ in pairs]
        out.append(pairs[scores.index(max(scores))][1])
    return out


def test_retrieval_matches_an_exhaustive_chrf_search() -> None:
    train = sentences(60, seed=1)
    pairs = [(s, f"target {i}") for i, s in enumerate(train)]
    queries = sentences(25, seed=2)
    assert retrieve_targets(queries, pairs, shortlist=len(pairs)) == brute_force(queries, pairs)
    # The n-gram shortlist keeps the chrF winner for (almost) every query on such data.
    shortlisted = retrieve_targets(queries, pairs)
    assert sum(a == b for a, b in zip(shortlisted, brute_force(queries, pairs), strict=True)) >= 23


def test_retrieval_finds_a_training_source_again() -> None:
    pairs = [(s, s.upper()) for s in sentences(200, seed=3)]
    picked = [pairs[i] for i in (5, 77, 150)]
    assert retrieve_targets([s for s, _ in picked], pairs) == [t for _, t in picked]
    with pytest.raises(ValueError, match="training pairs"):
        retrieve_targets(["a"], [])
    with pytest.raises(ValueError, match="shortlist must be >= 1, got 0"):
        retrieve_targets(["a"], pairs, shortlist=0)


def test_baselines_scores_and_verdict() -> None:
    sources = ["the cat sat", "a dog ran far", "bird on the wire"]
    references = ["the cat sat", "a dog ran away", "a bird on a wire"]
    train = [("the dog ran far", "x y"), ("bird on the wire", "a bird on a wire")]
    result = translation_baselines(sources, references, train, num_buckets=1)
    copy = sacrebleu.corpus_chrf(sources, [references]).score
    assert result["copy"]["chrf"] == pytest.approx(copy)
    assert result["copy"]["exact_match"] == pytest.approx(1 / 3)
    assert result["retrieval"]["exact_match"] == pytest.approx(1 / 3)  # the third pair only
    assert "retrieval" not in translation_baselines(sources, references, None)

    worse = {"bleu": 1.0, "chrf": 90.0, "exact_match": 0.0, "baselines": result}
    verdict = baseline_verdict(worse, result)
    assert verdict is not None and verdict.startswith("the model does not beat the copy")
    assert "BLEU 1.00" in verdict and "chrF" not in verdict.split("retrieval")[0]
    better = {"bleu": 99.0, "chrf": 99.0, "exact_match": 1.0, "baselines": result}
    assert baseline_verdict(better, result) is None
    lines = format_baselines(worse)
    assert [line.split()[0] for line in lines[1:4]] == ["model", "copy", "retrieval"]
    assert lines[-1].startswith("  warning: the model does not beat")
    assert not any("warning" in line for line in format_baselines(better))


def test_cli_evaluate_prints_and_carries_the_baselines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdef") for _ in range(4)) for _ in range(24)]
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        (data / f"{split}.tsv").write_text("".join(f"{w}\t{w[::-1]}\n" for w in words))
    tiny = {"d_model": 16, "num_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1}
    config = TranslationConfig(data=str(data), tokenizer="char", model_overrides=tiny)
    torch.manual_seed(0)
    training = TrainConfig(max_steps=2, eval_every=2, device="cpu")
    train_translation(config, training, tmp_path / "model")
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    baselines = report["metrics"]["baselines"]
    # Evaluated on its own training pairs: retrieval finds every reference.
    assert baselines["retrieval"]["exact_match"] == 1.0
    assert baselines["copy"]["exact_match"] == 0.0  # no 4-letter word here is a palindrome
    assert main(["evaluate", "--model", str(tmp_path / "model")]) == 0
    table = capsys.readouterr().out
    assert "retrieval baseline" in table and "copy baseline" in table
    assert "warning: the model does not beat the" in table  # two steps learn nothing
