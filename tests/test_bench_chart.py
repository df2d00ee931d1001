"""qkv bench's chart keeps one colour per backend across panels, and its progress names
the rows as the table does (``chunked+bm``)."""

from __future__ import annotations

from typing import Any

import pytest

from qkv.bench import BenchCase
from qkv.bench.report import backend_colours, bench_figure
from qkv.bench.run import BenchResult
from qkv.cli.main import main

pytest.importorskip("matplotlib")


def _result(backend: str, kind: str, n: int, *, prebuilt: bool = False) -> BenchResult:
    case = BenchCase(backend, kind, n, prebuilt=prebuilt)
    return BenchResult(case, seconds=1e-3 * n, peak_extra_bytes=1000 * n)


def test_a_backend_keeps_its_colour_in_every_panel() -> None:
    # the 'none' panel has no cpu rows, so per-panel colour cycling would shift cpu's colour
    results = [
        *(_result(b, "none", n) for b in ("sdpa", "reference") for n in (64, 128)),
        *(_result(b, "sliding_window", n) for b in ("sdpa", "cpu") for n in (64, 128)),
        *(_result("chunked", "sliding_window", n, prebuilt=True) for n in (64, 128)),
    ]
    colours = backend_colours(results)
    assert list(colours) == ["sdpa", "reference", "cpu", "chunked+bm"]
    assert len(set(colours.values())) == 4
    fig = bench_figure(results)
    seen: dict[str, set[Any]] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            seen.setdefault(line.get_label(), set()).add(line.get_color())
    assert {label: next(iter(c)) for label, c in seen.items()} == colours
    assert all(len(c) == 1 for c in seen.values()), seen


def test_progress_names_block_mask_rows(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import qkv.bench

    def fake_sweep(cases: list[BenchCase], *, on_result: Any, **_: object) -> list[BenchResult]:
        results = [BenchResult(c, seconds=1e-3, gflops=1.0) for c in cases]
        for r in results:
            on_result(r)
        return results

    monkeypatch.setattr(qkv.bench, "run_sweep", fake_sweep)
    argv = ["bench", "--n", "64", "--masks", "documents", "--modes", "fwd", "--backends"]
    assert main([*argv, "chunked"]) == 0
    err = capsys.readouterr().err
    assert "chunked+bm documents N=64 fwd" in err and "chunked documents N=64 fwd" in err
