"""Mask functions: which keys each query may attend to, described by indices.

A mask function takes four integer index tensors ``(b, h, q_idx, kv_idx)`` that broadcast against
each other (in the dense case shaped ``(B, 1, 1, 1)``, ``(1, H, 1, 1)``, ``(1, 1, Nq, 1)`` and
``(1, 1, 1, Nk)``) and returns a bool tensor that broadcasts to ``(B, H, Nq, Nk)``, True = attend.
Because a mask is described by indices and not by an ``Nq x Nk`` tensor, a backend can evaluate
it one tile at a time and skip tiles it excludes entirely.

Masks compose with ``&``, ``|`` and ``~`` and print under readable names::

    >>> from qkv import masks
    >>> masks.causal() & masks.sliding_window(256)
    (causal() & sliding_window(left=256, right=0))

Causal alignment when ``Nq != Nk`` (``x`` = attend), here ``Nq = 2``, ``Nk = 5``::

    top-left (causal(), PyTorch's is_causal)    bottom-right (causal(offset=Nk - Nq))
        k0 k1 k2 k3 k4                              k0 k1 k2 k3 k4
    q0   x  .  .  .  .                          q0   x  x  x  x  .
    q1   x  x  .  .  .                          q1   x  x  x  x  x

Bottom-right is what KV-cache decoding needs: the last query is the newest token and sees the
whole cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "MaskFn",
    "MaskFunction",
    "and_masks",
    "causal",
    "causal_bottom_right",
    "causal_top_left",
    "dense",
    "document",
    "index_grid",
    "key_padding",
    "mask_function",
    "or_masks",
    "prefix_lm",
    "query_padding",
    "sliding_window",
]


@runtime_checkable
class MaskFunction(Protocol):
    """Anything callable as ``mask(b, h, q_idx, kv_idx) -> bool tensor``."""

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor: ...


class MaskFn:
    """A named, composable mask function.

    Args:
        fn: ``fn(b, h, q_idx, kv_idx) -> Tensor[bool]`` broadcasting to ``(B, H, Nq, Nk)``.
        name: how the mask prints, e.g. ``"sliding_window(left=256, right=0)"``.
    """

    __slots__ = ("fn", "name")

    def __init__(self, fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor], name: str) -> None:
        self.fn = fn
        self.name = name

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.fn(b, h, q_idx, kv_idx)

    def __and__(self, other: MaskFunction) -> MaskFn:
        return and_masks(self, other)

    def __or__(self, other: MaskFunction) -> MaskFn:
        return or_masks(self, other)

    def __invert__(self) -> MaskFn:
        return MaskFn(lambda b, h, q, kv: ~self.fn(b, h, q, kv), f"~{self.name}")

    def __repr__(self) -> str:
        return self.name


def mask_function(fn: MaskFunction, name: str | None = None) -> MaskFn:
    """Wrap a plain callable as a composable :class:`MaskFn` (a ``MaskFn`` is returned as is)."""
    if isinstance(fn, MaskFn):
        return fn
    return MaskFn(fn, name or str(getattr(fn, "__name__", "mask")))


def and_masks(*masks: MaskFunction) -> MaskFn:
    """Attend where every mask attends."""
    parts = [mask_function(m) for m in masks]

    def both(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        out = parts[0](b, h, q, kv)
        for m in parts[1:]:
            out = out & m(b, h, q, kv)
        return out

    return MaskFn(both, "(" + " & ".join(m.name for m in parts) + ")")


def or_masks(*masks: MaskFunction) -> MaskFn:
    """Attend where any mask attends."""
    parts = [mask_function(m) for m in masks]

    def either(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        out = parts[0](b, h, q, kv)
        for m in parts[1:]:
            out = out | m(b, h, q, kv)
        return out

    return MaskFn(either, "(" + " | ".join(m.name for m in parts) + ")")


def index_grid(
    batch: int,
    heads: int,
    q_range: tuple[int, int],
    kv_range: tuple[int, int],
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Broadcastable index tensors for a block of the score matrix.

    Returns ``b (B, 1, 1, 1)``, ``h (1, H, 1, 1)``, ``q_idx (1, 1, Tq, 1)``, ``kv_idx (1, 1, 1, Tk)``
    with absolute positions ``q_range[0] .. q_range[1] - 1`` and likewise for keys.
    """
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q = torch.arange(*q_range, device=device).view(1, 1, -1, 1)
    kv = torch.arange(*kv_range, device=device).view(1, 1, 1, -1)
    return b, h, q, kv


# --- built-in masks -------------------------------------------------------------------------


def causal(offset: int = 0) -> MaskFn:
    """Query ``i`` attends to keys ``j <= i + offset``.

    ``offset=0`` is the top-left alignment (PyTorch's ``is_causal``); ``offset = Nk - Nq`` is the
    bottom-right alignment (FlashAttention, KV-cache decoding). See the module docstring.
    """
    offset = int(offset)
    name = "causal()" if offset == 0 else f"causal(offset={offset})"
    return MaskFn(lambda b, h, q, kv: kv <= q + offset, name)


