"""Mask functions: which keys each query may attend to, described by indices.

A mask function takes four integer index tensors ``(b, h, q_idx, kv_idx)`` that broadcast against
each other (in the dense case shaped ``(B, 1, 1, 1)``, ``(1, H, 1, 1)``, ``(1, 1, Nq, 1)`` and
``(1, 1, 1, Nk)``) and returns a bool tensor that broadcasts to ``(B, H, Nq, Nk)``, True = attend.
Because a mask is described by indices and not by an ``Nq x Nk`` tensor, a backend can evaluate
it one tile at a time and skip tiles it excludes entirely.

Checked against the call. A built-in mask knows what it assumes about the call (``key_padding``:
one length per batch entry, each in ``0..Nk``; ``document``: ids of length ``Nq`` and ``Nk``;
``dense``: a tensor broadcastable to ``(B, Hq, Nq, Nk)``) and :func:`qkv.attention` checks it
when the call's sizes are known (:meth:`MaskFn.check_call`), raising a ``ValueError`` that names
the mask and the sizes; nothing is clamped or dropped silently. A mask function of your own is
evaluated once on a 2 x 3 corner of the index grid: it must return a bool tensor that broadcasts
to ``(B, Hq, 2, 3)`` there (and to ``(B, Hq, Tq, Tk)`` on every tile a backend evaluates).

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

Each built-in mask is a class that carries its parameters (an offset, a window's extents, the
lengths, the ids, the tensor) and answers the questions of :mod:`qkv.mask_core` from them; that
is how every kernel serves it. A mask function of your own is opaque, whatever it is called. A
new mask kind is one class here: nothing outside this file names a kind.
"""

from __future__ import annotations

import itertools
import operator

import torch
from torch import Tensor

from qkv.mask_core import (
    EMPTY,
    FULL,
    PARTIAL,
    UNKNOWN,
    CallCheck,
    KernelMask,
    MaskFn,
    MaskFunction,
    and_masks,
    block_name,
    broadcasts,
    check_mask_output,
    classify_tiles,
    index_grid,
    mask_function,
    or_masks,
    saturate,
    tile_edges,
    tile_states,
)

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "UNKNOWN",
    "Band",
    "Dense",
    "Document",
    "KernelMask",
    "KeyPadding",
    "MaskFn",
    "MaskFunction",
    "PrefixLM",
    "QueryPadding",
    "and_masks",
    "causal",
    "causal_bottom_right",
    "causal_top_left",
    "check_mask_output",
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


