"""Argument checks and head grouping shared by the approximations.

Every approximation works on grouped tensors so that grouped-query attention never copies keys
or values: queries ``(B, Hkv, G, Nq, D)`` with ``G = Hq / Hkv`` query heads per key/value head,
keys and values ``(B, Hkv, 1, Nk, D)``; matmul broadcasting pairs them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qkv.request import CausalArg

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(method: str, q: object, k: object, v: object) -> tuple[Tensor, Tensor, Tensor]:
    """``q (B, Hq, Nq, D)``, ``k (B, Hkv, Nk, D)``, ``v (B, Hkv, Nk, Dv)``, or an error naming
    the argument and the shapes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{method}: {name} must be a torch.Tensor; got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{method}: {name} must have shape (B, H, N, D); got {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{method}: {name} must be a float tensor; got dtype {t.dtype}")
    assert isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(
            f"{method}: q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"{method}: k and v must share (B, Hkv, Nk); got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{method}: q and k must share B and D; got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"{method}: query heads Hq ({q.shape[1]}) must be a multiple of key/value heads "
            f"Hkv ({k.shape[1]})"
        )
    return q, k, v


def group_queries(q: Tensor, kv_heads: int) -> Tensor:
    """``(B, Hq, Nq, D) -> (B, Hkv, G, Nq, D)``: query head ``h`` joins key/value head
    ``h // G``, as in :func:`qkv.attention`."""
    return q.unflatten(1, (kv_heads, -1))


def ungroup(out: Tensor) -> Tensor:
    """``(B, Hkv, G, Nq, Dv) -> (B, Hq, Nq, Dv)``."""
    return out.flatten(1, 2)


def key_padding(method: str, mask: object, batch: int, num_keys: int) -> Tensor | None:
    """A key padding mask as bool ``(B, Nk)`` (True = real key), from ``None``, a ``(B, Nk)``
    tensor or one broadcastable to ``(B, 1, 1, Nk)``.

    Kernelized and low-rank approximations never form the ``Nq x Nk`` matrix, so they can only
    drop keys; a mask that depends on the query (or head) is refused by name.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"{method}: mask must be None or a bool key padding tensor (B, Nk) or "
            f"(B, 1, 1, Nk); got {type(mask).__name__} (mask functions need the exact kernels: "
            f"use qkv.attention or the 'bigbird'/'local' patterns)"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"{method}: mask must be a bool tensor (True = attend); got {mask.dtype}")
    if mask.ndim == 4:
        if mask.shape[1] != 1 or mask.shape[2] != 1:
            raise ValueError(
                f"{method}: mask must be a key padding mask (B, 1, 1, Nk); got "
                f"{tuple(mask.shape)}: this approximation cannot mask per query or per head"
            )
        mask = mask[:, 0, 0, :]
    if mask.ndim != 2 or mask.shape[0] not in (1, batch) or mask.shape[1] != num_keys:
        raise ValueError(
            f"{method}: mask must have shape (B, Nk) = ({batch}, {num_keys}) or "
            f"(B, 1, 1, Nk); got {tuple(mask.shape)}"
        )
    return mask.expand(batch, num_keys)


def causal_offset(method: str, causal: CausalArg, num_queries: int, num_keys: int) -> int | None:
    """``None`` for non-causal; otherwise ``o`` such that query ``i`` sees keys ``j <= i + o``
    (0 for ``True``/``"top_left"``, ``Nk - Nq`` for ``"bottom_right"``), as in
    :func:`qkv.attention`."""
    if causal is None or causal is False:
        return None
    if causal is True or causal == "top_left":
        return 0
    if causal == "bottom_right":
        return num_keys - num_queries
    raise ValueError(
        f"{method}: causal must be False, True, 'top_left' or 'bottom_right'; got {causal!r}"
    )


def check_positive(method: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{method}: {name} must be a positive int; got {name}={value!r}")
    return value


def resolve_scale(method: str, scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, int | float) or scale <= 0:
        raise ValueError(f"{method}: scale must be a positive number; got scale={scale!r}")
    return float(scale)
