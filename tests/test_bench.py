"""`qkv bench` runs end to end and writes its files (a smoke run, not a measurement)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qkv.bench import BenchCase
from qkv.bench.measure import attended_pairs
from qkv.cli.main import main


def test_attended_pairs_counts_only_unmasked_work() -> None:
    n = 100
    assert attended_pairs(BenchCase("sdpa", "none", n, batch=2, heads=3)) == 2 * 3 * n * n
    assert (
        attended_pairs(BenchCase("sdpa", "causal", n, batch=2, heads=3)) == 2 * 3 * n * (n + 1) // 2
    )
    window = BenchCase("sdpa", "sliding_window", n, heads=1, window=10)
    assert attended_pairs(window) == sum(min(i + 1, 10) for i in range(n))
    docs = BenchCase("sdpa", "documents", n, heads=1, documents=4)
    assert attended_pairs(docs) == 4 * 25 * 25


def test_bench_smoke_writes_table_json_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "bench",
        "--n",
        "32",
        "--masks",
        "none,causal",
        "--backends",
        "sdpa,reference",
        "--modes",
        "fwd",
        "--heads",
        "2",
        "--head-dim",
        "8",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "x sdpa" in captured.out and "4/4" in captured.err
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert len(rows) == 4 and all(r["error"] is None and r["seconds"] > 0 for r in rows)
    assert {r["ratio_to_sdpa"] for r in rows if r["backend"] == "sdpa"} == {1.0}
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_bench_prebuilds_dense_masks_for_sdpa_and_block_masks_for_chunked(tmp_path: Path) -> None:
    argv = [
        "bench",
        "--n",
        "40",
        "--masks",
        "sliding_window,relative_bias",
        "--backends",
        "sdpa,chunked",
        "--modes",
        "fwd+bwd",
        "--heads",
        "2",
        "--head-dim",
        "8",
        "--window",
        "8",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    labels = [(r["mask_kind"], r["backend"], r["prebuilt"]) for r in rows]
    assert labels == [
        ("sliding_window", "sdpa", True),
        ("sliding_window", "chunked", False),
        ("sliding_window", "chunked", True),
        ("relative_bias", "sdpa", True),
        ("relative_bias", "chunked", False),
    ]
    assert all(r["error"] is None and r["ratio_to_sdpa"] > 0 for r in rows)
    # SDPA was handed the dense bool mask (40 x 40 bytes) and the dense float bias (2 x 40 x 40).
    assert [r["given_bytes"] for r in rows if r["backend"] == "sdpa"] == [1600, 2 * 1600 * 4]
