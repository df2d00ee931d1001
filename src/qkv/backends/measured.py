"""Measured choices: where the cost model cannot tell backends apart, time them on this machine.

The estimates in :mod:`qkv.backends.cost` order backends by wide margins well, but two exact
backends within a few tens of percent of each other (SDPA and the compiled CPU kernel on a plain
call; the kernel and SDPA's dense bias for ALiBi) swap places between CPUs, dtypes and thread
counts. For such a call ``auto`` times the close candidates once per *shape class* on the actual
machine and remembers the winner, like ``torch.backends.cudnn.benchmark``:

- only when the cheapest estimate is at least :data:`MIN_SECONDS` (tiny calls are never worth
  it) and another candidate's estimate is within :data:`AMBIGUOUS` of it;
- never for dropout (timing would draw random numbers) or ``return_weights``, and only on the
  CPU (on a GPU the estimates decide: timing there needs synchronisation, and a call may be
  inside a CUDA graph capture);
- each candidate runs once untimed (its first call pays for allocations and caches), then
  twice, interleaved, on detached copies of the inputs (forward, and backward
  with a random gradient when the call needs gradients), the faster of the two counting;
- the class is the call's device, dtype, whether it trains, batch x heads, the head group size,
  ``Nq`` and ``Nk`` rounded to powers of two, the head dims, the mask's kinds and the fraction of
  tiles it keeps, and the score function's kind.

Winners are kept in memory and in ``~/.cache/qkv/auto-<machine>.json`` (the CPU model, the thread
count and the torch version name the machine), written atomically. ``QKV_AUTO_MEASURE=0`` turns
measuring off (``auto`` then follows the estimates alone); the test suite does so, so that its
expectations do not depend on the machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkv.backends.block_mask import EMPTY, default_tile_sizes, request_status
from qkv.mask_core import MaskFn
from qkv.request import AttentionRequest

__all__ = ["AMBIGUOUS", "MIN_SECONDS", "enabled", "known_choice", "measure_choice", "shape_class"]

#: Estimates within this factor of the cheapest are too close to trust.
AMBIGUOUS = 2.0
#: Calls estimated below this many seconds are never measured (timing them costs more than a
#: wrong choice could).
MIN_SECONDS = 0.002

_MEMORY: dict[str, str] = {}
_LOADED = False
_FORGOTTEN = 0  # how many times forget() ran: selections remembered before are stale


def forgotten() -> int:
    """A counter that changes whenever the remembered choices are dropped."""
    return _FORGOTTEN


def enabled() -> bool:
    return os.environ.get("QKV_AUTO_MEASURE", "1") != "0"


def _bucket(n: int) -> int:
    return 0 if n <= 0 else 1 << math.ceil(math.log2(n))


def _kinds(mask: MaskFn | None) -> str:
    if mask is None:
        return "-"
    if mask.parts:
        return f"{type(mask).__name__}(" + ",".join(_kinds(p) for p in mask.parts) + ")"
    return type(mask).__name__


def _kept_fraction(request: AttentionRequest) -> int:
    """Sixteenths of the tiles the mask keeps (not EMPTY), at the device's default tile size."""
    if request.whole_mask is None:
        return 16
    tile_q, tile_kv = default_tile_sizes(request.device, request.dtype)
    status = request_status(request, tile_q, tile_kv, resolve=False)
    return round(16 * float((status != EMPTY).float().mean())) if status.numel() else 16


