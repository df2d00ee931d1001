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

__all__ = ["CheckRow", "check_backends"]


@dataclass(frozen=True)
class CheckRow:
    """One backend on one case: its max abs error against float64 (None if it does not serve)."""

    case: str
    backend: str
    error: float | None
    reason: str | None


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
    backend in float64. Returns one row per (case, backend)."""
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
        for name in available_backends():
            reason = get_backend(name).supports(request)
            if reason is not None:
                rows.append(CheckRow(case, name, None, reason))
                continue
            out: Tensor = attention(*low, backend=name, **kwargs)
            error = (out.double().cpu() - gold).abs().max().item()
            rows.append(CheckRow(case, name, error, None))
    return rows
