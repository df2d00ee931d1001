"""The speed part of ``qkv bench approx``: forward time and peak extra memory vs N.

Each case (one method at one N) runs in a fresh process (``python -m qkv.bench.approx_speed
CASE_JSON``), so its peak resident memory is its own: the largest resident set seen during the
first call minus the one before it. The time is the median of ``repeats`` calls after that
one. Exact attention through ``auto`` and through ``chunked`` are the peers; the crossover of
an approximation is the N from which it is faster than both.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

import qkv
from qkv.approx import APPROXIMATIONS, make_attention

__all__ = [
    "EXACT",
    "SPEED_METHODS",
    "crossovers",
    "gaussian",
    "measure_case",
    "speed_rows",
    "speed_tables",
]

#: The exact peers every approximation is timed against.
EXACT = ("exact-auto", "exact-chunked")
#: Approximations timed vs N, with their settings (each registry entry's ``speed``).
SPEED_METHODS: dict[str, dict[str, Any]] = {
    name: dict(entry.speed) for name, entry in APPROXIMATIONS.items()
}


def _call(name: str, n: int, head_dim: int, **options: Any) -> Callable[..., Tensor]:
    """``fn(q, k, v, mask=None) -> out`` for ``name`` (an approximation or an exact peer)."""
    if name == "exact-auto":
        return lambda q, k, v, mask=None: qkv.attention(q, k, v, mask=mask)
    if name == "exact-chunked":
        return lambda q, k, v, mask=None: qkv.attention(q, k, v, mask=mask, backend="chunked")
    options = APPROXIMATIONS[name].options_for_length(n, options)
    fn = make_attention(name, head_dim=head_dim, **options)
    return lambda q, k, v, mask=None: fn(q, k, v, mask=mask)


def gaussian(n: int, heads: int, head_dim: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Standard normal ``q, k, v (1, heads, n, head_dim)`` from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, n, head_dim, generator=g) for _ in range(3))  # type: ignore[return-value]


def _current_rss_bytes() -> int | None:
    """This process's resident set now (Linux ``/proc``), or None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_during(fn: Callable[[], Any]) -> int | None:
    """Largest resident set seen while ``fn()`` runs, sampled every 0.5 ms by a thread (torch
    releases the GIL in its kernels). ``ru_maxrss`` cannot serve: importing torch sets a
    high-water mark that the calls here stay under."""
    if _current_rss_bytes() is None:
        return None
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _current_rss_bytes() or 0)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return peak


def measure_case(case: dict[str, Any]) -> dict[str, Any]:
    """Peak extra memory and time of one forward call of ``case["method"]`` at ``case["n"]``.

    Memory comes first, from the first call in the process: the largest resident set seen
    during it minus the resident set before it (the inputs are in the baseline). Measured
    after other calls it would read low, as the allocator keeps their freed pages. Then the
    time: the median of ``case["repeats"]`` calls after that one. Run in a fresh process by
    :func:`speed_rows`."""
    torch.manual_seed(0)
    q, k, v = gaussian(case["n"], case["heads"], case["head_dim"])
    fn = _call(case["method"], case["n"], case["head_dim"], **case.get("options", {}))
    with torch.no_grad():
        gc.collect()
        baseline = _current_rss_bytes()
        peak = _peak_rss_during(lambda: fn(q, k, v))  # also the warm-up
        times = []
        for _ in range(case["repeats"]):
            start = time.perf_counter()
            fn(q, k, v)
            times.append(time.perf_counter() - start)
    extra = None if peak is None or baseline is None else max(0, peak - baseline)
    return {"seconds": statistics.median(times), "peak_extra_bytes": extra}


def speed_rows(sizes: Any, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Time and memory of the exact peers and every approximation at every N of ``sizes``."""
    rows = []
    methods = [*EXACT, *SPEED_METHODS]
    for n in sizes.speed_ns:
        for method in methods:
            case = {
                "method": method,
                "n": n,
                "heads": sizes.heads,
                "head_dim": sizes.head_dim,
                "repeats": sizes.repeats,
                "options": SPEED_METHODS.get(method, {}),
            }
            if progress:
                progress(f"speed {method} N={n}")
            if sizes.isolate:
                rows.append({**case, **_in_subprocess(case, sizes.timeout_s)})
            else:
                rows.append({**case, **measure_case(case), "peak_extra_bytes": None})
    return rows


def _in_subprocess(case: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    try:
        done = subprocess.run(
            [sys.executable, "-m", "qkv.bench.approx_speed", json.dumps(case)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=dict(os.environ),
        )
    except subprocess.TimeoutExpired:
        return {"seconds": None, "peak_extra_bytes": None, "error": f"over {timeout_s:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"seconds": None, "peak_extra_bytes": None, "error": last}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def crossovers(rows: Sequence[dict[str, Any]]) -> dict[str, int | None]:
    """Per approximation, the smallest N from which it is faster than both exact peers at that
    N and at every larger N measured; None if it never is."""
    by = {(r["method"], r["n"]): r.get("seconds") for r in rows}
    ns = sorted({r["n"] for r in rows})
    out: dict[str, int | None] = {}
    for method in sorted({r["method"] for r in rows} - set(EXACT)):
        wins = []
        for n in ns:
            mine = by.get((method, n))
            peers = [by.get((p, n)) for p in EXACT]
            known = [p for p in peers if p is not None]
            wins.append(mine is not None and bool(known) and mine < min(known))
        start = None
        for i in range(len(ns) - 1, -1, -1):
            if not wins[i]:
                break
            start = ns[i]
        out[method] = start
    return out


def _mib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def speed_tables(result: Any) -> list[str]:
    """Markdown tables of the speed part: time, peak memory and the crossovers."""
    rows = result.speed
    ns = sorted({r["n"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["n"]): r for r in rows}
    s = result.sizes
    head = "| method | " + " | ".join(f"N={n}" for n in ns) + " |"
    rule = "|---|" + "---|" * len(ns)
    out = [
        "### Forward time vs N (ms)",
        "",
        f"B=1, H={s.heads}, D={s.head_dim}, float32, CPU, median of {s.repeats}; each case in "
        f"a fresh process; ratio to the faster exact peer in brackets",
        "",
        head,
        rule,
    ]
    for m in methods:
        cells = []
        for n in ns:
            sec = by[(m, n)].get("seconds")
            peers = [by[(p, n)].get("seconds") for p in EXACT if (p, n) in by]
            best = min((p for p in peers if p is not None), default=None)
            if sec is None:
                cells.append(by[(m, n)].get("error", "-")[:30])
            elif m in EXACT or best is None:
                cells.append(f"{1e3 * sec:.1f}")
            else:
                cells.append(f"{1e3 * sec:.1f} ({sec / best:.2f}x)")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out += ["", "### Peak extra memory vs N (MiB, resident set growth)", "", head, rule]
    for m in methods:
        out.append(
            f"| {m} | " + " | ".join(_mib(by[(m, n)].get("peak_extra_bytes")) for n in ns) + " |"
        )
    out += ["", "### Crossover: faster than both exact peers from N = ", ""]
    out += ["| method | from N |", "|---|---|"]
    for m, n in result.crossover.items():
        out.append(f"| {m} | {n if n is not None else 'never (up to ' + str(ns[-1]) + ')'} |")
    out.append("")
    return out


def main(argv: list[str]) -> int:
    """``python -m qkv.bench.approx_speed CASE_JSON``: measure one speed case, print JSON."""
    print(json.dumps(measure_case(json.loads(argv[0]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