def causal_top_left() -> MaskFn:
    """Causal mask aligned at the top-left corner: query ``i`` sees keys ``0..i``."""
    return causal(0)


def causal_bottom_right(num_queries: int, num_keys: int) -> MaskFn:
    """Causal mask aligned at the bottom-right corner: the last query sees every key."""
    return causal(num_keys - num_queries)


def sliding_window(left: int, right: int = 0, *, offset: int = 0) -> MaskFn:
    """Query ``i`` attends to keys ``i + offset - left <= j <= i + offset + right``.

    ``sliding_window(255)`` is the usual causal local window of 256 tokens (itself and 255 before);
    ``sliding_window(64, 64)`` is a symmetric window for encoders.
    """
    if left < 0 or right < 0:
        raise ValueError(
            f"sliding_window needs left >= 0 and right >= 0; got left={left}, right={right}"
        )
    name = f"sliding_window(left={left}, right={right}" + (f", offset={offset})" if offset else ")")

    def window(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        distance = q + offset - kv
        return (distance <= left) & (distance >= -right)

    return MaskFn(window, name)


def _per_batch(values: Tensor, b: Tensor) -> Tensor:
    """``values[b]`` where ``values`` has a batch dimension of B or 1 (then shared)."""
    values = values.to(b.device)
    return values[b.clamp(max=values.shape[0] - 1)]


def _as_lengths(lengths: Tensor | list[int], what: str) -> Tensor:
    lengths = torch.as_tensor(lengths)
    if lengths.ndim != 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(
            f"{what} must be a 1-d integer tensor of shape (B,); got {tuple(lengths.shape)} {lengths.dtype}"
        )
    return lengths.long()


def key_padding(lengths: Tensor | list[int]) -> MaskFn:
    """Keys ``j >= lengths[b]`` are padding. ``lengths``: ``(B,)`` integers."""
    lengths = _as_lengths(lengths, "lengths")
    return MaskFn(
        lambda b, h, q, kv: kv < _per_batch(lengths, b), f"key_padding({lengths.tolist()})"
    )


def query_padding(lengths: Tensor | list[int]) -> MaskFn:
    """Queries ``i >= lengths[b]`` are padding: their rows are fully masked and return zeros."""
    lengths = _as_lengths(lengths, "lengths")
    return MaskFn(
        lambda b, h, q, kv: q < _per_batch(lengths, b), f"query_padding({lengths.tolist()})"
    )


def document(query_ids: Tensor, key_ids: Tensor | None = None) -> MaskFn:
    """Packed sequences: a query attends only to keys of the same document.

    Args:
        query_ids: ``(B, Nq)`` or ``(Nq,)`` integer document id of every query position.
        key_ids: ``(B, Nk)`` or ``(Nk,)``; defaults to ``query_ids`` (self-attention).
    """
    q_ids = _as_ids(query_ids, "query_ids")
    k_ids = q_ids if key_ids is None else _as_ids(key_ids, "key_ids")

    return MaskFn(_index_ids(q_ids, k_ids), f"document({q_ids.unique().numel()} ids)")


def _as_ids(ids: Tensor, what: str) -> Tensor:
    ids = torch.as_tensor(ids)
    if ids.ndim not in (1, 2) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(
            f"{what} must be an integer tensor of shape (B, N) or (N,); got {tuple(ids.shape)} {ids.dtype}"
        )
    return ids.long().reshape(-1, ids.shape[-1])  # (B or 1, N)


def _index_ids(q_ids: Tensor, k_ids: Tensor) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    def same_document(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        qb = b.clamp(max=q_ids.shape[0] - 1)
        kb = b.clamp(max=k_ids.shape[0] - 1)
        return q_ids.to(q.device)[qb, q] == k_ids.to(kv.device)[kb, kv]

    return same_document


def prefix_lm(prefix_lengths: int | Tensor | list[int]) -> MaskFn:
    """Prefix-LM: keys in the prefix are seen by every query; after it, attention is causal.

    ``prefix_lengths``: an int shared by the batch, or ``(B,)`` integers.
    """
    if isinstance(prefix_lengths, int):
        n = prefix_lengths
        return MaskFn(lambda b, h, q, kv: (kv < n) | (kv <= q), f"prefix_lm({n})")
    lengths = _as_lengths(prefix_lengths, "prefix_lengths")
    return MaskFn(
        lambda b, h, q, kv: (kv < _per_batch(lengths, b)) | (kv <= q),
        f"prefix_lm({lengths.tolist()})",
    )


def dense(mask: Tensor, name: str = "dense") -> MaskFn:
    """A bool tensor broadcastable to ``(B, H, Nq, Nk)`` as a mask function, to compose it."""
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = attend); got dtype {mask.dtype}")
    m4 = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))

    def lookup(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        idx = [
            i if size > 1 else torch.zeros_like(i)
            for i, size in zip((b, h, q, kv), m4.shape, strict=True)
        ]
        return m4.to(q.device)[idx[0], idx[1], idx[2], idx[3]]

    return MaskFn(lookup, f"{name}{tuple(mask.shape)}")
