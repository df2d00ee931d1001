"""Self-checks a user can run on their own machine: every backend against the float64 reference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qkv import masks, scores
from qkv.backends import available_backends, get_backend
from qkv.functional.attention import attention
from qkv.request import build_request

__all__ = ["CheckRow", "check_backends", "tolerance"]

#: How far a backend may stray from float64 relative to the plain formula run in the same dtype
#: (the house rule of tests/gold.py: flash-attention allows 2x in half precision, FlexAttention's
#: tests 10x in float32), and a floor for cases where that control is itself almost exact.
_MULTIPLE = {torch.float16: 2.0, torch.bfloat16: 2.0, torch.float32: 10.0, torch.float64: 10.0}
_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5, torch.float64: 1e-10}


@dataclass(frozen=True)
class CheckRow:
    """One backend on one case.

    Attributes:
        error: max abs error against the float64 reference; None if the backend does not serve.
        limit: the largest error that passes (see :func:`tolerance`); None if not served.
        passed: ``error <= limit``; None if not served.
        reason: why the backend does not serve the case, else None.
    """

    case: str
    backend: str
    error: float | None
    reason: str | None
    limit: float | None = None
    passed: bool | None = None


def tolerance(control_error: float, dtype: torch.dtype) -> float:
    """The largest error a backend may have on a case where the reference formula run in ``dtype``
    (the control) has ``control_error`` against float64."""
    return max(_MULTIPLE.get(dtype, 10.0) * control_error, _FLOOR.get(dtype, 1e-5))


def _cases(Hq: int, Nq: int, Nk: int) -> dict[str, dict[str, Any]]:
    return {
        "plain": {},
        "causal (bottom-right)": {"causal": "bottom_right"},
        "sliding window 16": {"mask": masks.sliding_window(16), "causal": True},
        "4 documents": {
            "mask": masks.document(torch.arange(Nq) * 4 // Nq, torch.arange(Nk) * 4 // Nk)
        },
        "ALiBi": {"bias": scores.alibi(Hq), "causal": True},
        "softcap 20": {"bias": scores.softcap(20.0)},
    }


def check_backends(
    *,
    batch: int = 2,
    q_heads: int = 8,
    kv_heads: int = 2,
    q_len: int = 96,
    kv_len: int = 128,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[CheckRow]:
    """Run every registered backend on a set of cases and measure its error against the reference
    backend in float64; a backend passes a case when its error is within :func:`tolerance` of
    the reference backend's own error in ``dtype``. Returns one row per (case, backend)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_len, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=g, dtype=torch.float64)
    low = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
    rows: list[CheckRow] = []
    for case, kwargs in _cases(q_heads, q_len, kv_len).items():
        if progress is not None:
            progress(case)
        gold: Tensor = attention(q, k, v, backend="reference", **kwargs)
        request = build_request(*low, **kwargs)

        def error_of(name: str, gold: Tensor = gold, kwargs: dict[str, Any] = kwargs) -> float:
            out: Tensor = attention(*low, backend=name, **kwargs)
            return (out.double().cpu() - gold).abs().max().item()

        limit = tolerance(error_of("reference"), dtype)
        for name in available_backends():
            reason = get_backend(name).supports(request)
            if reason is not None:
                rows.append(CheckRow(case, name, None, reason))
                continue
            error = error_of(name)
            rows.append(CheckRow(case, name, error, None, limit, error <= limit))
    return rows
