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

Tile classification. A tiled backend cuts the ``(Nq, Nk)`` matrix into tiles and wants to know,
per tile, whether the mask hides all of it (skip it), shows all of it (compute it without
evaluating the mask) or only part of it. The built-in masks answer that from index ranges alone
(:func:`classify_tiles`), for every tile at once in ``O(number of tiles)`` work (documents:
``O(N)``), and so do their ``&``, ``|`` and ``~`` combinations. A mask function without that
knowledge answers :data:`UNKNOWN` and the backend evaluates it on the tile. The answers are exact
or conservative: :data:`FULL` and :data:`EMPTY` are only ever claimed when true for every batch
entry and head, :data:`PARTIAL` may stand for a tile that turns out full or empty.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "UNKNOWN",
    "MaskFn",
    "MaskFunction",
    "and_masks",
    "causal",
    "causal_bottom_right",
    "causal_top_left",
    "classify_tiles",
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


#: Tile states (int8): the mask hides every entry of the tile / some / none; or cannot tell
#: without evaluating it.
EMPTY, PARTIAL, FULL, UNKNOWN = 0, 1, 2, 3

#: ``tiles(q_bounds, kv_bounds) -> (nQ, nK) int8`` tile states. ``q_bounds`` is a 1-d int64 CPU
#: tensor of ``nQ + 1`` increasing positions: tile ``i`` holds queries
#: ``q_bounds[i] .. q_bounds[i + 1] - 1`` (likewise ``kv_bounds``).
TileClassifier = Callable[[Tensor, Tensor], Tensor]


