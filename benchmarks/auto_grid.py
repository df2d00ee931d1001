"""Is ``auto`` the fastest exact backend? The CPU grid, timed interleaved in one process.

For every case (mask kind x N x dtype x pass) each exact backend that can serve it runs in
round-robin with ``auto`` (so a busy machine slows them alike); a backend more than 1.5x slower
than the best in the warm-up round is dropped from the timed rounds (it cannot be the fastest).
A sample of a call under 0.1 s is the mean of enough calls to last about 0.1 s. Prints, per
case, the median of every backend, which one ``auto`` picked, and ``auto`` over the fastest: the
target is <= 1.02. ``--estimates`` adds the cost model's estimates beside them.

    python benchmarks/auto_grid.py                              # the whole grid (long)
    python benchmarks/auto_grid.py --n 4096 --dtypes float32 --rounds 3
    python benchmarks/auto_grid.py --n 16384 --rounds 2 --skip chunked
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import qkv
from qkv import masks, scores
from qkv.backends import get_backend
from qkv.backends.cost import estimate_seconds
from qkv.request import build_request

KINDS = ("none", "causal", "window", "documents", "alibi", "relative")
BACKENDS = ("sdpa", "cpu", "chunked", "reference")
B, H, D = 1, 8, 64
SAMPLE_SECONDS = 0.1
MAX_REPEATS = 50


def case_kwargs(kind: str, n: int) -> dict[str, Any]:
    if kind == "causal":
        return {"causal": True}
    if kind == "window":
        return {"mask": masks.sliding_window(255), "causal": True}
    if kind == "documents":
        return {"mask": masks.document(torch.arange(n) * 16 // n)}
    if kind == "alibi":
        return {"bias": scores.alibi(H), "causal": True}
    if kind == "relative":
        rel = scores.RelativePositionBias(H, max_distance=128)
        torch.nn.init.normal_(rel.table, std=0.1)
        return {"bias": rel}
    return {}


def call_of(
    backend: str, q: Tensor, k: Tensor, v: Tensor, kwargs: dict[str, Any], grad: Tensor | None
) -> Callable[[], None]:
    def run() -> None:
        out = qkv.attention(q, k, v, backend=backend, **kwargs)
        if grad is not None:
            out.backward(grad)

    return run


def able(name: str, q: Tensor, k: Tensor, v: Tensor, kwargs: dict[str, Any]) -> bool:
    request = build_request(q, k, v, **kwargs)
    return get_backend(name).supports(request) is None


def measure(calls: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    first: dict[str, float] = {}
    for name, fn in calls.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    best = min(t for n, t in first.items() if n != "auto")
    kept = {n: fn for n, fn in calls.items() if n == "auto" or first[n] <= 1.5 * best}
    # a sample of a small call averages enough calls to last about SAMPLE_SECONDS: one call of
    # a millisecond is at the mercy of the timer, the scheduler and the garbage collector
    repeats = max(1, min(MAX_REPEATS, round(SAMPLE_SECONDS / best)))
    samples: dict[str, list[float]] = {n: [] for n in kept}
    for _ in range(rounds):
        for name, fn in kept.items():
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            samples[name].append((time.perf_counter() - start) / repeats)
    out = {n: statistics.median(s) for n, s in samples.items()}
    out.update({n: float("nan") for n in calls if n not in kept})  # dropped: far slower
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="*", default=[1024, 4096, 16384])
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    parser.add_argument("--kinds", nargs="*", default=list(KINDS))
    parser.add_argument("--passes", nargs="*", default=["fwd", "fwd+bwd"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--estimates", action="store_true")
    parser.add_argument(
        "--skip", nargs="*", default=[], help="peers not timed (auto still chooses among all)"
    )
    args = parser.parse_args()
    print(f"B={B} H={H} D={D}, threads={torch.get_num_threads()}; median ms of {args.rounds}")
    head = " ".join(f"{b:>9}" for b in BACKENDS)
    print(f"{'case':<34} {'auto':>9} {head}  picks      auto/best")
    worst = 1.0
    for n in args.n:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for kind in args.kinds:
                for mode in args.passes:
                    torch.manual_seed(0)
                    grad_on = mode == "fwd+bwd"
                    q, k, v = (
                        torch.randn(B, H, n, D, dtype=dtype).requires_grad_(grad_on)
                        for _ in range(3)
                    )
                    kwargs = case_kwargs(kind, n)
                    g = torch.randn(B, H, n, D, dtype=dtype) if grad_on else None
                    names = [b for b in BACKENDS if b not in args.skip and able(b, q, k, v, kwargs)]
                    if kind not in ("none", "causal") and n > 4096 and "sdpa" in names:
                        names.remove("sdpa")  # a dense (N, N) mask or bias: never the fastest
                    if n > 4096 and "reference" in names:
                        names.remove("reference")  # O(N^2) memory: never the fastest there
                    with torch.set_grad_enabled(grad_on):
                        estimates = {
                            b: estimate_seconds(get_backend(b), build_request(q, k, v, **kwargs))
                            for b in names
                        }
                    calls = {b: call_of(b, q, k, v, kwargs, g) for b in ["auto", *names]}
                    times = measure(calls, args.rounds)
                    with torch.set_grad_enabled(grad_on):  # after the runs: a timed choice shows
                        picked = qkv.explain(q, k, v, **kwargs).chosen
                    best = min(t for b, t in times.items() if b != "auto" and t == t)
                    ratio = times["auto"] / best
                    worst = max(worst, ratio)
                    cells = " ".join(
                        f"{times[b] * 1e3:>9.1f}" if b in times else f"{'-':>9}" for b in BACKENDS
                    )
                    name = f"{kind} N={n} {dtype_name} {mode}"
                    flag = "  <-- over 1.02" if ratio > 1.02 else ""
                    print(
                        f"{name:<34} {times['auto'] * 1e3:>9.1f} {cells}  {picked:<10} "
                        f"{ratio:.3f}{flag}",
                        flush=True,
                    )
                    if args.estimates:
                        est = " ".join(
                            f"{b}={(e or 0) * 1e3:.1f}" for b, e in estimates.items() if e
                        )
                        print(f"{'':<34} estimated ms: {est}")
    print(f"worst auto / fastest: {worst:.3f}")


if __name__ == "__main__":
    main()
