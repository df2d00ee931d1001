"""Block tables and per-tile bitmaps: how the triton kernels learn which tiles to compute.

A :class:`MaskPlan` is built once per call (or once per :class:`~qkv.backends.block_mask.BlockMask`
passed as ``mask=``, which is cached) from the tile summary of :mod:`qkv.backends.block_mask`,
at the kernel's own tile sizes. For each query tile it lists the key tiles that are FULL (the
kernel computes them without evaluating any mask) and PARTIAL (the kernel masks them); EMPTY
tiles are in no list. The same lists transposed drive the key-tile-major ``dK, dV`` kernel::

    status (4 x 4 tiles, causal)      query-major lists           key-major lists
      + . . .                           row 0: full -   part 0      col 0: full 1 2 3  part 0
      # + . .                           row 1: full 0   part 1      col 1: full 2 3    part 1
      # # + .                           row 2: full 0 1 part 2      ...
      # # # +

How a PARTIAL tile is masked (``mode``):

- 0: no mask; only a ragged last key tile is partial (keys past ``Nk``).
- 1: causal alone; the kernel applies ``kv <= q + offset`` from indices, no memory.
- 2: anything else (mask functions, bool tensors, block masks, causal combined with them): the
  request's mask is evaluated once per call on the PARTIAL tiles only, into a bitmap of
  ``(B', H', P, tile_q, tile_kv)`` bytes (``P`` partial tiles; ``B'``/``H'`` are 1 when the mask
  ignores the batch/head index). Memory is ``O(P * tile_q * tile_kv)``: small for windows,
  documents and padding, up to ``Nq * Nk`` bytes for a mask with no tile structure.

Mask functions are evaluated on 5-d index tensors (``b (B,1,1,1,1)``, ``h (1,H,1,1,1)``,
``q (1,1,P,Tq,1)``, ``kv (1,1,P,1,Tk)``), which every mask written with broadcasting operations
and indexing (all of :mod:`qkv.masks`) accepts.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from qkv.backends.block_mask import (
    EMPTY,
    FULL,
    PARTIAL,
    BlockMask,
    block_mask_for,
    causal_status,
)
from qkv.masks import MaskFn
from qkv.request import AttentionRequest

__all__ = ["MaskPlan", "TileTables", "causal_offset", "mask_plan"]

MODE_NONE, MODE_CAUSAL, MODE_BITMAP = 0, 1, 2
#: Partial tiles evaluated per mask-function call while filling the bitmap (bounds the index
#: tensors' memory to about ``_EVAL_TILES * tile_q * tile_kv * B' * H'`` bools).
_EVAL_TILES = 256


@dataclass(frozen=True, eq=False)
class TileTables:
    """Per tile row (query tiles, or key tiles for the transposed tables) the columns to visit.

    Attributes:
        full_cnt, part_cnt: ``(rows,)`` int32 counts of FULL and PARTIAL tiles.
        full_idx, part_idx: ``(rows, cols)`` int32, the first ``cnt`` entries of each row used.
        part_id: ``(rows, cols)`` int32, the bitmap slot of each PARTIAL tile in ``part_idx``.
    """

    full_cnt: Tensor
    full_idx: Tensor
    part_cnt: Tensor
    part_idx: Tensor
    part_id: Tensor

    @property
    def stride(self) -> int:
        return self.full_idx.shape[1]

    def args(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
        """The six kernel arguments, in kernel order."""
        return (
            self.full_cnt,
            self.full_idx,
            self.part_cnt,
            self.part_idx,
            self.part_id,
            self.stride,
        )


@dataclass(frozen=True, eq=False)
class MaskPlan:
    """Everything the kernels need to know about one call's mask at one tile size.

    Attributes:
        block_m, block_n: the tile sizes (query, key) the tables are for.
        mode: how partial tiles are masked (module docstring).
        causal_offset: ``kv <= q + offset`` for mode 1.
        rows: query-tile-major tables (forward, ``dQ``).
        cols: key-tile-major tables (``dK, dV``).
        bits: ``(B', H', P, block_m, block_n)`` uint8 bitmap for mode 2 (else a 1-element dummy).
        status: ``(nQ, nK)`` int8 tile states on the CPU (after the ragged last key tile was made
            PARTIAL), for counting.
    """

    block_m: int
    block_n: int
    mode: int
    causal_offset: int
    rows: TileTables
    cols: TileTables
    bits: Tensor
    status: Tensor
    rows_run: bool = False
    cols_run: bool = False

    def bits_strides(self) -> tuple[int, int]:
        """Batch and head strides of :attr:`bits` (0 where the mask ignores that index)."""
        if self.bits.ndim != 5:
            return 0, 0
        b, h = self.bits.shape[0], self.bits.shape[1]
        return (self.bits.stride(0) if b > 1 else 0, self.bits.stride(1) if h > 1 else 0)

    def full_run(self, transposed: bool) -> bool:
        """Whether every row's FULL tiles are consecutive (then the kernels step through them
        without reading the lists: plain address arithmetic that pipelines better)."""
        return self.cols_run if transposed else self.rows_run

    @property
    def visited_tiles(self) -> int:
        return int((self.status != EMPTY).sum())


def causal_offset(request: AttentionRequest) -> int:
    """The ``offset`` of ``kv <= q + offset`` for the request's causal alignment (0 if none)."""
    if request.causal == "bottom_right":
        return request.kv_len - request.q_len
    return 0