class MaskFn:
    """A named, composable mask function.

    Args:
        fn: ``fn(b, h, q_idx, kv_idx) -> Tensor[bool]`` broadcasting to ``(B, H, Nq, Nk)``.
        name: how the mask prints, e.g. ``"sliding_window(left=256, right=0)"``.
        tiles: optional :data:`TileClassifier` that says from index ranges alone which tiles the
            mask hides or shows entirely (see :func:`classify_tiles`); without one, a tiled
            backend evaluates ``fn`` to find out.
    """

    __slots__ = ("fn", "name", "tiles")

    def __init__(
        self,
        fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor],
        name: str,
        tiles: TileClassifier | None = None,
    ) -> None:
        self.fn = fn
        self.name = name
        self.tiles = tiles

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.fn(b, h, q_idx, kv_idx)

    def __and__(self, other: MaskFunction) -> MaskFn:
        return and_masks(self, other)

    def __or__(self, other: MaskFunction) -> MaskFn:
        return or_masks(self, other)

    def __invert__(self) -> MaskFn:
        def inverted(q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
            status = classify_tiles(self, q_bounds, kv_bounds)
            swapped = torch.where(status == FULL, EMPTY, torch.where(status == EMPTY, FULL, status))
            return swapped.to(torch.int8)

        return MaskFn(lambda b, h, q, kv: ~self.fn(b, h, q, kv), f"~{self.name}", inverted)

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

    def tiles(q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
        states = [classify_tiles(m, q_bounds, kv_bounds) for m in parts]
        return _combine(states, absorbing=EMPTY, neutral=FULL)

    return MaskFn(both, "(" + " & ".join(m.name for m in parts) + ")", tiles)


def or_masks(*masks: MaskFunction) -> MaskFn:
    """Attend where any mask attends."""
    parts = [mask_function(m) for m in masks]

    def either(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        out = parts[0](b, h, q, kv)
        for m in parts[1:]:
            out = out | m(b, h, q, kv)
        return out

    def tiles(q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
        states = [classify_tiles(m, q_bounds, kv_bounds) for m in parts]
        return _combine(states, absorbing=FULL, neutral=EMPTY)

    return MaskFn(either, "(" + " | ".join(m.name for m in parts) + ")", tiles)


# --- tile classification -----------------------------------------------------------------------


def classify_tiles(mask: MaskFunction, q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
    """Which tiles ``mask`` hides entirely (:data:`EMPTY`), shows entirely (:data:`FULL`) or
    partly (:data:`PARTIAL`), for every batch entry and head, from index ranges alone.

    Args:
        mask: a mask function; one without a classifier gives :data:`UNKNOWN` everywhere.
        q_bounds: ``(nQ + 1,)`` increasing int64 positions; query tile ``i`` is
            ``q_bounds[i] .. q_bounds[i + 1] - 1``.
        kv_bounds: ``(nK + 1,)``, the same for key tiles.

    Returns:
        ``(nQ, nK)`` int8 tensor on the CPU. FULL and EMPTY are exact; PARTIAL may be
        conservative (e.g. documents whose ids are not sorted).
    """
    tiles = getattr(mask, "tiles", None)
    q_bounds, kv_bounds = q_bounds.cpu().long(), kv_bounds.cpu().long()
    shape = (max(q_bounds.numel() - 1, 0), max(kv_bounds.numel() - 1, 0))
    if tiles is None:
        return torch.full(shape, UNKNOWN, dtype=torch.int8)
    return tiles(q_bounds, kv_bounds).to(torch.int8).expand(shape).contiguous()


def _combine(states: list[Tensor], *, absorbing: int, neutral: int) -> Tensor:
    """Tile states of ``&`` (absorbing EMPTY, neutral FULL) or ``|`` (absorbing FULL, neutral
    EMPTY) of several masks: one absorbing part decides; all neutral stays neutral; otherwise
    PARTIAL, or UNKNOWN while a part has not been classified."""
    stacked = torch.stack(states)  # (parts, nQ, nK)
    out = torch.full_like(states[0], PARTIAL)
    out.masked_fill_((stacked == UNKNOWN).any(0), UNKNOWN)
    out.masked_fill_((stacked == neutral).all(0), neutral)
    return out.masked_fill_((stacked == absorbing).any(0), absorbing)


def _edges(bounds: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """First and last position of every tile, shaped ``(n, 1)`` for queries (``axis=0``) or
    ``(1, n)`` for keys (``axis=1``)."""
    shape = (-1, 1) if axis == 0 else (1, -1)
    return bounds[:-1].view(shape), (bounds[1:] - 1).view(shape)


def _states(full: Tensor, empty: Tensor) -> Tensor:
    out = torch.full(torch.broadcast_shapes(full.shape, empty.shape), PARTIAL, dtype=torch.int8)
    return out.masked_fill_(full, FULL).masked_fill_(empty, EMPTY)


def _distance_tiles(low: int | None, high: int | None, offset: int) -> TileClassifier:
    """Classifier of ``low <= q + offset - kv <= high`` (None: unbounded on that side); causal
    masks and sliding windows are of this form. A rectangular tile takes every distance between
    its extremes, so FULL and EMPTY are exact."""

    def tiles(q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
        (q_lo, q_hi), (kv_lo, kv_hi) = _edges(q_bounds, 0), _edges(kv_bounds, 1)
        nearest, farthest = q_lo + offset - kv_hi, q_hi + offset - kv_lo  # (nQ, nK)
        full = torch.ones_like(nearest, dtype=torch.bool)
        empty = torch.zeros_like(full)
        if low is not None:
            full &= nearest >= low
            empty |= farthest < low
        if high is not None:
            full &= farthest <= high
            empty |= nearest > high
        return _states(full, empty)

    return tiles


def _below_tiles(limits: Tensor, axis: int) -> TileClassifier:
    """Classifier of ``position < limits[b]`` on queries (``axis=0``) or keys (``axis=1``):
    FULL where the tile ends below the smallest limit, EMPTY where it starts at or past the
    largest (exact, since every batch entry must agree)."""
    smallest, largest = (int(limits.min()), int(limits.max())) if limits.numel() else (0, 0)

    def tiles(q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
        lo, hi = _edges(q_bounds if axis == 0 else kv_bounds, axis)
        rows, cols = q_bounds.numel() - 1, kv_bounds.numel() - 1
        return _states(hi < smallest, lo >= largest).expand(rows, cols)

    return tiles


def _tile_extremes(ids: Tensor, bounds: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of ``ids (R, N)``, the smallest and largest id in every tile: ``(R, n)`` each,
    in ``O(R * N)`` work."""
    lo, hi = int(bounds[0]), int(bounds[-1])
    part = ids[:, lo:hi]
    tile_of = torch.bucketize(torch.arange(lo, hi), bounds[1:-1], right=True)  # (hi - lo,)
    index = tile_of.expand_as(part)
    empty = part.new_zeros(part.shape[0], bounds.numel() - 1)
    smallest = empty.scatter_reduce(1, index, part, "amin", include_self=False)
    largest = empty.scatter_reduce(1, index, part, "amax", include_self=False)
    return smallest, largest


def _document_tiles(q_ids: Tensor, k_ids: Tensor) -> TileClassifier:
    """Classifier of ``q_ids[b, q] == k_ids[b, kv]``: EMPTY where the id ranges of the two tiles
    do not overlap, FULL where both tiles hold one and the same id (per batch row, then agreed
    over rows). Exact for sorted ids (packed documents), conservative otherwise."""

    def tiles(q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
        shape = (q_bounds.numel() - 1, kv_bounds.numel() - 1)
        if int(q_bounds[-1]) > q_ids.shape[1] or int(kv_bounds[-1]) > k_ids.shape[1]:
            return torch.full(shape, UNKNOWN, dtype=torch.int8)  # evaluation will raise
        rows = max(q_ids.shape[0], k_ids.shape[0])
        q_min, q_max = _tile_extremes(q_ids.cpu(), q_bounds)  # (Bq, nQ)
        k_min, k_max = _tile_extremes(k_ids.cpu(), kv_bounds)  # (Bk, nK)
        qr = torch.arange(rows).clamp(max=q_ids.shape[0] - 1)
        kr = torch.arange(rows).clamp(max=k_ids.shape[0] - 1)
        q_min, q_max = q_min[qr, :, None], q_max[qr, :, None]  # (rows, nQ, 1)
        k_min, k_max = k_min[kr, None, :], k_max[kr, None, :]  # (rows, 1, nK)
        disjoint = (q_max < k_min) | (k_max < q_min)
        one_id = (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
        return _states(one_id.all(0), disjoint.all(0)).expand(shape)

    return tiles


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
    return MaskFn(lambda b, h, q, kv: kv <= q + offset, name, _distance_tiles(0, None, offset))


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

    return MaskFn(window, name, _distance_tiles(-right, left, offset))


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
        lambda b, h, q, kv: kv < _per_batch(lengths, b),
        f"key_padding({lengths.tolist()})",
        _below_tiles(lengths, axis=1),
    )


def query_padding(lengths: Tensor | list[int]) -> MaskFn:
    """Queries ``i >= lengths[b]`` are padding: their rows are fully masked and return zeros."""
    lengths = _as_lengths(lengths, "lengths")
    return MaskFn(
        lambda b, h, q, kv: q < _per_batch(lengths, b),
        f"query_padding({lengths.tolist()})",
        _below_tiles(lengths, axis=0),
    )


def document(query_ids: Tensor, key_ids: Tensor | None = None) -> MaskFn:
    """Packed sequences: a query attends only to keys of the same document.

    Args:
        query_ids: ``(B, Nq)`` or ``(Nq,)`` integer document id of every query position.
        key_ids: ``(B, Nk)`` or ``(Nk,)``; defaults to ``query_ids`` (self-attention).
    """
    q_ids = _as_ids(query_ids, "query_ids")
    k_ids = q_ids if key_ids is None else _as_ids(key_ids, "key_ids")

    return MaskFn(
        _index_ids(q_ids, k_ids),
        f"document({q_ids.unique().numel()} ids)",
        _document_tiles(q_ids, k_ids),
    )


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
        tiles = or_masks(key_padding([n]), causal()).tiles
        return MaskFn(lambda b, h, q, kv: (kv < n) | (kv <= q), f"prefix_lm({n})", tiles)
    lengths = _as_lengths(prefix_lengths, "prefix_lengths")
    return MaskFn(
        lambda b, h, q, kv: (kv < _per_batch(lengths, b)) | (kv <= q),
        f"prefix_lm({lengths.tolist()})",
        or_masks(key_padding(lengths), causal()).tiles,
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
