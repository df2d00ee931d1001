"""Run a sweep: each case in its own process (CPU) or in this one (CUDA), then ratios to SDPA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from qkv.bench.cases import BenchCase
from qkv.bench.measure import attended_pairs, flops, measure


@dataclass
class BenchResult:
    """A measured case. ``error`` is set instead of the figures when the case failed or ran out
    of time or memory."""

    case: BenchCase
    seconds: float | None = None
    peak_extra_bytes: int | None = None
    estimated_bytes: int | None = None
    given_bytes: int | None = None
    gflops: float | None = None
    ratio_to_sdpa: float | None = None
    matmul_share: float | None = None
    first_seconds: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            **self.case.to_json(),
            "seconds": self.seconds,
            "peak_extra_bytes": self.peak_extra_bytes,
            "estimated_bytes": self.estimated_bytes,
            "given_bytes": self.given_bytes,
            "gflops": self.gflops,
            "ratio_to_sdpa": self.ratio_to_sdpa,
            "matmul_share": self.matmul_share,
            "first_seconds": self.first_seconds,
            "error": self.error,
        }


def _measure_in_subprocess(case: BenchCase, timeout_s: float) -> dict[str, Any]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)),
    }
    done = subprocess.run(
        [sys.executable, "-m", "qkv.bench.measure", json.dumps(case.to_json())],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise RuntimeError(last)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run_sweep(
    cases: Iterable[BenchCase],
    *,
    timeout_s: float = 600.0,
    on_result: Callable[[BenchResult], None] | None = None,
) -> list[BenchResult]:
    """Measure every case; a failure (out of memory, time-out, unsupported) is recorded, not
    raised. Returns the results with GFLOP/s and each backend's time ratio to SDPA filled in."""
    results: list[BenchResult] = []
    pairs_cache: dict[tuple[Any, ...], int] = {}
    for case in cases:
        result = BenchResult(case)
        try:
            figures = (
                measure(case)
                if case.device.startswith("cuda")
                else _measure_in_subprocess(case, timeout_s)
            )
            result.seconds = figures["seconds"]
            result.peak_extra_bytes = figures["peak_extra_bytes"]
            result.estimated_bytes = figures["estimated_bytes"]
            result.given_bytes = figures.get("given_bytes", 0)
            result.first_seconds = figures.get("first_seconds")
            key = (
                case.mask_kind,
                case.seq_len,
                case.batch,
                case.heads,
                case.window,
                case.documents,
            )
            if key not in pairs_cache:
                pairs_cache[key] = attended_pairs(case)
            result.gflops = flops(case, pairs_cache[key]) / figures["seconds"] / 1e9
        except subprocess.TimeoutExpired:
            result.error = f"timed out after {timeout_s:.0f} s"
        except (RuntimeError, ValueError, MemoryError) as error:
            result.error = str(error)[:200]
        results.append(result)
        if on_result is not None:
            on_result(result)
    _fill_ratios(results)
    return results


def fill_matmul_share(results: list[BenchResult], matmul_tflops: float) -> None:
    """Each result's rate as a fraction of a matmul rate measured in the same run
    (:func:`qkv.bench.peers.matmul_tflops`)."""
    for r in results:
        if r.gflops is not None:
            r.matmul_share = r.gflops / 1e3 / matmul_tflops


def _fill_ratios(results: list[BenchResult]) -> None:
    """Time of each backend divided by SDPA's time on the same case (> 1 means slower)."""
    sdpa = {
        _row_key(r.case): r.seconds
        for r in results
        if r.case.backend == "sdpa" and r.seconds is not None
    }
    for r in results:
        base = sdpa.get(_row_key(r.case))
        if base and r.seconds is not None:
            r.ratio_to_sdpa = r.seconds / base


def _row_key(case: BenchCase) -> tuple[Any, ...]:
    """A table row: every field but the backend and whether its mask was prebuilt."""
    return tuple(v for k, v in case.to_json().items() if k not in ("backend", "prebuilt"))
