"""benchmarks/length_experiment.py: its tables, and the whole pipeline at a toy size."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from helpers import load_benchmark, torch_threads


@pytest.fixture(scope="module")
def experiment() -> Iterator[ModuleType]:
    yield load_benchmark("length_experiment")
    sys.modules.pop("length_experiment", None)


def _result(name: str, buckets: list[tuple[int, int, int]], rng: random.Random) -> dict[str, Any]:
    by_length = [
        {"low": lo, "high": hi, "count": n, "bleu": 0.0, "chrf": 100 * rng.random(),
         "exact_match": rng.random()}
        for lo, hi, n in buckets
    ]  # fmt: skip
    total = sum(n for _, _, n in buckets)
    exact = sum(b["exact_match"] * b["count"] for b in by_length) / total
    return {
        "name": name,
        "parameters": rng.randrange(10**5, 10**6),
        "steps": rng.randrange(1, 5000),
        "train_seconds": 100 * rng.random(),
        "scores": {"count": total, "bleu": 0.0, "chrf": 50.0, "exact_match": exact,
                   "by_length": by_length},
    }  # fmt: skip


def test_markdown_tables_rows_follow_the_buckets(experiment: ModuleType) -> None:
    rng = random.Random(7)
    buckets = [(3, 20, 11), (21, 47, 9), (48, 130, 13)]
    results = [_result(name, buckets, rng) for name in ("a", "b model", "c")]
    text = experiment.markdown_tables(results)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "-" in line[:12]]
    bucket_rows = [r for r in rows if r.split("|")[1].strip()[0].isdigit()]
    assert len(bucket_rows) == len(buckets)
    for row, (lo, hi, n) in zip(bucket_rows, buckets, strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:2] == [f"{lo}-{hi}", str(n)]
        i = buckets.index((lo, hi, n))
        expected_em = [f"{100 * r['scores']['by_length'][i]['exact_match']:.1f}%" for r in results]
        expected_chrf = [f"{r['scores']['by_length'][i]['chrf']:.1f}" for r in results]
        assert cells[2:] == expected_em + expected_chrf
    for r in results:
        assert f"| {r['name']} | {r['parameters']:,} | {r['steps']:,} |" in text


def test_markdown_tables_refuse_different_buckets(experiment: ModuleType) -> None:
    rng = random.Random(0)
    a = _result("a", [(1, 10, 5), (11, 30, 5)], rng)
    b = _result("b", [(1, 12, 5), (13, 30, 5)], rng)
    with pytest.raises(ValueError, match="other buckets"):
        experiment.markdown_tables([a, b])
    assert experiment.markdown_tables([]) == ""


def test_models_have_similar_parameter_counts(experiment: ModuleType) -> None:
    """The comparison's premise: the three models are about the same size."""
    pytest.importorskip("tokenizers")
    from qkv.models import build_model
    from qkv.tasks.translation import build_translation_model

    side = SimpleNamespace(vocab_size=300)  # what build_translation_model reads
    sized = SimpleNamespace(source=side, target=side, shared=True)
    args = experiment.parse_args(["--steps", "1"])
    counts = []
    for spec in experiment.MODELS:
        config, _ = experiment._configs(args, spec)
        model, as_dict = build_translation_model(config, sized)
        assert sum(p.numel() for p in build_model(as_dict).parameters()) == sum(
            p.numel() for p in model.parameters()
        )
        counts.append(sum(p.numel() for p in model.parameters()))
    assert max(counts) < 1.25 * min(counts), counts
    attention = [s.attention for s in experiment.MODELS]
    assert attention == ["none", "bahdanau", None]


def test_toy_run_writes_json_table_and_plot(experiment: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    pytest.importorskip("sacrebleu")
    pytest.importorskip("matplotlib")
    pytest.importorskip("num2words")
    with torch_threads(1):
        args = experiment.parse_args(
            ["--steps", "2", "--n-train", "64", "--n-test", "48", "--max-digits", "4",
             "--buckets", "3", "--vocab-size", "60", "--out", str(tmp_path)]
        )  # fmt: skip
        report = experiment.run_experiment(args)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(report))
    results = saved["results"]
    assert [r["name"] for r in results] == [s.name for s in experiment.MODELS]
    assert all(r["steps"] == 2 and r["scores"]["count"] == 48 for r in results)
    buckets = [[(b["low"], b["high"]) for b in r["scores"]["by_length"]] for r in results]
    assert buckets[0] == buckets[1] == buckets[2] and len(buckets[0]) == 3
    assert sum(b["count"] for b in results[0]["scores"]["by_length"]) == 48
    assert (tmp_path / "table.md").read_text() == experiment.markdown_tables(results)
    assert (tmp_path / "by_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
