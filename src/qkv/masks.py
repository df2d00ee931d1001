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
evaluated once on a 2 x 2 corner of the index grid: it must return a bool tensor that broadcasts
to ``(B, Hq, 2, 2)`` there.

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

import operator
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

#: ``check(batch, heads, q_len, kv_len)``: raises ``ValueError`` naming the mask and the sizes
#: when a mask (or score function) was built for a call of other sizes.
CallCheck = Callable[[int, int, int, int], None]


class MaskFn:
    """A named, composable mask function.

    Args:
        fn: ``fn(b, h, q_idx, kv_idx) -> Tensor[bool]`` broadcasting to ``(B, H, Nq, Nk)``.
        name: how the mask prints, e.g. ``"sliding_window(left=256, right=0)"``.
        tiles: optional :data:`TileClassifier` that says from index ranges alone which tiles the
            mask hides or shows entirely (see :func:`classify_tiles`); without one, a tiled
            backend evaluates ``fn`` to find out.
        check: optional :data:`CallCheck` run by :func:`qkv.attention` with the call's sizes.
        verified: True for the built-in masks and their combinations, whose output is known to
            be a bool tensor of the broadcast shape; a mask that is not verified is evaluated
            once per call on a 2 x 2 corner to check that (see :meth:`check_call`).
    """

    __slots__ = ("check", "fn", "name", "parts", "tiles", "verified")

    def __init__(
        self,
        fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor],
        name: str,
        tiles: TileClassifier | None = None,
        *,
        check: CallCheck | None = None,
        verified: bool = False,
        parts: tuple[MaskFn, ...] = (),
    ) -> None:
        self.fn = fn
        self.name = name
        self.tiles = tiles
        self.check = check
        self.verified = verified
        self.parts = parts  # the masks a combination is made of, checked in turn

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.fn(b, h, q_idx, kv_idx)

    def check_call(
        self, batch: int, heads: int, q_len: int, kv_len: int, device: torch.device | None = None
    ) -> None:
        """Raise ``ValueError``/``TypeError`` naming this mask if it does not fit a call of
        ``(B, Hq, Nq, Nk) = (batch, heads, q_len, kv_len)``: its own assumptions (lengths per
        batch entry, id lengths, a dense tensor's shape) and, unless verified, what it returns
        on a 2 x 2 corner of the index grid (a bool tensor broadcasting to ``(B, Hq, 2, 2)``)."""
        if self.check is not None:
            self.check(batch, heads, q_len, kv_len)
        for part in self.parts:
            part.check_call(batch, heads, q_len, kv_len, device)
        if not self.verified:
            check_mask_output(self, batch, heads, q_len, kv_len, device)

    def __and__(self, other: MaskFunction) -> MaskFn:
        return and_masks(self, other)

    def __or__(self, other: MaskFunction) -> MaskFn:
        return or_masks(self, other)

    def __invert__(self) -> MaskFn:
        def inverted(q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
            status = classify_tiles(self, q_bounds, kv_bounds)
            swapped = torch.where(status == FULL, EMPTY, torch.where(status == EMPTY, FULL, status))
            return swapped.to(torch.int8)

        return MaskFn(
            lambda b, h, q, kv: ~self.fn(b, h, q, kv),
            f"~{self.name}",
            inverted,
            verified=True,  # its part's corner is evaluated when needed
            parts=(self,),
        )

    def __repr__(self) -> str:
        return self.name


def mask_function(fn: MaskFunction, name: str | None = None) -> MaskFn:
    """Wrap a plain callable as a composable :class:`MaskFn` (a ``MaskFn`` is returned as is)."""
    if isinstance(fn, MaskFn):
        return fn
    return MaskFn(fn, name or str(getattr(fn, "__name__", "mask")))


def check_mask_output(
    mask: MaskFunction,
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    device: torch.device | None = None,
) -> None:
    """Evaluate ``mask`` on a corner of a ``(B, Hq, Nq, Nk)`` index grid and raise
    ``TypeError``/``ValueError`` naming it unless it returns a bool tensor broadcasting to
    ``(B, Hq, Tq, Tk)`` there. The corner is 2 x 3 (2 x 1 when ``Nk = 2``): with ``Tq != Tk`` a
    result laid out ``(Tk, Tq)`` cannot pass. Nothing to check when a size is 0."""
    if 0 in (batch, heads, q_len, kv_len):
        return
    tq, tk = min(2, q_len), min(3, kv_len)
    if tq == tk == 2:
        tk = 1
    corner = (batch, heads, tq, tk)
    try:
        out = mask(*index_grid(batch, heads, (0, tq), (0, tk), device))
    except (RuntimeError, IndexError, TypeError, ValueError) as error:
        raise ValueError(
            f"mask: the mask function {mask!r} failed on index tensors of a {corner} corner of "
            f"(B, Hq, Nq, Nk) = {(batch, heads, q_len, kv_len)}: {error}"
        ) from error
    if not isinstance(out, Tensor):
        raise TypeError(
            f"mask: the mask function {mask!r} must return a bool tensor; got "
            f"{type(out).__name__} {out!r} (build it with tensor operations on the index "
            "tensors, e.g. (kv_idx <= q_idx) & (b >= 0), not with Python's and/or/if)"
        )
    if out.dtype != torch.bool:
        raise TypeError(
            f"mask: the mask function {mask!r} must return a bool tensor (True = attend); got "
            f"dtype {out.dtype}. An additive float mask goes in bias= as a score function"
        )
    if not _broadcasts(tuple(out.shape), corner):
        raise ValueError(
            f"mask: the mask function {mask!r} returned shape {tuple(out.shape)} on a corner "
            f"of index tensors that broadcast to {corner}; its result must broadcast to "
            "(B, Hq, Tq, Tk): compute it from the index tensors, not a fixed-size tensor"
        )


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target), strict=False))


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

    name = "(" + " & ".join(m.name for m in parts) + ")"
    return MaskFn(both, name, tiles, verified=True, parts=tuple(parts))


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

    name = "(" + " | ".join(m.name for m in parts) + ")"
    return MaskFn(either, name, tiles, verified=True, parts=tuple(parts))


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


