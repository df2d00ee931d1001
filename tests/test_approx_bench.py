"""`qkv bench approx` and benchmarks/approx_lab.py: the lab in --quick mode, the crossover rule
and the command line."""

from __future__ import annotations

from dataclasses import replace

import pytest

from helpers import load_benchmark, torch_threads
from qkv.bench.approx import EXACT, SPEED_METHODS, crossovers
from qkv.cli.main import build_parser, main

lab = load_benchmark("approx_lab")
TASK_METHODS, LabSizes, format_tables, run_lab = (
    lab.TASK_METHODS,
    lab.LabSizes,
    lab.format_tables,
    lab.run_lab,
)


@pytest.fixture(scope="module")
def quick_lab():
    # One thread: the lab's tiny calls only lose to thread start-up, and on a shared machine
    # a second thread mostly waits.
    with torch_threads(1):
        return run_lab(replace(LabSizes.quick(), speed_ns=(64,)))


@pytest.mark.slow
def test_quick_lab_runs_every_part(quick_lab):
    r = quick_lab
    # error: exact is its own reference; larger knobs approximate better on the same input
    synthetic = [row for row in r.error if row["source"].startswith("synthetic")]
    assert any(row["method"] == "exact" and row["rel_error"] == 0 for row in synthetic)
    for method in ("nystrom", "local"):
        errs = [row["rel_error"] for row in synthetic if row["method"] == method]
        assert len(errs) >= 2 and errs[-1] < errs[0], (method, errs)
    real = [row for row in r.error if row["source"].startswith("real")]
    assert real and all(row["rel_error"] >= 0 for row in real)
    kl = [row["row_kl"] for row in r.error if row["method"] == "performer"]
    assert all(x is not None and x >= 0 for x in kl)
    assert all(row["row_kl"] is None for row in r.error if row["method"] == "nystrom")
    # speed: every method at every N, timed
    assert {(row["method"], row["n"]) for row in r.speed} == {
        (m, 64) for m in (*EXACT, *SPEED_METHODS)
    }
    assert all(row["seconds"] > 0 for row in r.speed)
    assert set(r.crossover) == set(SPEED_METHODS)
    # task: every attention and seed; drop-in keeps exact's score as the baseline
    assert len(r.task) == len(TASK_METHODS) * r.sizes.seeds
    assert all(0.0 <= row["accuracy"] <= 1.0 and row["steps"] >= 1 for row in r.task)
    assert r.dropin[0]["method"] == "exact" and r.dropin[0]["change"] == 0.0
    text = format_tables(r)
    for title in ("Error vs exact", "Forward time vs N", "Crossover", "Task accuracy", "Drop-in"):
        assert title in text


def test_crossover_is_the_start_of_the_last_winning_run():
    def rows(method, times):
        return [
            {"method": method, "n": n, "seconds": t}
            for n, t in zip((1, 2, 4, 8), times, strict=True)
        ]

    table = [
        *rows("exact-auto", [1, 2, 4, 8]),
        *rows("exact-chunked", [2, 3, 5, 9]),
        *rows("a", [0.5, 3, 3, 4]),  # wins at 1, loses at 2, wins from 4
        *rows("b", [2, 3, 5, 9]),  # never
        *rows("c", [0.1, 0.1, 0.1, None]),  # failed at the largest N: no crossover
    ]
    assert crossovers(table) == {"a": 4, "b": None, "c": None}


def test_command_line(capsys):
    assert main(["bench", "approx", "--quick", "--parts", "speed", "--n", "32"]) == 0
    out = capsys.readouterr().out
    assert "| performer |" in out and "N=32" in out
    assert main(["bench", "approx", "--n", "12,x"]) == 2
    err = capsys.readouterr().err
    assert "--n must be comma-separated integers" in err and "Traceback" not in err
    assert main(["bench", "approx", "--quick", "--parts", "nope"]) == 2
    assert "--parts: unknown ['nope']" in capsys.readouterr().err
    # plain `qkv bench` still parses as before
    args = build_parser().parse_args(["bench", "--n", "64"])
    assert args.n == [64] and args.bench_kind is None
