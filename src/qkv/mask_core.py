"""The mask contract between the vocabulary (:mod:`qkv.masks`) and every kernel.

A mask is a :class:`MaskFn`: a callable ``(b, h, q_idx, kv_idx) -> bool tensor`` that also says
what it is. The base class is **opaque**: a function of your own, whatever it is called, is only
ever evaluated (on a tile, or on the whole matrix). The masks :mod:`qkv.masks` builds are
subclasses that carry their parameters as typed attributes and answer four questions a kernel
asks, without any kernel knowing their kind:

- :meth:`MaskFn.classify`: which tiles the mask hides entirely (:data:`EMPTY`), shows entirely
  (:data:`FULL`) or partly (:data:`PARTIAL`), from index ranges alone; :data:`UNKNOWN` when only
  evaluation can tell (the opaque case).
- :meth:`MaskFn.lower`: the mask as the parameters a compiled kernel evaluates
  (:class:`KernelMask`: per-row key intervals, document ids, a strided bool tensor), or the
  reason it has none.
- :meth:`MaskFn.tile`: the mask of one block of the ``(Nq, Nk)`` matrix, as a tensor.
- :meth:`MaskFn.check_call`: whether it fits a call of given sizes.
- :meth:`MaskFn.block`: the same mask on one block of the ``(Nq, Nk)`` matrix, in the block's
  own coordinates, as a mask of the same kind (context parallelism runs each block as a call).

``&``, ``|`` and ``~`` build :class:`AndMask`, :class:`OrMask` and :class:`NotMask`, which answer
the same questions from their parts. So a new mask kind is one class in :mod:`qkv.masks`: every
backend serves it through these methods, and nothing outside the vocabulary names a kind.

Extents saturate: positions are below ``2**62`` on any machine, so an interval bound beyond
``+-2**62`` (an unbounded window, ``sys.maxsize``) is clamped there before any tensor arithmetic,
which keeps int64 exact (:func:`saturate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "EMPTY",
    "FULL",
    "MAX_INTERVALS",
    "PARTIAL",
    "POSITION_LIMIT",
    "UNKNOWN",
    "AndMask",
    "KernelMask",
    "MaskFn",
    "MaskFunction",
    "NotMask",
    "OrMask",
    "and_masks",
    "block_name",
    "check_mask_output",
    "classify_tiles",
    "index_grid",
    "mask_function",
    "or_masks",
    "saturate",
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

#: Positions (and so every meaningful extent) are below this; larger bounds saturate to it.
POSITION_LIMIT = 2**62
#: Most key intervals per query row a :class:`KernelMask` holds (``|`` and ``~`` add intervals).
MAX_INTERVALS = 8


def saturate(value: int) -> int:
    """``value`` clamped to ``[-2**62, 2**62]``: every position is smaller, so a comparison of a
    position with the clamped bound gives the same answer, and ``position + bound`` fits int64."""
    return max(-POSITION_LIMIT, min(POSITION_LIMIT, int(value)))


# --- the kernel form -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelMask:
    """A mask as parameters a compiled kernel evaluates, for one call of ``(B, Nq, Nk)``.

    Key ``kv`` of row ``(b, q)`` is attended when all of these that are present hold:

    - it lies in one of the intervals ``[lo[i, b, q], hi[i, b, q])`` (``lo``/``hi``:
      ``(K, Bm, Nq)`` int64 in ``[0, Nk]``, ``Bm`` in ``{1, B}``, ``K <= MAX_INTERVALS``);
    - ``doc_q[b, q] == doc_k[b, kv]`` (``(Bq, Nq)`` and ``(Bk, Nk)`` int64 ids);
    - ``dense[b, h, q, kv]`` (a 4-d bool tensor broadcastable to ``(B, Hq, Nq, Nk)``).

    None everywhere means every key is attended.
    """

    lo: Tensor | None = None
    hi: Tensor | None = None
    doc_q: Tensor | None = None
    doc_k: Tensor | None = None
    dense: Tensor | None = None

    @staticmethod
    def interval(lo: Tensor, hi: Tensor, q_len: int, kv_len: int) -> KernelMask:
        """One interval ``[lo, hi)`` per row; ``lo``/``hi`` broadcast to ``(Bm, Nq)`` and are
        clamped to ``[0, Nk]`` (with ``hi >= lo``)."""
        lo, hi = torch.broadcast_tensors(lo.long(), hi.long())
        lo, hi = lo.expand(-1, q_len), hi.expand(-1, q_len)
        lo = lo.clamp(0, kv_len)
        hi = torch.maximum(hi.clamp(0, kv_len), lo)
        return KernelMask(lo=lo[None].contiguous(), hi=hi[None].contiguous())

    @property
    def only_intervals(self) -> bool:
        return self.doc_q is None and self.dense is None

    def intersect(self, other: KernelMask, kv_len: int) -> KernelMask | str:
        """Keys kept by both, or why the kernel form cannot hold that."""
        if self.doc_q is not None and other.doc_q is not None:
            return "two document masks in one call (combine their ids into one)"
        if self.dense is not None and other.dense is not None:
            return "more than one mask tensor (combine them with & first)"
        lo, hi = self.lo, self.hi
        if lo is None or hi is None:
            lo, hi = other.lo, other.hi
        elif other.lo is not None and other.hi is not None:
            if lo.shape[0] * other.lo.shape[0] > MAX_INTERVALS:
                return f"more than {MAX_INTERVALS} key intervals per query row"
            pairs_lo = torch.maximum(lo[:, None], other.lo[None])  # (K1, K2, Bm, Nq)
            pairs_hi = torch.minimum(hi[:, None], other.hi[None])
            lo = pairs_lo.flatten(0, 1).contiguous()
            hi = torch.maximum(pairs_hi.flatten(0, 1), lo).contiguous()
        return KernelMask(
            lo=lo,
            hi=hi,
            doc_q=self.doc_q if self.doc_q is not None else other.doc_q,
            doc_k=self.doc_k if self.doc_k is not None else other.doc_k,
            dense=self.dense if self.dense is not None else other.dense,
        )

    def union(self, other: KernelMask, batch: int, q_len: int, kv_len: int) -> KernelMask | str:
        """Keys kept by either (interval masks only)."""
        if not (self.only_intervals and other.only_intervals):
            return "| of a document mask or a mask tensor, which the kernel form cannot hold"
        (lo_a, hi_a), (lo_b, hi_b) = self._intervals(q_len, kv_len), other._intervals(q_len, kv_len)
        if lo_a.shape[0] + lo_b.shape[0] > MAX_INTERVALS:
            return f"more than {MAX_INTERVALS} key intervals per query row"
        rows = max(lo_a.shape[1], lo_b.shape[1])
        lo = torch.cat([x.expand(-1, rows, -1) for x in (lo_a, lo_b)]).contiguous()
        hi = torch.cat([x.expand(-1, rows, -1) for x in (hi_a, hi_b)]).contiguous()
        return KernelMask(lo=lo, hi=hi)

    def complement(self, batch: int, q_len: int, kv_len: int) -> KernelMask | str:
        """Keys this mask does not keep (interval masks only): the complement of a union of
        ``K`` intervals is the intersection of ``K`` two-interval sets."""
        if not self.only_intervals:
            return "~ of a document mask or a mask tensor, which the kernel form cannot hold"
        lo, hi = self._intervals(q_len, kv_len)
        result = KernelMask()
        for i in range(lo.shape[0]):
            outside = KernelMask(
                lo=torch.stack([torch.zeros_like(lo[i]), hi[i]]),
                hi=torch.stack([lo[i], torch.full_like(hi[i], kv_len)]),
            )
            combined = result.intersect(outside, kv_len)
            if isinstance(combined, str):
                return combined
            result = combined
        return result

    def _intervals(self, q_len: int, kv_len: int) -> tuple[Tensor, Tensor]:
        if self.lo is None or self.hi is None:  # every key
            return (
                torch.zeros(1, 1, q_len, dtype=torch.long),
                torch.full((1, 1, q_len), kv_len, dtype=torch.long),
            )
        return self.lo, self.hi


# --- the base class: an opaque mask function -----------------------------------------------------


class MaskFn:
    """A named, composable mask function; opaque to kernels unless a subclass describes itself.

    Args:
        fn: ``fn(b, h, q_idx, kv_idx) -> Tensor[bool]`` broadcasting to ``(B, H, Nq, Nk)``.
        name: how the mask prints, e.g. ``"my_mask"``.
        tiles: optional :data:`TileClassifier`, your own claim of which tiles the mask hides or
            shows entirely (see :func:`classify_tiles`); without one, a tiled backend evaluates
            ``fn`` to find out. It is trusted as given.
        check: optional :data:`CallCheck` run by :func:`qkv.attention` with the call's sizes.
        verified: True when the output is known to be a bool tensor of the broadcast shape;
            otherwise it is evaluated once per call on a small corner to check that.
        parts: masks whose own call checks run with this one's.
    """

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
        self._tiles = tiles
        self.check = check
        self.verified = verified
        self.parts = parts

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.fn(b, h, q_idx, kv_idx)

    #: True for a mask whose parameters are its own copies, never changed after construction,
    #: so that its tile states may be remembered (:func:`classify_tiles`); a mask tensor the
    #: caller may write to, or a function of your own, is not frozen.
    frozen = False

    # --- what a kernel asks ------------------------------------------------------------------
    @property
    def tiles(self) -> TileClassifier | None:
        """The tile classifier: a described mask's own :meth:`classify`, the one given to an
        opaque mask, or None (then its tiles are UNKNOWN until evaluated)."""
        if type(self).classify is not MaskFn.classify:
            return self.classify
        return self._tiles

    def classify(self, q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
        """``(nQ, nK)`` tile states from index ranges alone (see :func:`classify_tiles`)."""
        shape = (q_bounds.numel() - 1, kv_bounds.numel() - 1)
        if self._tiles is None:
            return torch.full(shape, UNKNOWN, dtype=torch.int8)
        return self._tiles(q_bounds, kv_bounds).to(torch.int8).expand(shape).contiguous()

    def lower(self, batch: int, q_len: int, kv_len: int) -> KernelMask | str:
        """The mask as :class:`KernelMask` parameters for a call of ``(B, Nq, Nk)``, or the
        reason it has none. A function of your own has none: kernels that need parameters
        refuse it, tiled backends evaluate it."""
        return f"mask {self.name!r} is a function of your own, which only a tiled backend evaluates"

    def tile(
        self,
        batch: int,
        heads: int,
        q_range: tuple[int, int],
        kv_range: tuple[int, int],
        device: torch.device | str | None = None,
    ) -> Tensor:
        """The mask of queries ``q_range`` x keys ``kv_range``, broadcastable to
        ``(B, H, Tq, Tk)``."""
        return self(*index_grid(batch, heads, q_range, kv_range, device))

    def check_call(
        self, batch: int, heads: int, q_len: int, kv_len: int, device: torch.device | None = None
    ) -> None:
        """Raise ``ValueError``/``TypeError`` naming this mask if it does not fit a call of
        ``(B, Hq, Nq, Nk) = (batch, heads, q_len, kv_len)``: its own assumptions and, unless
        verified, what it returns on a small corner of the index grid."""
        if self.check is not None:
            self.check(batch, heads, q_len, kv_len)
        for part in self.parts:
            part.check_call(batch, heads, q_len, kv_len, device)
        if not self.verified:
            check_mask_output(self, batch, heads, q_len, kv_len, device)

    def block(self, q_range: tuple[int, int], kv_range: tuple[int, int]) -> MaskFn:
        """This mask restricted to queries ``q_range`` x keys ``kv_range`` of a call, as a mask
        of its own for a call of ``(q_range[1] - q_range[0], kv_range[1] - kv_range[0])``
        positions: entry ``(b, h, i, j)`` of the block mask is entry
        ``(b, h, q_range[0] + i, kv_range[0] + j)`` of this one.

        A described mask returns a mask of its own kind with shifted or sliced parameters, so a
        block stays on the kernels that lower it; a function of your own is wrapped to add the
        offsets to the index tensors (and stays opaque). Its tile states are the ones this mask
        gives for the same positions.
        """
        if q_range[0] == 0 and kv_range[0] == 0 and self.check is None:
            return self
        return _Shifted(self, q_range, kv_range)

    def __and__(self, other: MaskFunction) -> MaskFn:
        return and_masks(self, other)

    def __or__(self, other: MaskFunction) -> MaskFn:
        return or_masks(self, other)

    def __invert__(self) -> MaskFn:
        return NotMask(self)

    def __repr__(self) -> str:
        return self.name


def mask_function(fn: MaskFunction, name: str | None = None) -> MaskFn:
    """Wrap a plain callable as a composable, opaque :class:`MaskFn` (a ``MaskFn`` is returned
    as is). Its name is only how it prints: kernels never read meaning from it."""
    if isinstance(fn, MaskFn):
        return fn
    return MaskFn(fn, name or str(getattr(fn, "__name__", "mask")))


# --- combinations ----------------------------------------------------------------------------------


class _Combination(MaskFn):
    """Shared by ``&`` and ``|``: parts evaluated and classified in turn."""

    symbol = ""
    absorbing, neutral = EMPTY, FULL

    def __init__(self, parts: tuple[MaskFn, ...]) -> None:
        name = "(" + f" {self.symbol} ".join(m.name for m in parts) + ")"
        super().__init__(self._evaluate, name, verified=True, parts=parts)

    def _join(self, a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError

    def _evaluate(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        out = self.parts[0](b, h, q, kv)
        for part in self.parts[1:]:
            out = self._join(out, part(b, h, q, kv))
        return out

    def tile(
        self,
        batch: int,
        heads: int,
        q_range: tuple[int, int],
        kv_range: tuple[int, int],
        device: torch.device | str | None = None,
    ) -> Tensor:
        out = self.parts[0].tile(batch, heads, q_range, kv_range, device)
        for part in self.parts[1:]:
            out = self._join(out, part.tile(batch, heads, q_range, kv_range, device))
        return out

    def classify(self, q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
        states = [classify_tiles(m, q_bounds, kv_bounds) for m in self.parts]
        return _combine(states, absorbing=self.absorbing, neutral=self.neutral)

    def block(self, q_range: tuple[int, int], kv_range: tuple[int, int]) -> MaskFn:
        return type(self)(tuple(m.block(q_range, kv_range) for m in self.parts))


class AndMask(_Combination):
    """Attend where every part attends."""

    symbol = "&"
    absorbing, neutral = EMPTY, FULL

    def _join(self, a: Tensor, b: Tensor) -> Tensor:
        return a & b

    def lower(self, batch: int, q_len: int, kv_len: int) -> KernelMask | str:
        out = KernelMask()
        for part in self.parts:
            lowered = part.lower(batch, q_len, kv_len)
            if isinstance(lowered, str):
                return lowered
            combined = out.intersect(lowered, kv_len)
            if isinstance(combined, str):
                return combined
            out = combined
        return out


class OrMask(_Combination):
    """Attend where any part attends."""

    symbol = "|"
    absorbing, neutral = FULL, EMPTY

    def _join(self, a: Tensor, b: Tensor) -> Tensor:
        return a | b

    def lower(self, batch: int, q_len: int, kv_len: int) -> KernelMask | str:
        out: KernelMask | None = None
        for part in self.parts:
            lowered = part.lower(batch, q_len, kv_len)
            if isinstance(lowered, str):
                return lowered
            combined = lowered if out is None else out.union(lowered, batch, q_len, kv_len)
            if isinstance(combined, str):
                return combined
            out = combined
        assert out is not None
        return out


class NotMask(MaskFn):
    """Attend where the part does not."""

    def __init__(self, part: MaskFn) -> None:
        super().__init__(self._evaluate, f"~{part.name}", verified=True, parts=(part,))
        self.part = part

    def _evaluate(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return ~self.part(b, h, q, kv)

    def tile(
        self,
        batch: int,
        heads: int,
        q_range: tuple[int, int],
        kv_range: tuple[int, int],
        device: torch.device | str | None = None,
    ) -> Tensor:
        return ~self.part.tile(batch, heads, q_range, kv_range, device)

    def classify(self, q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
        status = classify_tiles(self.part, q_bounds, kv_bounds)
        swapped = torch.where(status == FULL, EMPTY, torch.where(status == EMPTY, FULL, status))
        return swapped.to(torch.int8)

    def lower(self, batch: int, q_len: int, kv_len: int) -> KernelMask | str:
        lowered = self.part.lower(batch, q_len, kv_len)
        if isinstance(lowered, str):
            return lowered
        return lowered.complement(batch, q_len, kv_len)

    def block(self, q_range: tuple[int, int], kv_range: tuple[int, int]) -> MaskFn:
        return NotMask(self.part.block(q_range, kv_range))


class _Shifted(MaskFn):
    """A block of a mask that does not describe itself (see :meth:`MaskFn.block`): the index
    tensors are shifted to the block's first query and key before the mask is evaluated."""

    def __init__(self, base: MaskFn, q_range: tuple[int, int], kv_range: tuple[int, int]) -> None:
        self.base = base
        self.q0, self.k0 = int(q_range[0]), int(kv_range[0])
        super().__init__(
            self._evaluate, block_name(base.name, q_range, kv_range), verified=base.verified
        )

    def _evaluate(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return self.base(b, h, q + self.q0, kv + self.k0)

    def classify(self, q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
        return classify_tiles(self.base, q_bounds + self.q0, kv_bounds + self.k0)

    def tile(
        self,
        batch: int,
        heads: int,
        q_range: tuple[int, int],
        kv_range: tuple[int, int],
        device: torch.device | str | None = None,
    ) -> Tensor:
        shifted_q = (q_range[0] + self.q0, q_range[1] + self.q0)
        shifted_kv = (kv_range[0] + self.k0, kv_range[1] + self.k0)
        return self.base.tile(batch, heads, shifted_q, shifted_kv, device)

    def block(self, q_range: tuple[int, int], kv_range: tuple[int, int]) -> MaskFn:
        q_abs = (q_range[0] + self.q0, q_range[1] + self.q0)
        kv_abs = (kv_range[0] + self.k0, kv_range[1] + self.k0)
        return _Shifted(self.base, q_abs, kv_abs)


def block_name(name: str, q_range: tuple[int, int], kv_range: tuple[int, int]) -> str:
    """How the block of a mask or score function prints: ``name[q 4:8, kv 0:4]``."""
    return f"{name}[q {q_range[0]}:{q_range[1]}, kv {kv_range[0]}:{kv_range[1]}]"


def _flatten(kind: type[_Combination], masks: tuple[MaskFunction, ...]) -> tuple[MaskFn, ...]:
    parts: list[MaskFn] = []
    for m in masks:
        wrapped = mask_function(m)
        parts.extend(wrapped.parts if type(wrapped) is kind else (wrapped,))
    return tuple(parts)


def and_masks(*masks: MaskFunction) -> MaskFn:
    """Attend where every mask attends."""
    if not masks:
        raise ValueError("and_masks needs at least one mask")
    parts = _flatten(AndMask, masks)
    return parts[0] if len(parts) == 1 else AndMask(parts)


def or_masks(*masks: MaskFunction) -> MaskFn:
    """Attend where any mask attends."""
    if not masks:
        raise ValueError("or_masks needs at least one mask")
    parts = _flatten(OrMask, masks)
    return parts[0] if len(parts) == 1 else OrMask(parts)


# --- tile classification -----------------------------------------------------------------------


def classify_tiles(mask: MaskFunction, q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
    """Which tiles ``mask`` hides entirely (:data:`EMPTY`), shows entirely (:data:`FULL`) or
    partly (:data:`PARTIAL`), for every batch entry and head, from index ranges alone.

    Args:
        mask: a mask function; one that does not describe itself gives :data:`UNKNOWN`.
        q_bounds: ``(nQ + 1,)`` increasing int64 positions; query tile ``i`` is
            ``q_bounds[i] .. q_bounds[i + 1] - 1``.
        kv_bounds: ``(nK + 1,)``, the same for key tiles.

    Returns:
        ``(nQ, nK)`` int8 tensor on the CPU. FULL and EMPTY are exact; PARTIAL may be
        conservative (e.g. documents whose ids are not sorted).
    """
    q_bounds, kv_bounds = q_bounds.cpu().long(), kv_bounds.cpu().long()
    shape = (max(q_bounds.numel() - 1, 0), max(kv_bounds.numel() - 1, 0))
    if not isinstance(mask, MaskFn):
        return torch.full(shape, UNKNOWN, dtype=torch.int8)
    if not mask.frozen:
        return mask.classify(q_bounds, kv_bounds).to(torch.int8).expand(shape).contiguous()
    # A frozen mask's states depend on the bounds alone: remember them, so that a mask reused
    # call after call (a training loop's padding or documents) is classified once.
    key = (tuple(q_bounds.tolist()), tuple(kv_bounds.tolist()))
    cache: dict[tuple[tuple[int, ...], tuple[int, ...]], Tensor] = mask.__dict__.setdefault(
        "_classified", {}
    )
    if (known := cache.get(key)) is None:
        known = mask.classify(q_bounds, kv_bounds).to(torch.int8).expand(shape).contiguous()
        if len(cache) >= _CLASSIFIED_PER_MASK:
            cache.clear()
        cache[key] = known
    return known.clone()


#: Tile grids remembered per frozen mask (a few lengths and tile sizes in practice).
_CLASSIFIED_PER_MASK = 16


def _combine(states: list[Tensor], *, absorbing: int, neutral: int) -> Tensor:
    """Tile states of ``&`` (absorbing EMPTY, neutral FULL) or ``|`` (absorbing FULL, neutral
    EMPTY) of several masks: one absorbing part decides; all neutral stays neutral; otherwise
    PARTIAL, or UNKNOWN while a part has not been classified."""
    stacked = torch.stack(states)  # (parts, nQ, nK)
    out = torch.full_like(states[0], PARTIAL)
    out.masked_fill_((stacked == UNKNOWN).any(0), UNKNOWN)
    out.masked_fill_((stacked == neutral).all(0), neutral)
    return out.masked_fill_((stacked == absorbing).any(0), absorbing)


def tile_edges(bounds: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    """First and last position of every tile, shaped ``(n, 1)`` for queries (``axis=0``) or
    ``(1, n)`` for keys (``axis=1``)."""
    shape = (-1, 1) if axis == 0 else (1, -1)
    return bounds[:-1].view(shape), (bounds[1:] - 1).view(shape)


def broadcast_shape(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """The shape ``shapes`` broadcast to, as :func:`torch.broadcast_shapes` gives it.

    Plain arithmetic: ``torch.broadcast_shapes`` goes through PyTorch's symbolic-shape
    reference code, about 0.3 ms a call, which was a sixth of a 4,096-token decoding step.
    """
    rank = max((len(s) for s in shapes), default=0)
    out = [1] * rank
    for shape in shapes:
        for axis, size in enumerate(shape, start=rank - len(shape)):
            if size == out[axis] or size == 1:
                continue
            if out[axis] != 1:
                raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast together")
            out[axis] = size
    return tuple(out)


def tile_states(full: Tensor, empty: Tensor) -> Tensor:
    """Tile states from where the tiles are known full / empty (PARTIAL elsewhere)."""
    out = torch.full(broadcast_shape(full.shape, empty.shape), PARTIAL, dtype=torch.int8)
    return out.masked_fill_(full, FULL).masked_fill_(empty, EMPTY)


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


# --- checking a mask function of your own --------------------------------------------------------


def check_mask_output(
    mask: MaskFunction,
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    device: torch.device | None = None,
) -> None:
    """Evaluate ``mask`` on a small corner of a ``(B, Hq, Nq, Nk)`` index grid and raise
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
    if not broadcasts(tuple(out.shape), corner):
        raise ValueError(
            f"mask: the mask function {mask!r} returned shape {tuple(out.shape)} on a corner "
            f"of index tensors that broadcast to {corner}; its result must broadcast to "
            "(B, Hq, Tq, Tk): compute it from the index tensors, not a fixed-size tensor"
        )


def broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` without growing its rank past it."""
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target), strict=False))


def spanned(shape: tuple[int, ...]) -> int:
    """Batch x head entries a mask result of ``shape`` really spans (size-1 dims broadcast)."""
    return 1 if len(shape) < 3 else math.prod(shape[:-2])