def causal(offset: int = 0) -> MaskFn:
    """Query ``i`` attends to keys ``j <= i + offset``.

    ``offset=0`` is the top-left alignment (PyTorch's ``is_causal``); ``offset = Nk - Nq`` is the
    bottom-right alignment (FlashAttention, KV-cache decoding). See the module docstring.
    """
    offset = _integer(offset, "causal offset")
    name = "causal()" if offset == 0 else f"causal(offset={offset})"
    return MaskFn(
        lambda b, h, q, kv: kv <= q + offset,
        name,
        _distance_tiles(0, None, offset),
        verified=True,
    )


def causal_top_left() -> MaskFn:
    """Causal mask aligned at the top-left corner: query ``i`` sees keys ``0..i``."""
    return causal(0)


def causal_bottom_right(num_queries: int, num_keys: int) -> MaskFn:
    """Causal mask aligned at the bottom-right corner: the last query sees every key."""
    return causal(
        _integer(num_keys, "causal_bottom_right num_keys")
        - _integer(num_queries, "causal_bottom_right num_queries")
    )


def sliding_window(left: int, right: int = 0, *, offset: int = 0) -> MaskFn:
    """Query ``i`` attends to keys ``i + offset - left <= j <= i + offset + right``.

    ``sliding_window(255)`` is the usual causal local window of 256 tokens (itself and 255 before);
    ``sliding_window(64, 64)`` is a symmetric window for encoders. ``left``, ``right`` and
    ``offset`` must be integers (a TypeError names the one that is not, e.g. ``1.5`` or NaN).
    """
    left = _integer(left, "sliding_window left")
    right = _integer(right, "sliding_window right")
    offset = _integer(offset, "sliding_window offset")
    if left < 0 or right < 0:
        raise ValueError(
            f"sliding_window needs left >= 0 and right >= 0; got left={left}, right={right}"
        )
    name = f"sliding_window(left={left}, right={right}" + (f", offset={offset})" if offset else ")")

    def window(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        distance = q + offset - kv
        return (distance <= left) & (distance >= -right)

    return MaskFn(window, name, _distance_tiles(-right, left, offset), verified=True)


def _per_batch(values: Tensor, b: Tensor) -> Tensor:
    """``values[b]`` where ``values`` has a batch dimension of B or 1 (then shared); the call
    check has made sure it is one of the two."""
    values = values.to(b.device)
    return values[b.clamp(max=values.shape[0] - 1)]


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
    return lengths.long()


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


def _lengths_check(lengths: Tensor, what: str, axis: str) -> CallCheck:
    """The call check of lengths along the queries (``axis="Nq"``) or keys (``"Nk"``)."""
    shown = str(lengths.tolist())
    longest = int(lengths.max()) if lengths.numel() else 0

    def check(batch: int, heads: int, q_len: int, kv_len: int) -> None:
        _check_batch_rows(lengths.shape[0], batch, what, shown)
        limit = q_len if axis == "Nq" else kv_len
        if longest > limit:
            raise ValueError(
                f"{what} {shown} holds a length of {longest} but the call has {axis} = {limit}"
            )

    return check


def key_padding(lengths: Tensor | list[int]) -> MaskFn:
    """Keys ``j >= lengths[b]`` are padding. ``lengths``: ``(B,)`` integers in ``0..Nk`` (or one
    length shared by the batch); checked against the call."""
    lengths = _as_lengths(lengths, "key_padding lengths")
    return MaskFn(
        lambda b, h, q, kv: kv < _per_batch(lengths, b),
        f"key_padding({lengths.tolist()})",
        _below_tiles(lengths, axis=1),
        check=_lengths_check(lengths, "key_padding lengths", "Nk"),
        verified=True,
    )


def query_padding(lengths: Tensor | list[int]) -> MaskFn:
    """Queries ``i >= lengths[b]`` are padding: their rows are fully masked and return zeros.
    ``lengths``: ``(B,)`` integers in ``0..Nq`` (or one shared length); checked against the call."""
    lengths = _as_lengths(lengths, "query_padding lengths")
    return MaskFn(
        lambda b, h, q, kv: q < _per_batch(lengths, b),
        f"query_padding({lengths.tolist()})",
        _below_tiles(lengths, axis=0),
        check=_lengths_check(lengths, "query_padding lengths", "Nq"),
        verified=True,
    )


def document(query_ids: Tensor, key_ids: Tensor | None = None) -> MaskFn:
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

    def check(batch: int, heads: int, q_len: int, kv_len: int) -> None:
        if key_ids is None and q_len != kv_len:
            raise ValueError(
                f"document(query_ids) without key_ids is for self-attention, but the call has "
                f"Nq = {q_len} and Nk = {kv_len}: pass key_ids of length Nk"
            )
        for what, ids, length, axis in (
            ("document query_ids", q_ids, q_len, "Nq"),
            ("document key_ids", k_ids, kv_len, "Nk"),
        ):
            if ids.shape[1] != length:
                raise ValueError(
                    f"{what} of shape {tuple(ids.shape)} holds {ids.shape[1]} positions but the "
                    f"call has {axis} = {length}"
                )
            _check_batch_rows(ids.shape[0], batch, what, f"shape {tuple(ids.shape)}")

    return MaskFn(
        _index_ids(q_ids, k_ids),
        f"document({q_ids.unique().numel()} ids)",
        _document_tiles(q_ids, k_ids),
        check=check,
        verified=True,
    )


def _as_ids(ids: Tensor, what: str) -> Tensor:
    ids = torch.as_tensor(ids)
    _check_has_values(ids, what)
    if ids.ndim not in (1, 2) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(
            f"{what} must be an integer tensor of shape (B, N) or (N,); got {tuple(ids.shape)} {ids.dtype}"
        )
    if ids.ndim == 2 and ids.shape[0] == 0:
        raise ValueError(f"{what} must have at least one row; got shape {tuple(ids.shape)}")
    return ids.long() if ids.ndim == 2 else ids.long()[None]  # (B or 1, N)


def _index_ids(q_ids: Tensor, k_ids: Tensor) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    def same_document(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        qb = b.clamp(max=q_ids.shape[0] - 1)
        kb = b.clamp(max=k_ids.shape[0] - 1)
        return q_ids.to(q.device)[qb, q] == k_ids.to(kv.device)[kb, kv]

    return same_document


def prefix_lm(prefix_lengths: int | Tensor | list[int]) -> MaskFn:
    """Prefix-LM: keys in the prefix are seen by every query; after it, attention is causal.

    ``prefix_lengths``: a non-negative int shared by the batch, or ``(B,)`` integers (checked
    against the call's batch size). A prefix longer than ``Nk`` makes every key visible.
    """
    if isinstance(prefix_lengths, int) and not isinstance(prefix_lengths, bool):
        n = prefix_lengths
        if n < 0:
            raise ValueError(f"prefix_lm prefix_lengths must be >= 0; got {n}")
        tiles = or_masks(key_padding([n]), causal()).tiles
        return MaskFn(
            lambda b, h, q, kv: (kv < n) | (kv <= q), f"prefix_lm({n})", tiles, verified=True
        )
    lengths = _as_lengths(prefix_lengths, "prefix_lm prefix_lengths")
    shown = str(lengths.tolist())

    def check(batch: int, heads: int, q_len: int, kv_len: int) -> None:
        _check_batch_rows(lengths.shape[0], batch, "prefix_lm prefix_lengths", shown)

    return MaskFn(
        lambda b, h, q, kv: (kv < _per_batch(lengths, b)) | (kv <= q),
        f"prefix_lm({shown})",
        or_masks(key_padding(lengths), causal()).tiles,
        check=check,
        verified=True,
    )


def dense(mask: Tensor, name: str = "dense") -> MaskFn:
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
    m4 = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))

    def check(batch: int, heads: int, q_len: int, kv_len: int) -> None:
        target = (batch, heads, q_len, kv_len)
        if not _broadcasts(tuple(mask.shape), target):
            raise ValueError(
                f"dense mask {name!r} of shape {tuple(mask.shape)} does not broadcast to "
                f"(B, Hq, Nq, Nk) = {target}"
            )

    def lookup(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        idx = [
            i if size > 1 else torch.zeros_like(i)
            for i, size in zip((b, h, q, kv), m4.shape, strict=True)
        ]
        return m4.to(q.device)[idx[0], idx[1], idx[2], idx[3]]

    return MaskFn(lookup, f"{name}{tuple(mask.shape)}", check=check, verified=True)