def _tables(status: Tensor) -> TileTables:
    """Lists of FULL and PARTIAL columns per row of ``status`` (on its device)."""
    full = status == FULL
    part = status == PARTIAL
    # Bitmap slots in row-major order of the PARTIAL tiles of the query-major status.
    return _listing(full, part, _slots(part))


def _slots(part: Tensor) -> Tensor:
    return (part.flatten().to(torch.int64).cumsum(0) - 1).view_as(part).to(torch.int32)


def _listing(full: Tensor, part: Tensor, slots: Tensor) -> TileTables:
    # A stable sort of "not selected" puts the selected columns first, in increasing order.
    full_idx = torch.sort((~full).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)
    part_idx = torch.sort((~part).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)
    part_id = slots.gather(1, part_idx.long())
    return TileTables(
        full_cnt=full.sum(1).to(torch.int32),
        full_idx=full_idx.contiguous(),
        part_cnt=part.sum(1).to(torch.int32),
        part_idx=part_idx.contiguous(),
        part_id=part_id.contiguous(),
    )


def _status(request: AttentionRequest, block_m: int, block_n: int) -> tuple[Tensor, MaskFn | None]:
    """Tile states at ``(block_m, block_n)`` and the whole mask as one function (None: no mask
    beyond causal)."""
    if request.mask is None:
        if request.causal is None:
            status = torch.full(
                (-(-request.q_len // block_m), -(-request.kv_len // block_n)),
                FULL,
                dtype=torch.int8,
            )
        else:
            offset = causal_offset(request)
            status = causal_status(request.q_len, request.kv_len, block_m, block_n, offset)
        return status, None
    if isinstance(request.mask, BlockMask) and (request.mask.tile_q, request.mask.tile_kv) != (
        block_m,
        block_n,
    ):
        # Summarised at other tile sizes: summarise its mask again at ours.
        inner = request.mask.mask
        request = dataclasses.replace(request, mask=inner)
        if inner is None:
            return _status(request, block_m, block_n)
    summary = block_mask_for(request, block_m, block_n)
    return summary.status, summary.mask


def _bitmap(
    request: AttentionRequest, mask: MaskFn, part: Tensor, block_m: int, block_n: int
) -> Tensor:
    """The mask on every PARTIAL tile, ``(B', H', P, block_m, block_n)`` uint8, in slot order."""
    device = request.device
    tiles = part.nonzero()  # (P, 2) row-major = slot order
    B, H, Nq, Nk = request.batch, request.q_heads, request.q_len, request.kv_len
    b = torch.arange(B, device=device).view(-1, 1, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, -1, 1, 1, 1)
    chunks: list[Tensor] = []
    for lo in range(0, tiles.shape[0], _EVAL_TILES):
        chunk = tiles[lo : lo + _EVAL_TILES].to(device)
        q = chunk[:, :1] * block_m + torch.arange(block_m, device=device)  # (p, block_m)
        kv = chunk[:, 1:] * block_n + torch.arange(block_n, device=device)  # (p, block_n)
        inside = (q < Nq)[:, :, None] & (kv < Nk)[:, None, :]  # (p, block_m, block_n)
        q5 = q.clamp(max=Nq - 1).view(1, 1, -1, block_m, 1)
        kv5 = kv.clamp(max=Nk - 1).view(1, 1, -1, 1, block_n)
        visible = mask(b, h, q5, kv5)
        visible = visible.reshape((1,) * (5 - visible.ndim) + tuple(visible.shape))
        chunks.append(visible & inside)
    B1 = max(c.shape[0] for c in chunks)
    H1 = max(c.shape[1] for c in chunks)
    return torch.cat(
        [c.expand(B1, H1, *c.shape[2:]).to(torch.uint8) for c in chunks], dim=2
    ).contiguous()


def _consecutive(tables: TileTables) -> bool:
    """Whether each row's FULL columns form one run ``first, first + 1, ...``."""
    cnt = tables.full_cnt.long()
    last = tables.full_idx.gather(1, (cnt - 1).clamp(min=0)[:, None]).squeeze(1).long()
    first = tables.full_idx[:, 0].long()
    return bool(((cnt == 0) | (last - first == cnt - 1)).all())


def _build(request: AttentionRequest, block_m: int, block_n: int) -> MaskPlan:
    status, mask = _status(request, block_m, block_n)
    status = status.clone()
    if request.kv_len % block_n and status.numel():
        # The ragged last key tile reads past Nk: it must be masked, so it cannot stay FULL.
        last = status[:, -1]
        last.masked_fill_(last == FULL, PARTIAL)
    if mask is not None:
        mode = MODE_BITMAP
    elif request.causal is not None:
        mode = MODE_CAUSAL
    else:
        mode = MODE_NONE
    device = request.device
    on_device = status.to(device)
    part = on_device == PARTIAL
    slots = _slots(part)
    rows = _listing(on_device == FULL, part, slots)
    cols = _listing((on_device == FULL).T, part.T, slots.T)
    if mode == MODE_BITMAP and mask is not None and bool(part.any()):
        bits = _bitmap(request, mask, part, block_m, block_n)
    else:
        bits = torch.zeros(1, dtype=torch.uint8, device=device)
    return MaskPlan(
        block_m=block_m,
        block_n=block_n,
        mode=mode,
        causal_offset=causal_offset(request),
        rows=rows,
        cols=cols,
        bits=bits,
        status=status,
        rows_run=_consecutive(rows),
        cols_run=_consecutive(cols),
    )


# Plans of calls with no mask beyond causal, by sizes: rebuilding them costs more host time than
# a short kernel takes.
_PLAIN: dict[tuple[object, ...], MaskPlan] = {}
_PLAIN_MAX = 64

# Plans of masks that can be reused: BlockMask objects and bool tensors, keyed by identity and
# everything else the plan depends on; entries die with their mask.
_CACHE: dict[tuple[object, ...], tuple[weakref.ref[object], MaskPlan]] = {}


def mask_plan(request: AttentionRequest, block_m: int, block_n: int) -> MaskPlan:
    """The plan of ``request``'s mask at tile sizes ``(block_m, block_n)``. Plans of a
    :class:`BlockMask` (or a bool tensor) passed as ``mask=`` are cached while it lives, so a
    block mask built once serves many calls without being evaluated again."""
    if request.mask is None:  # causal or nothing: a function of the sizes alone
        plain = (
            request.causal,
            request.q_len,
            request.kv_len,
            block_m,
            block_n,
            str(request.device),
        )
        if plain not in _PLAIN:
            if len(_PLAIN) >= _PLAIN_MAX:
                del _PLAIN[next(iter(_PLAIN))]  # oldest first
            _PLAIN[plain] = _build(request, block_m, block_n)
        return _PLAIN[plain]
    reusable = isinstance(request.mask, BlockMask | Tensor)
    if not reusable:
        return _build(request, block_m, block_n)
    key = (
        id(request.mask),
        request.causal,
        request.batch,
        request.q_heads,
        request.q_len,
        request.kv_len,
        block_m,
        block_n,
        str(request.device),
    )
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is request.mask:
        return hit[1]
    plan = _build(request, block_m, block_n)
    for stale in [k for k, (ref, _) in _CACHE.items() if ref() is None]:
        del _CACHE[stale]
    _CACHE[key] = (weakref.ref(request.mask), plan)
    return plan
