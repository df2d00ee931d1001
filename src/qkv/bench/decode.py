"""``qkv bench decode``: decoding steps (a few new queries against a long key/value cache) timed
on each backend, as the bytes of K and V read per second and their share of the memory read rate
measured in the same run (:func:`~qkv.bench.peers.memory_gbps`).

A decoding step reads the whole cache and computes little per byte, so its yardstick is memory,
not the matmul rate: a backend at 100% reads K and V once, at the speed a plain sum reads memory.
The backends run interleaved (round-robin) in this process, medians reported, so a busy machine
slows them alike; the calls cycle through enough copies of the cache that each reads it from
memory rather than from the last-level cache.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from qkv.bench.peers import memory_gbps
from qkv.functional.attention import attention

__all__ = ["DecodeCase", "DecodeResult", "decode_cases", "format_decode_table", "time_decode"]

#: Bytes of K and V the calls of one case cycle through, at least: twice the last-level cache of
#: the machines this was written on (32 MiB), so that no call finds the cache it reads in it;
#: in at most MAX_COPIES copies (tiny caches are timed from the cache).
ROTATE_BYTES = 64 * 2**20
MAX_COPIES = 64


@dataclass(frozen=True)
class DecodeCase:
    """``queries`` new queries of ``batch`` sequences against ``context`` cached keys, with
    ``q_heads`` query heads sharing ``kv_heads`` key/value heads of ``head_dim``; the queries
    see every cached key and each other causally (``causal="bottom_right"``)."""

    batch: int
    queries: int
    context: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("batch", "queries", "context", "q_heads", "kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.q_heads % self.kv_heads:
            raise ValueError(
                f"q_heads ({self.q_heads}) must be a multiple of kv_heads ({self.kv_heads})"
            )
        if self.queries > self.context:
            raise ValueError(
                f"queries ({self.queries}) must be at most context ({self.context}): the new "
                "queries' keys are part of the cache"
            )

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V one call reads."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.batch * self.kv_heads * self.context * self.head_dim * itemsize


@dataclass(frozen=True)
class DecodeResult:
    case: DecodeCase
    backend: str
    seconds: float | None  # median; None with an error
    memory_gbps: float  # the memory read rate measured with the case
    error: str | None = None

    @property
    def kv_gbps(self) -> float | None:
        return None if self.seconds is None else self.case.kv_bytes / self.seconds / 1e9


def decode_cases(
    batches: list[int],
    queries: list[int],
    contexts: list[int],
    *,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
) -> list[DecodeCase]:
    """Every combination, batch outermost."""
    return [
        DecodeCase(b, nq, nk, q_heads, kv_heads, head_dim, dtype)
        for b, nq, nk in itertools.product(batches, queries, contexts)
    ]


def _calls(case: DecodeCase, backend: str, copies: int) -> Callable[[int], Tensor]:
    """Call i on copy i % copies of the cache (fresh random q, K, V, the same for every
    backend)."""
    g = torch.Generator().manual_seed(0)
    shape_q = (case.batch, case.q_heads, case.queries, case.head_dim)  # (B, Hq, Nq, D)
    shape_kv = (case.batch, case.kv_heads, case.context, case.head_dim)  # (B, Hkv, Nk, D)
    q = torch.randn(shape_q, generator=g).to(case.dtype)
    caches = [
        tuple(torch.randn(shape_kv, generator=g).to(case.dtype) for _ in range(2))
        for _ in range(copies)
    ]

    def call(i: int) -> Tensor:
        k, v = caches[i % copies]
        with torch.no_grad():
            return attention(q, k, v, backend=backend, causal="bottom_right")

    return call


def time_decode(case: DecodeCase, backends: list[str], *, rounds: int = 10) -> list[DecodeResult]:
    """Each backend's median seconds per call over ``rounds`` interleaved rounds (after one
    warm-up call each), and the memory read rate measured just before the rounds."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    copies = min(MAX_COPIES, max(1, math.ceil(ROTATE_BYTES / case.kv_bytes)))
    calls: dict[str, Callable[[int], Tensor]] = {}
    errors: dict[str, str] = {}
    for name in backends:
        try:
            calls[name] = _calls(case, name, copies)
            calls[name](0)
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            errors[name] = str(exc).splitlines()[0]
            calls.pop(name, None)
    bandwidth = memory_gbps("cpu")
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call(i)
            times[name].append(time.perf_counter() - start)
    return [
        DecodeResult(
            case,
            name,
            statistics.median(times[name]) if name in times else None,
            bandwidth,
            errors.get(name),
        )
        for name in backends
    ]


def format_decode_table(results: list[DecodeResult]) -> str:
    """One line per case and backend: median ms, K/V GB/s, their share of the memory read rate
    measured with the case (``% bw``) and the time over SDPA's where SDPA ran."""
    header = (
        f"{'B':>3} {'Nq':>3} {'Nk':>7} {'heads':>6} {'D':>4} {'backend':<10} {'ms':>9} "
        f"{'K/V GB/s':>9} {'bw GB/s':>8} {'% bw':>5} {'x sdpa':>7}"
    )
    lines = [header, "-" * len(header)]
    sdpa = {r.case: r.seconds for r in results if r.backend == "sdpa" and r.seconds is not None}
    for r in results:
        c = r.case
        head = (
            f"{c.batch:>3} {c.queries:>3} {c.context:>7} {f'{c.q_heads}/{c.kv_heads}':>6} "
            f"{c.head_dim:>4} {r.backend:<10}"
        )
        if r.seconds is None or r.kv_gbps is None:
            lines.append(f"{head} failed: {r.error}")
            continue
        ratio = f"{r.seconds / sdpa[c]:.2f}" if c in sdpa else "-"
        lines.append(
            f"{head} {r.seconds * 1e3:>9.3f} {r.kv_gbps:>9.1f} {r.memory_gbps:>8.1f} "
            f"{r.kv_gbps / r.memory_gbps:>5.0%} {ratio:>7}"
        )
    return "\n".join(lines)