def shape_class(request: AttentionRequest) -> str:
    """The key under which a measured choice is remembered."""
    score = "-" if request.score_mod is None else type(request.score_mod).__name__
    parts: list[Any] = [
        request.device.type,
        str(request.dtype).removeprefix("torch."),
        "grad" if request.needs_grad else "nograd",
        _bucket(request.batch * request.q_heads),
        request.group_size,
        _bucket(request.q_len),
        _bucket(request.kv_len),
        request.head_dim,
        request.value_dim,
        _kinds(request.whole_mask),
        _kept_fraction(request),
        "bias" if request.bias is not None else "-",
        score,
    ]
    return "/".join(str(p) for p in parts)


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def _cache_file() -> Path:
    digest = hashlib.sha256(_machine().encode()).hexdigest()[:16]
    root = Path(os.environ.get("QKV_CACHE_DIR", Path.home() / ".cache" / "qkv"))
    return root / f"auto-{digest}.json"


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    try:
        stored = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return
    if isinstance(stored, dict):
        _MEMORY.update({k: v for k, v in stored.items() if isinstance(v, str)})


def _save() -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(_MEMORY, f, indent=0, sort_keys=True)
        os.replace(f.name, path)  # atomic: a reader sees the old file or the new one
    except OSError:
        pass  # a read-only home: remembered for this process only


def known_choice(request: AttentionRequest, names: Sequence[str]) -> str | None:
    """The remembered winner of ``request``'s shape class, if it is among ``names``."""
    if not enabled():
        return None
    _load()
    chosen = _MEMORY.get(shape_class(request))
    return chosen if chosen in names else None


def worth_measuring(request: AttentionRequest, costs: dict[str, float]) -> list[str]:
    """The backends whose estimates are too close to the cheapest's to trust (empty when the
    call is small, random or asks for weights, or when one estimate wins clearly)."""
    if not enabled() or len(costs) < 2 or request.dropout_p > 0 or request.return_weights:
        return []
    if request.device.type != "cpu":  # GPU timing needs synchronisation and no graph capture
        return []
    best = min(costs.values())
    if best < MIN_SECONDS:
        return []
    close = [name for name, c in costs.items() if c <= AMBIGUOUS * best]
    return close if len(close) > 1 else []


def _copy(t: Tensor, grad: bool) -> Tensor:
    return t.detach().clone().requires_grad_(grad and t.requires_grad)


def _time_once(backend: Any, request: AttentionRequest, grad_out: Tensor | None) -> float:
    # Gradients are taken with autograd.grad for the copies only: nothing is accumulated into
    # a parameter the score function reads (a relative-position table keeps its .grad).
    copies = [t for t in (request.q, request.k, request.v, request.bias) if t is not None]
    wanted = [t for t in copies if t.requires_grad]
    start = time.perf_counter()
    with torch.set_grad_enabled(grad_out is not None):
        out, _ = backend.forward(request)
        if grad_out is not None and wanted and out.requires_grad:
            torch.autograd.grad(out, wanted, grad_out, allow_unused=True)
    return time.perf_counter() - start


def measure_choice(request: AttentionRequest, candidates: Sequence[Any]) -> str:
    """Time ``candidates`` (backends that serve ``request``) on copies of its inputs and remember
    the fastest for its shape class; returns its name."""
    grad = request.needs_grad
    copy = replace(
        request,
        q=_copy(request.q, grad),
        k=_copy(request.k, grad),
        v=_copy(request.v, grad),
        bias=None if request.bias is None else _copy(request.bias, grad),
    )
    generator = torch.Generator(device=request.device).manual_seed(0)
    grad_out = None
    if grad:
        shape = (*copy.q.shape[:3], request.value_dim)
        grad_out = torch.randn(shape, generator=generator, device=request.device).to(request.dtype)
    for backend in candidates:  # untimed: a first call pays for allocations and caches
        _time_once(backend, copy, grad_out)
    best: dict[str, float] = {}
    for _ in range(2):
        for backend in candidates:
            seconds = _time_once(backend, copy, grad_out)
            best[backend.name] = min(seconds, best.get(backend.name, math.inf))
    winner = min(best, key=lambda name: best[name])
    _load()
    _MEMORY[shape_class(request)] = winner
    _save()
    return winner


def forget() -> None:
    """Drop every remembered choice (in memory; the file is rewritten at the next measurement)."""
    global _FORGOTTEN
    _MEMORY.clear()
    _FORGOTTEN += 1
