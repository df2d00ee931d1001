"""Run one case in this process: build inputs, time the call, report peak memory.

Run as ``python -m qkv.bench.measure '<case json>'`` it prints one JSON line; that is how
:mod:`qkv.bench.run` measures each CPU case in a fresh process, where the growth of the
process's peak resident set over a baseline taken just before the timed calls is the memory the
call needed.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from typing import Any

import torch

from qkv.backends import get_backend
from qkv.bench.cases import BenchCase
from qkv.functional.attention import attention, memory_estimate
from qkv.request import build_request


def attended_pairs(case: BenchCase) -> int:
    """How many (batch, head, query, key) entries the mask lets through: the work that counts."""
    probe = torch.empty(
        case.batch, case.heads, case.seq_len, 1, dtype=torch.float32, device=case.device
    )
    request = build_request(
        probe, probe[:, : case.kv_heads], probe[:, : case.kv_heads], **case.attention_kwargs()
    )
    total, n, step = 0, case.seq_len, 512
    for start in range(0, n, step):
        rows = (start, min(start + step, n))
        tile = request.mask_tile(rows, (0, n))
        if tile is None:
            total += case.batch * case.heads * (rows[1] - rows[0]) * n
            continue
        repeat = (case.batch // tile.shape[0]) * (case.heads // tile.shape[1])
        full = tile.expand(tile.shape[0], tile.shape[1], rows[1] - rows[0], n)
        total += int(full.sum().item()) * repeat
    return total


def flops(case: BenchCase, pairs: int) -> float:
    """Useful floating-point operations: 2*D for q.k and 2*D for p.v per attended pair forward;
    backward counted as 2.5x forward (FlashAttention's convention), so fwd+bwd is 3.5x."""
    forward = 4.0 * case.head_dim * pairs
    return forward if case.mode == "fwd" else 3.5 * forward


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(case: BenchCase) -> dict[str, Any]:
    """Time ``case`` (median of ``repeats`` after one warm-up) and measure its peak extra memory."""
    torch.manual_seed(0)
    shape_q = (case.batch, case.heads, case.seq_len, case.head_dim)
    shape_kv = (case.batch, case.kv_heads, case.seq_len, case.head_dim)
    grad = case.mode == "fwd+bwd"
    q, k, v = (
        torch.randn(s, dtype=case.torch_dtype, device=case.device, requires_grad=grad)
        for s in (shape_q, shape_kv, shape_kv)
    )
    kwargs = case.attention_kwargs()
    cuda = q.device.type == "cuda"

    def call() -> None:
        out = attention(q, k, v, backend=case.backend, **kwargs)
        if grad:
            out.backward(torch.ones_like(out))
            q.grad = k.grad = v.grad = None
        if cuda:
            torch.cuda.synchronize()

    estimate = memory_estimate(get_backend(case.backend), build_request(q, k, v, **kwargs))
    baseline = _max_rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    call()  # warm-up: caches, lazy initialisation, allocator growth
    times = []
    for _ in range(case.repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _max_rss_bytes()
    return {
        "seconds": statistics.median(times),
        "peak_extra_bytes": max(0, peak - baseline),
        "estimated_bytes": estimate,
    }


def main(argv: list[str]) -> int:
    case = BenchCase(**json.loads(argv[0]))
    print(json.dumps(measure(case)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
