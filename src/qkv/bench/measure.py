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
from torch import Tensor

from qkv.backends import select_backend
from qkv.backends.block_mask import build_block_mask
from qkv.bench.cases import BLOCK_MASK_BACKENDS, BenchCase
from qkv.bench.peers import PEERS, peer_call
from qkv.functional.attention import attention, memory_estimate
from qkv.request import AttentionRequest, build_request

#: Query rows per strip when a dense mask or bias is prebuilt, so building it never needs more
#: than the result plus a strip of index arithmetic.
STRIP = 256


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


def prebuilt_kwargs(case: BenchCase, q: Tensor, k: Tensor, v: Tensor) -> dict[str, Any]:
    """The call's keyword arguments with the mask or bias built ahead of the timed calls (see
    :class:`BenchCase`): a :class:`BlockMask` for chunked and triton, else a dense bool mask
    ``(1, 1, N, N)`` or float bias ``(1, H, N, N)``, requiring grad in fwd+bwd for a learnable
    bias."""
    kwargs = case.attention_kwargs()
    if not case.prebuilt:
        return kwargs
    n = case.seq_len
    if case.backend in BLOCK_MASK_BACKENDS:
        mask = kwargs.get("mask")
        causal = kwargs.get("causal", False)
        bm = build_block_mask(mask, q_len=n, kv_len=n, causal=causal, device=case.device)
        rest = {key: val for key, val in kwargs.items() if key not in ("mask", "causal")}
        return {"mask": bm, **rest}
    request = build_request(q, k, v, **kwargs)
    if request.score_mod is not None:
        bias = _dense(request, lambda rows: _bias_strip(request, rows), torch.float32)
        return {"bias": bias.to(q.dtype).requires_grad_(case.mode == "fwd+bwd")}
    if request.mask is not None:
        return {
            "mask": _dense(
                request, lambda rows: request.mask_tile(rows, request.full_kv), torch.bool
            )
        }
    return kwargs


def _bias_strip(request: AttentionRequest, rows: tuple[int, int]) -> Tensor:
    zeros = torch.zeros((1, 1, 1, 1), device=request.device)
    with torch.no_grad():
        return request.modify_scores(zeros, rows, request.full_kv)


def _dense(request: AttentionRequest, strip: Any, dtype: torch.dtype) -> Tensor:
    """Fill a dense ``(1, H', N, N)`` tensor strip by strip (``H'`` = 1 or the heads the strip
    spans)."""
    n = request.q_len
    first = strip((0, min(STRIP, n)))
    heads = first.shape[1] if first.ndim == 4 else 1
    out = torch.empty(1, heads, n, request.kv_len, dtype=dtype, device=request.device)
    for lo in range(0, n, STRIP):
        rows = (lo, min(lo + STRIP, n))
        out[:, :, lo : rows[1]] = strip(rows)
    return out


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(case: BenchCase) -> dict[str, Any]:
    """Time ``case`` (median of ``repeats`` after one warm-up) and measure its peak extra memory.
    ``first_seconds`` is the warm-up call: for compiled FlexAttention, its compilation."""
    torch.manual_seed(0)
    shape_q = (case.batch, case.heads, case.seq_len, case.head_dim)
    shape_kv = (case.batch, case.kv_heads, case.seq_len, case.head_dim)
    grad = case.mode == "fwd+bwd"
    q, k, v = (
        torch.randn(s, dtype=case.torch_dtype, device=case.device, requires_grad=grad)
        for s in (shape_q, shape_kv, shape_kv)
    )
    kwargs = prebuilt_kwargs(case, q, k, v)
    given = sum(t.numel() * t.element_size() for t in kwargs.values() if isinstance(t, Tensor))
    cuda = q.device.type == "cuda"
    estimate: int | None = None
    peer = None
    if case.backend in PEERS:  # PyTorch's own kernels; block masks are built here, untimed
        peer = peer_call(case.backend, q, k, v, **kwargs)
    else:
        request = build_request(q, k, v, **kwargs)
        estimate = memory_estimate(select_backend(request, case.backend).backend, request)

    def call() -> None:
        out = peer() if peer is not None else attention(q, k, v, backend=case.backend, **kwargs)
        if grad:
            out.backward(torch.ones_like(out))
            q.grad = k.grad = v.grad = None
        if cuda:
            torch.cuda.synchronize()

    baseline = _max_rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    start = time.perf_counter()
    call()  # warm-up: caches, lazy initialisation, allocator growth; flex compiles here
    first = time.perf_counter() - start
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
        "given_bytes": given,
        "first_seconds": first,
    }


def main(argv: list[str]) -> int:
    case = BenchCase(**json.loads(argv[0]))
    print(json.dumps(measure(case)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