def _integer(value: object, what: str) -> int:
    """``value`` as an int if it is an integer (a Python int or a 0-d integer tensor), else a
    TypeError naming ``what``: a window of 1.5 or NaN positions has no meaning."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer; got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        pass
    if isinstance(value, Tensor) and value.ndim == 0 and not value.dtype.is_floating_point:
        return int(value)
    raise TypeError(f"{what} must be an integer; got {value!r} ({type(value).__name__})")


# --- bands: causal masks and sliding windows -------------------------------------------------------


class Band(MaskFn):
    """Keys at a distance ``kv - q`` in ``[low, high)`` from the query (None: unbounded).

    Causal masks and sliding windows are bands. ``low`` and ``high`` are saturated to
    ``+-2**62`` (:func:`qkv.mask_core.saturate`), which changes no answer and keeps the index
    arithmetic of every backend inside int64.
    """

    def __init__(self, low: int | None, high: int | None, name: str) -> None:
        self.low = None if low is None else saturate(low)
        self.high = None if high is None else saturate(high)
        super().__init__(self._evaluate, name, verified=True)

    def _evaluate(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        distance = kv - q
        keep = (
            (distance >= self.low)
            if self.low is not None
            else torch.ones_like(distance, dtype=torch.bool)
        )
        return keep & (distance < self.high) if self.high is not None else keep

    def classify(self, q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
        # A rectangular tile takes every distance between its extremes: FULL and EMPTY are exact.
        (q_lo, q_hi), (kv_lo, kv_hi) = tile_edges(q_bounds, 0), tile_edges(kv_bounds, 1)
        nearest, farthest = kv_lo - q_hi, kv_hi - q_lo  # least and greatest kv - q, (nQ, nK)
        full = torch.ones_like(nearest, dtype=torch.bool)
        empty = torch.zeros_like(full)
        if self.low is not None:
            full &= nearest >= self.low
            empty |= farthest < self.low
        if self.high is not None:
            full &= farthest < self.high
            empty |= nearest >= self.high
        return tile_states(full, empty)

    def lower(self, batch: int, q_len: int, kv_len: int) -> KernelMask:
        q = torch.arange(q_len).view(1, q_len)
        lo = q + self.low if self.low is not None else torch.zeros_like(q)
        hi = q + self.high if self.high is not None else torch.full_like(q, kv_len)
        return KernelMask.interval(lo, hi, q_len, kv_len)

    def block(self, q_range: tuple[int, int], kv_range: tuple[int, int]) -> Band:
        # kv - q = (j + k0) - (i + q0): the band of the block is this one moved by q0 - k0.
        shift = q_range[0] - kv_range[0]
        low = None if self.low is None else self.low + shift
        high = None if self.high is None else self.high + shift
        return Band(low, high, block_name(self.name, q_range, kv_range))


def causal(offset: int = 0) -> Band:
    """Query ``i`` attends to keys ``j <= i + offset``.

    ``offset=0`` is the top-left alignment (PyTorch's ``is_causal``); ``offset = Nk - Nq`` is the
    bottom-right alignment (FlashAttention, KV-cache decoding). See the module docstring.
    """
    offset = _integer(offset, "causal offset")
    name = "causal()" if offset == 0 else f"causal(offset={offset})"
    band = Band(None, offset + 1, name)
    band.offset = offset  # type: ignore[attr-defined]
    return band


def causal_top_left() -> Band:
    """Causal mask aligned at the top-left corner: query ``i`` sees keys ``0..i``."""
    return causal(0)


def causal_bottom_right(num_queries: int, num_keys: int) -> Band:
    """Causal mask aligned at the bottom-right corner: the last query sees every key."""
    return causal(
        _integer(num_keys, "causal_bottom_right num_keys")
        - _integer(num_queries, "causal_bottom_right num_queries")
    )


def sliding_window(left: int, right: int = 0, *, offset: int = 0) -> Band:
    """Query ``i`` attends to keys ``i + offset - left <= j <= i + offset + right``.

    ``sliding_window(255)`` is the usual causal local window of 256 tokens (itself and 255 before);
    ``sliding_window(64, 64)`` is a symmetric window for encoders. ``left``, ``right`` and
    ``offset`` must be integers (a TypeError names the one that is not, e.g. ``1.5`` or NaN); any
    size is exact, ``sys.maxsize`` included.
    """
    left = _integer(left, "sliding_window left")
    right = _integer(right, "sliding_window right")
    offset = _integer(offset, "sliding_window offset")
    if left < 0 or right < 0:
        raise ValueError(
            f"sliding_window needs left >= 0 and right >= 0; got left={left}, right={right}"
        )
    name = f"sliding_window(left={left}, right={right}" + (f", offset={offset})" if offset else ")")
    return Band(offset - left, offset + right + 1, name)


# --- lengths: padding and prefix-LM ----------------------------------------------------------------


def _per_batch(values: Tensor, b: Tensor) -> Tensor:
    """``values[b]`` where ``values`` has a batch dimension of B or 1 (then shared); the call
    check has made sure it is one of the two."""
    values = values.to(b.device)
    return values[b.clamp(max=values.shape[0] - 1)]


def _per_row(values: Tensor, batch: int) -> Tensor:
    """``values[b]`` for every ``b`` as ``(B, 1)`` int64 on the CPU (a single value is shared)."""
    values = values.long().cpu()
    return values[torch.arange(batch).clamp(max=values.shape[0] - 1)].view(batch, 1)


def _as_lengths(lengths: Tensor | list[int] | int, what: str) -> Tensor:
    """``lengths`` as a 1-d int64 tensor of non-negative values, or an error naming ``what``."""
    if isinstance(lengths, int) and not isinstance(lengths, bool):
        lengths = [lengths]  # one length shared by the batch
    if isinstance(lengths, list | tuple) and not lengths:
        return torch.empty(0, dtype=torch.long)  # fits B = 0 only; the call check says so
    if isinstance(lengths, float) or (
        isinstance(lengths, list | tuple) and any(isinstance(x, float) for x in lengths)
    ):
        raise TypeError(f"{what} must be integers; got {lengths!r}")
    try:
        lengths = torch.as_tensor(lengths)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(
            f"{what} must be a 1-d integer tensor of shape (B,); got {lengths!r}"
        ) from error
    _check_has_values(lengths, what)
    if lengths.ndim != 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(
            f"{what} must be a 1-d integer tensor of shape (B,); got {tuple(lengths.shape)} {lengths.dtype}"
        )
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"{what} must be >= 0; got {lengths.tolist()}")
    return lengths.long().clone()  # the mask's own copy: frozen, whatever the caller does


def _check_has_values(t: Tensor, what: str) -> None:
    """A mask's tensor is read (and moved to the call's device) when the mask is evaluated: a
    meta tensor has no values to read."""
    if t.device.type == "meta":
        raise ValueError(
            f"{what} is on the meta device, which holds no values; give a tensor with values "
            "(on any device: it is moved to q's device when the mask is evaluated)"
        )


def _check_batch_rows(rows: int, batch: int, what: str, shown: str) -> None:
    """A per-batch argument holds one row (shared by the batch) or exactly B rows."""
    if rows not in (1, batch):
        raise ValueError(
            f"{what} has {rows} entries ({shown}) but the call has batch size B = {batch}; "
            "give one per batch entry (or a single one shared by all)"
        )


def _lengths_check(lengths: Tensor, what: str, axis: str | None) -> CallCheck:
    """The call check of lengths along the queries (``axis="Nq"``) or keys (``"Nk"``), or of
    the batch rows only (``None``)."""
    shown = str(lengths.tolist())
    longest = int(lengths.max()) if lengths.numel() else 0

    def check(batch: int, heads: int, q_len: int, kv_len: int) -> None:
        _check_batch_rows(lengths.shape[0], batch, what, shown)
        limit = q_len if axis == "Nq" else kv_len
        if axis is not None and longest > limit:
            raise ValueError(
                f"{what} {shown} holds a length of {longest} but the call has {axis} = {limit}"
            )

    return check


def _below_tiles(limits: Tensor, q_bounds: Tensor, kv_bounds: Tensor, axis: int) -> Tensor:
    """Tile states of ``position < limits[b]`` on queries (``axis=0``) or keys (``axis=1``):
    FULL where the tile ends below the smallest limit, EMPTY where it starts at or past the
    largest (exact, since every batch entry must agree)."""
    smallest, largest = (int(limits.min()), int(limits.max())) if limits.numel() else (0, 0)
    lo, hi = tile_edges(q_bounds if axis == 0 else kv_bounds, axis)
    rows, cols = q_bounds.numel() - 1, kv_bounds.numel() - 1
    return tile_states(hi < smallest, lo >= largest).expand(rows, cols)


class KeyPadding(MaskFn):
    """Keys ``j >= lengths[b]`` are padding (see :func:`key_padding`)."""

    frozen = True

    def __init__(self, lengths: Tensor) -> None:
        self.lengths = lengths
        what = "key_padding lengths"
        super().__init__(
            self._evaluate,
            f"key_padding({lengths.tolist()})",
            check=_lengths_check(lengths, what, "Nk"),
            verified=True,
        )

    def _evaluate(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return kv < _per_batch(self.lengths, b)

    def classify(self, q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
        return _below_tiles(self.lengths, q_bounds, kv_bounds, axis=1)

    def lower(self, batch: int, q_len: int, kv_len: int) -> KernelMask:
        return KernelMask.interval(torch.zeros(1, 1), _per_row(self.lengths, batch), q_len, kv_len)

    def block(self, q_range: tuple[int, int], kv_range: tuple[int, int]) -> KeyPadding:
        # Clamping to the block's keys changes no answer inside it.
        local = (self.lengths - kv_range[0]).clamp(0, kv_range[1] - kv_range[0])
        return KeyPadding(local)


class QueryPadding(MaskFn):
    """Queries ``i >= lengths[b]`` are padding (see :func:`query_padding`)."""

    frozen = True

    def __init__(self, lengths: Tensor) -> None:
        self.lengths = lengths
        what = "query_padding lengths"
        super().__init__(
            self._evaluate,
            f"query_padding({lengths.tolist()})",
            check=_lengths_check(lengths, what, "Nq"),
            verified=True,
        )

    def _evaluate(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return q < _per_batch(self.lengths, b)

    def classify(self, q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
        return _below_tiles(self.lengths, q_bounds, kv_bounds, axis=0)

    def lower(self, batch: int, q_len: int, kv_len: int) -> KernelMask:
        valid = torch.arange(q_len).view(1, q_len) < _per_row(self.lengths, batch)  # (B, Nq)
        return KernelMask.interval(torch.zeros(1, 1), torch.where(valid, kv_len, 0), q_len, kv_len)

    def block(self, q_range: tuple[int, int], kv_range: tuple[int, int]) -> QueryPadding:
        return QueryPadding((self.lengths - q_range[0]).clamp(0, q_range[1] - q_range[0]))


class PrefixLM(MaskFn):
    """Keys ``j < lengths[b]`` are seen by every query; after them, causal (see
    :func:`prefix_lm`)."""

    frozen = True

    def __init__(self, lengths: Tensor, name: str, check: CallCheck | None) -> None:
        self.lengths = lengths
        super().__init__(self._evaluate, name, check=check, verified=True)

    def _evaluate(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (kv < _per_batch(self.lengths, b)) | (kv <= q)

    def classify(self, q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
        return or_masks(KeyPadding(self.lengths), causal()).classify(q_bounds, kv_bounds)

    def lower(self, batch: int, q_len: int, kv_len: int) -> KernelMask:
        q = torch.arange(q_len).view(1, q_len)
        return KernelMask.interval(
            torch.zeros(1, 1), torch.maximum(q + 1, _per_row(self.lengths, batch)), q_len, kv_len
        )

    def block(self, q_range: tuple[int, int], kv_range: tuple[int, int]) -> MaskFn:
        # kv < length, or kv <= q: the block's keys below length - k0, or a causal band moved
        # by q0 - k0.
        prefix = KeyPadding((self.lengths - kv_range[0]).clamp(0, kv_range[1] - kv_range[0]))
        shift = q_range[0] - kv_range[0]
        return or_masks(prefix, Band(None, shift + 1, block_name("causal()", q_range, kv_range)))


def key_padding(lengths: Tensor | list[int]) -> KeyPadding:
    """Keys ``j >= lengths[b]`` are padding. ``lengths``: ``(B,)`` integers in ``0..Nk`` (or one
    length shared by the batch); checked against the call."""
    return KeyPadding(_as_lengths(lengths, "key_padding lengths"))


def query_padding(lengths: Tensor | list[int]) -> QueryPadding:
    """Queries ``i >= lengths[b]`` are padding: their rows are fully masked and return zeros.
    ``lengths``: ``(B,)`` integers in ``0..Nq`` (or one shared length); checked against the call."""
    return QueryPadding(_as_lengths(lengths, "query_padding lengths"))


def prefix_lm(prefix_lengths: int | Tensor | list[int]) -> PrefixLM:
    """Prefix-LM: keys in the prefix are seen by every query; after it, attention is causal.

    ``prefix_lengths``: a non-negative int shared by the batch, or ``(B,)`` integers (checked
    against the call's batch size). A prefix longer than ``Nk`` makes every key visible.
    """
    if isinstance(prefix_lengths, int) and not isinstance(prefix_lengths, bool):
        if prefix_lengths < 0:
            raise ValueError(f"prefix_lm prefix_lengths must be >= 0; got {prefix_lengths}")
        shared = torch.tensor([saturate(prefix_lengths)])
        return PrefixLM(shared, f"prefix_lm({prefix_lengths})", None)
    lengths = _as_lengths(prefix_lengths, "prefix_lm prefix_lengths")
    what = "prefix_lm prefix_lengths"
    return PrefixLM(lengths, f"prefix_lm({lengths.tolist()})", _lengths_check(lengths, what, None))


# --- documents -------------------------------------------------------------------------------------


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


class Document(MaskFn):
    """A query attends only to keys of the same document (see :func:`document`).

    Attributes:
        q_ids: ``(B or 1, Nq)`` int64 document id of every query position.
        k_ids: ``(B or 1, Nk)`` int64, the same for keys.
    """

    frozen = True

    def __init__(self, q_ids: Tensor, k_ids: Tensor, self_attention: bool) -> None:
        self.q_ids, self.k_ids = q_ids, k_ids
        self.self_attention = self_attention
        super().__init__(
            self._evaluate,
            f"document({q_ids.unique().numel()} ids)",
            check=self._check,
            verified=True,
        )

    def _evaluate(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        qb = b.clamp(max=self.q_ids.shape[0] - 1)
        kb = b.clamp(max=self.k_ids.shape[0] - 1)
        return self.q_ids.to(q.device)[qb, q] == self.k_ids.to(kv.device)[kb, kv]

    def _check(self, batch: int, heads: int, q_len: int, kv_len: int) -> None:
        if self.self_attention and q_len != kv_len:
            raise ValueError(
                f"document(query_ids) without key_ids is for self-attention, but the call has "
                f"Nq = {q_len} and Nk = {kv_len}: pass key_ids of length Nk"
            )
        for what, ids, length, axis in (
            ("document query_ids", self.q_ids, q_len, "Nq"),
            ("document key_ids", self.k_ids, kv_len, "Nk"),
        ):
            if ids.shape[1] != length:
                raise ValueError(
                    f"{what} of shape {tuple(ids.shape)} holds {ids.shape[1]} positions but the "
                    f"call has {axis} = {length}"
                )
            _check_batch_rows(ids.shape[0], batch, what, f"shape {tuple(ids.shape)}")

    def classify(self, q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
        # EMPTY where the id ranges of the two tiles do not overlap, FULL where both tiles hold
        # one and the same id (per batch row, then agreed over rows). Exact for sorted ids
        # (packed documents), conservative otherwise.
        q_ids, k_ids = self.q_ids, self.k_ids
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
        return tile_states(one_id.all(0), disjoint.all(0)).expand(shape)

    def lower(self, batch: int, q_len: int, kv_len: int) -> KernelMask:
        return KernelMask(
            doc_q=self.q_ids[:, :q_len].cpu().contiguous(),
            doc_k=self.k_ids[:, :kv_len].cpu().contiguous(),
        )

    def block(self, q_range: tuple[int, int], kv_range: tuple[int, int]) -> Document:
        return Document(
            self.q_ids[:, q_range[0] : q_range[1]],
            self.k_ids[:, kv_range[0] : kv_range[1]],
            self_attention=False,
        )


def document(query_ids: Tensor, key_ids: Tensor | None = None) -> Document:
    """Packed sequences: a query attends only to keys of the same document.

    Args:
        query_ids: ``(B, Nq)`` or ``(Nq,)`` integer document id of every query position.
        key_ids: ``(B, Nk)`` or ``(Nk,)``; defaults to ``query_ids`` (self-attention, which
            needs ``Nq == Nk``).

    The lengths and batch rows are checked against the call: ``Nq`` ids for the queries, ``Nk``
    for the keys, 1 or ``B`` rows.
    """
    q_ids = _as_ids(query_ids, "document query_ids")
    k_ids = q_ids if key_ids is None else _as_ids(key_ids, "document key_ids")
    return Document(q_ids, k_ids, self_attention=key_ids is None)


def _as_ids(ids: Tensor, what: str) -> Tensor:
    ids = torch.as_tensor(ids)
    _check_has_values(ids, what)
    if ids.ndim not in (1, 2) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(
            f"{what} must be an integer tensor of shape (B, N) or (N,); got {tuple(ids.shape)} {ids.dtype}"
        )
    if ids.ndim == 2 and ids.shape[0] == 0:
        raise ValueError(f"{what} must have at least one row; got shape {tuple(ids.shape)}")
    ids = ids.long().clone()  # the mask's own copy: frozen, whatever the caller does
    return ids if ids.ndim == 2 else ids[None]  # (B or 1, N)


# --- tensors ---------------------------------------------------------------------------------------


def _tile_reduce(x: Tensor, bounds: Tensor, dim: int, reduce: str) -> Tensor:
    """``x`` (uint8) reduced with ``amax``/``amin`` over the tiles of ``bounds`` along ``dim``
    (a size-1, broadcast axis is left as it is)."""
    if x.shape[dim] == 1:
        return x
    edges = bounds.tolist()
    parts = [
        getattr(x.narrow(dim, lo, hi - lo), reduce)(dim=dim, keepdim=True)
        for lo, hi in itertools.pairwise(edges)
    ]
    return torch.cat(parts, dim=dim)


class Dense(MaskFn):
    """A bool tensor broadcastable to ``(B, H, Nq, Nk)`` as a mask (see :func:`dense`).

    Attributes:
        tensor: the mask viewed as 4-d (leading size-1 dims added).
    """

    def __init__(self, mask: Tensor, name: str) -> None:
        self.tensor = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        self.given_shape = tuple(mask.shape)
        super().__init__(
            self._evaluate, f"{name}{self.given_shape}", check=self._check, verified=True
        )
        self.label = name

    def _check(self, batch: int, heads: int, q_len: int, kv_len: int) -> None:
        target = (batch, heads, q_len, kv_len)
        if not broadcasts(self.given_shape, target):
            raise ValueError(
                f"dense mask {self.label!r} of shape {self.given_shape} does not broadcast to "
                f"(B, Hq, Nq, Nk) = {target}"
            )

    def _evaluate(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        m4 = self.tensor
        idx = [
            i if size > 1 else torch.zeros_like(i)
            for i, size in zip((b, h, q, kv), m4.shape, strict=True)
        ]
        return m4.to(q.device)[idx[0], idx[1], idx[2], idx[3]]

    def tile(
        self,
        batch: int,
        heads: int,
        q_range: tuple[int, int],
        kv_range: tuple[int, int],
        device: torch.device | str | None = None,
    ) -> Tensor:
        t = self.tensor
        rows = slice(*q_range) if t.shape[-2] > 1 else slice(None)
        cols = slice(*kv_range) if t.shape[-1] > 1 else slice(None)
        return t[..., rows, cols].to(device) if device is not None else t[..., rows, cols]

    def classify(self, q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
        # Exact, in one pass over the tensor; a broadcast axis stays size 1 throughout, so a
        # padding mask is never expanded to Nq x Nk.
        u8 = self.tensor.view(torch.uint8)
        seen = u8.amax(dim=(0, 1))  # (Nq or 1, Nk or 1): attended by some batch entry and head
        every = u8.amin(dim=(0, 1))
        shape = (q_bounds.numel() - 1, kv_bounds.numel() - 1)
        if self.tensor.shape[-2] > 1 and int(q_bounds[-1]) > self.tensor.shape[-2]:
            return torch.full(shape, UNKNOWN, dtype=torch.int8)
        if self.tensor.shape[-1] > 1 and int(kv_bounds[-1]) > self.tensor.shape[-1]:
            return torch.full(shape, UNKNOWN, dtype=torch.int8)
        seen = _tile_reduce(_tile_reduce(seen, kv_bounds, 1, "amax"), q_bounds, 0, "amax")
        every = _tile_reduce(_tile_reduce(every, kv_bounds, 1, "amin"), q_bounds, 0, "amin")
        return tile_states(every.cpu() > 0, seen.cpu() == 0).expand(shape)

    def lower(self, batch: int, q_len: int, kv_len: int) -> KernelMask:
        return KernelMask(dense=self.tensor)

    def block(self, q_range: tuple[int, int], kv_range: tuple[int, int]) -> Dense:
        t = self.tensor
        rows = slice(*q_range) if t.shape[-2] > 1 else slice(None)
        cols = slice(*kv_range) if t.shape[-1] > 1 else slice(None)
        return Dense(t[..., rows, cols], self.label)


def dense(mask: Tensor, name: str = "dense") -> Dense:
    """A bool tensor broadcastable to ``(B, H, Nq, Nk)`` as a mask function, to compose it.
    Its shape is checked against the call (a ``(5, 8)`` mask on ``Nk = 7`` is an error, not a
    dropped column)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"dense mask must be a bool tensor; got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = attend); got dtype {mask.dtype}")
    _check_has_values(mask, f"dense mask {name!r}")
    if mask.ndim > 4:
        raise ValueError(
            f"dense mask must have at most 4 dims (B, H, Nq, Nk); got shape {tuple(mask.shape)}"
        )
    return Dense(mask, name)
