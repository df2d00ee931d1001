"""Tile-level mask summaries for the chunked backend (the idea of FlexAttention's ``BlockMask``).

The chunked backend cuts the ``(Nq, Nk)`` score matrix into tiles of ``tile_q x tile_kv``
positions. For each tile a :class:`BlockMask` records one of three states, valid for every batch
entry and head at once::

    EMPTY    (.)  every (b, h, q, kv) in the tile is masked  -> the tile is skipped
    FULL     (#)  every (b, h, q, kv) in the tile is visible -> computed, mask never evaluated
    PARTIAL  (+)  anything else                              -> computed, mask evaluated on it

    causal, 8 x 8 positions in 2 x 2 tiles        causal & sliding_window(2)
        + . . .                                       + . . .
        # + . .                                       + + . .
        # # + .                                       . + + .
        # # # +                                       . . + +

The summary is shared across batch and heads. The built-in masks (causal in both alignments,
sliding windows, key/query padding, documents, prefix-LM) and their ``&``, ``|``, ``~``
combinations classify their tiles from index ranges alone (:func:`qkv.masks.classify_tiles`), so
summarising them costs ``O(number of tiles)`` and evaluates nothing. Only tiles left
:data:`~qkv.masks.UNKNOWN` (a user's own mask function, a mask tensor) are evaluated: on index
tensors that broadcast, so a mask that ignores ``b`` and ``h`` is evaluated once per position
pair, in strips of at most :data:`SUMMARY_BUDGET` elements (memory ``O(N)``, never
``O(Nq * Nk)``).

A summary is computed once per call, or built once with :func:`build_block_mask` and passed as
``mask=`` to any number of calls: a :class:`BlockMask` *is* a mask function (it evaluates the mask
it summarises), so every backend accepts it and the chunked backend also reads its summary.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from qkv import masks as M
from qkv.masks import EMPTY, FULL, PARTIAL, UNKNOWN, MaskFn, MaskFunction
from qkv.request import AttentionRequest, CausalArg

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "SUMMARY_BUDGET",
    "TILE_SIZES",
    "BlockMask",
    "block_mask_for",
    "build_block_mask",
    "causal_status",
    "default_tile_sizes",
    "hinted_status",
    "request_status",
    "tile_bounds",
]

#: Most mask elements evaluated at once while summarising (a strip of ``tile_q`` rows and as many
#: key tiles as fit), so the summary needs ``O(N)`` memory however long the sequences are.
SUMMARY_BUDGET = 1 << 21

#: ``(tile_q, tile_kv)`` per (device type, dtype). A score tile holds ``B * Hq * tile_q * tile_kv``
#: values. Larger tiles mean fewer Python iterations and more efficient matmuls; smaller ones less
#: work wasted on the diagonal of causal masks and a tile that stays in cache while the softmax
#: passes over it. The CPU values are the fastest measured for the forward pass on a 2-core Xeon
#: (Sapphire Rapids, B=1, H=8, D=64, N=4096; 128 to 1024 tried per side). The CUDA values are
#: not tuned yet: larger, because every tile op is a kernel launch.
TILE_SIZES: dict[tuple[str, torch.dtype], tuple[int, int]] = {
    ("cpu", torch.float64): (256, 256),
    ("cpu", torch.float32): (256, 256),
    ("cpu", torch.bfloat16): (256, 512),
    ("cpu", torch.float16): (256, 512),
    ("cuda", torch.float64): (256, 512),
    ("cuda", torch.float32): (512, 1024),
    ("cuda", torch.bfloat16): (512, 1024),
    ("cuda", torch.float16): (512, 1024),
}
_FALLBACK_TILES = (256, 512)


def default_tile_sizes(device: torch.device | str, dtype: torch.dtype) -> tuple[int, int]:
    """The ``(tile_q, tile_kv)`` the chunked backend uses on ``device`` for ``dtype``."""
    return TILE_SIZES.get((torch.device(device).type, dtype), _FALLBACK_TILES)


def _num_tiles(length: int, tile: int) -> int:
    return math.ceil(length / tile)


def tile_bounds(length: int, tile: int) -> Tensor:
    """``(n + 1,)`` int64 tile boundaries ``0, tile, 2 * tile, ..., length`` on the CPU."""
    return torch.cat([torch.arange(0, length, tile), torch.tensor([length])])


def causal_status(q_len: int, kv_len: int, tile_q: int, tile_kv: int, offset: int) -> Tensor:
    """Tile states of the causal mask ``kv <= q + offset``, from arithmetic alone.

    Returns an ``(nQ, nK)`` int8 tensor on the CPU (``nQ = ceil(q_len / tile_q)``).
    """
    return M.classify_tiles(
        M.causal(offset), tile_bounds(q_len, tile_q), tile_bounds(kv_len, tile_kv)
    )


def hinted_status(
    mask: MaskFn | None, q_len: int, kv_len: int, tile_q: int, tile_kv: int
) -> Tensor:
    """Tile states known without evaluating anything: the mask's own classification
    (:meth:`qkv.masks.MaskFn.classify`: built-in masks, mask tensors and their combinations know
    theirs), :data:`~qkv.masks.UNKNOWN` where a mask function of your own has to be looked at,
    FULL everywhere without a mask."""
    q_bounds, kv_bounds = tile_bounds(q_len, tile_q), tile_bounds(kv_len, tile_kv)
    if mask is None:
        return torch.full((q_bounds.numel() - 1, kv_bounds.numel() - 1), FULL, dtype=torch.int8)
    return M.classify_tiles(mask, q_bounds, kv_bounds)


TileFn = Callable[[tuple[int, int], tuple[int, int]], Tensor | None]


def _summarize(
    tile_fn: TileFn, q_len: int, kv_len: int, tile_q: int, tile_kv: int, hinted: Tensor
) -> Tensor:
    """Resolve the :data:`~qkv.masks.UNKNOWN` tiles of ``hinted`` by evaluating ``tile_fn``.

    ``tile_fn(q_range, kv_range)`` returns the mask of that block, broadcastable to
    ``(B, H, Tq, Tk)``, or None when all of it is visible. Tiles are visited a strip of
    ``tile_q`` query rows at a time, with as many neighbouring unknown key tiles as fit in
    :data:`SUMMARY_BUDGET` elements, counting the batch and head dimensions the mask uses.
    Nothing is evaluated when no tile is unknown.
    """
    status = hinted.clone()
    unknown = status == UNKNOWN
    if not bool(unknown.any()):
        return status
    corner = tile_fn((0, 1), (0, 1))  # learns which of B and H the mask really spans
    spanned = 1 if corner is None or corner.ndim < 3 else math.prod(corner.shape[:-2])
    spanned = max(spanned, 1)  # a call with B or Hq = 0 has a corner that spans nothing
    run_tiles = max(1, SUMMARY_BUDGET // (spanned * tile_q * tile_kv))
    for i in unknown.any(1).nonzero().flatten().tolist():
        q_range = (i * tile_q, min((i + 1) * tile_q, q_len))
        candidates = unknown[i].nonzero().flatten().tolist()
        for j_lo, j_hi in _runs(candidates, run_tiles):
            kv_range = (j_lo * tile_kv, min(j_hi * tile_kv, kv_len))
            mask = tile_fn(q_range, kv_range)
            if mask is None:
                status[i, j_lo:j_hi] = FULL
                continue
            any_, all_ = _tile_any_all(mask, q_range, kv_range, tile_kv)
            row = torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY))
            status[i, j_lo:j_hi] = row.to(torch.int8)
    return status


def _runs(indices: list[int], longest: int) -> list[tuple[int, int]]:
    """Split sorted ``indices`` into half-open runs of consecutive values, each at most ``longest``
    long: ``[0, 1, 2, 5] -> [(0, 3), (5, 6)]``."""
    runs: list[tuple[int, int]] = []
    for j in indices:
        if runs and runs[-1][1] == j and j - runs[-1][0] < longest:
            runs[-1] = (runs[-1][0], j + 1)
        else:
            runs.append((j, j + 1))
    return runs


def _tile_any_all(
    mask: Tensor, q_range: tuple[int, int], kv_range: tuple[int, int], tile_kv: int
) -> tuple[Tensor, Tensor]:
    """Per key tile of a strip, whether any / all of the mask is True, over every batch and head.

    ``mask`` broadcasts to ``(B, H, Tq, W)`` for the strip ``q_range x kv_range``; returns two
    ``(ceil(W / tile_kv),)`` bool tensors (on the CPU).
    """
    rows, width = q_range[1] - q_range[0], kv_range[1] - kv_range[0]
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    mask = mask.expand(*mask.shape[:2], rows, width)  # a view: broadcast dims stay stride-0
    # As bytes: max/min over uint8 are vectorised; bool any/all are ~50x slower on the CPU.
    u8 = mask.to(torch.bool).view(torch.uint8)  # (B', H', Tq, W)
    n_full = width // tile_kv
    most, least = [], []
    if n_full:
        tiles = u8[..., : n_full * tile_kv].unflatten(-1, (n_full, tile_kv))  # (B', H', Tq, n, Tk)
        most.append(tiles.amax(dim=-1).amax(dim=(0, 1, 2)))  # (n,)
        least.append(tiles.amin(dim=-1).amin(dim=(0, 1, 2)))
    if width > n_full * tile_kv:  # the shorter last tile of the row
        rest = u8[..., n_full * tile_kv :]
        most.append(rest.amax().view(1))
        least.append(rest.amin().view(1))
    return torch.cat(most).cpu() > 0, torch.cat(least).cpu() > 0


class BlockMask(MaskFn):
    """A mask together with its tile-level summary; pass it as ``mask=`` to reuse the summary.

    Build one with :func:`build_block_mask`. Calling it evaluates the mask it summarises, so it
    works with every backend; the chunked backend also reads :attr:`status` to skip EMPTY tiles
    and to compute FULL tiles without evaluating the mask.

    Attributes:
        status: ``(nQ, nK)`` int8 tensor on the CPU, one of :data:`EMPTY`, :data:`PARTIAL`,
            :data:`FULL` per tile, valid for every batch entry and head it was built for.
        q_len, kv_len: the sequence lengths it describes.
        tile_q, tile_kv: the tile sizes; the chunked backend uses these for calls that pass it.
        batch, heads: the batch size and query heads it was evaluated over; 1 means the mask was
            assumed not to depend on ``b`` (resp. ``h``), so it can serve any batch size.
        mask: the mask function summarised (causal included), or None (everything visible).
    """

    def __init__(
        self,
        status: Tensor,
        *,
        mask: MaskFn | None,
        q_len: int,
        kv_len: int,
        tile_q: int,
        tile_kv: int,
        batch: int,
        heads: int,
    ) -> None:
        expected = (_num_tiles(q_len, tile_q), _num_tiles(kv_len, tile_kv))
        if tuple(status.shape) != expected:
            raise ValueError(
                f"status must have shape {expected} for q_len={q_len}, kv_len={kv_len} and tiles "
                f"({tile_q}, {tile_kv}); got {tuple(status.shape)}"
            )
        super().__init__(
            self._evaluate,
            f"block_mask({mask!r})" if mask else "block_mask(all)",
            verified=True,  # what it evaluates is its mask's, checked through parts
            parts=(mask,) if mask is not None else (),
        )
        self.status = status.to(device="cpu", dtype=torch.int8)
        self.mask = mask
        self.q_len, self.kv_len = q_len, kv_len
        self.tile_q, self.tile_kv = tile_q, tile_kv
        self.batch, self.heads = batch, heads
        self._visits: list[list[tuple[int, bool]]] | None = None

    def _evaluate(self, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        if self.mask is not None:
            return self.mask(b, h, q, kv)
        return (q >= 0) & (kv >= 0)  # everything visible, in the broadcast shape

    def tile(
        self,
        batch: int,
        heads: int,
        q_range: tuple[int, int],
        kv_range: tuple[int, int],
        device: torch.device | str | None = None,
    ) -> Tensor:
        if self.mask is not None:
            return self.mask.tile(batch, heads, q_range, kv_range, device)
        return super().tile(batch, heads, q_range, kv_range, device)

    def classify(self, q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
        own = (tile_bounds(self.q_len, self.tile_q), tile_bounds(self.kv_len, self.tile_kv))
        if torch.equal(q_bounds, own[0]) and torch.equal(kv_bounds, own[1]):
            return self.status.clone()
        if self.mask is None:
            shape = (q_bounds.numel() - 1, kv_bounds.numel() - 1)
            return torch.full(shape, FULL, dtype=torch.int8)
        return M.classify_tiles(self.mask, q_bounds, kv_bounds)

    def lower(self, batch: int, q_len: int, kv_len: int) -> M.KernelMask | str:
        return M.KernelMask() if self.mask is None else self.mask.lower(batch, q_len, kv_len)

    # --- the tile grid ---------------------------------------------------------------------------
    def q_range(self, i: int) -> tuple[int, int]:
        """Query positions of tile row ``i``."""
        return i * self.tile_q, min((i + 1) * self.tile_q, self.q_len)

    def kv_range(self, j: int) -> tuple[int, int]:
        """Key positions of tile column ``j``."""
        return j * self.tile_kv, min((j + 1) * self.tile_kv, self.kv_len)

    def visits(self, i: int) -> list[tuple[int, bool]]:
        """The key tiles query tile ``i`` must compute, as ``(j, is_full)`` in increasing ``j``."""
        if self._visits is None:
            self._visits = [
                [(j, s == FULL) for j, s in enumerate(row) if s != EMPTY]
                for row in self.status.tolist()
            ]
        return self._visits[i]

    # --- counts ------------------------------------------------------------------------------
    @property
    def num_tiles(self) -> int:
        return self.status.numel()

    @property
    def visited_tiles(self) -> int:
        """Tiles computed per pass: all but the EMPTY ones."""
        return int((self.status != EMPTY).sum())

    @property
    def partial_tiles(self) -> int:
        """Tiles on which the mask is evaluated."""
        return int((self.status == PARTIAL).sum())

    @property
    def density(self) -> float:
        """Fraction of tiles computed (1.0 for no mask, about 0.5 for causal)."""
        return self.visited_tiles / self.num_tiles if self.num_tiles else 0.0

    def __repr__(self) -> str:
        return (
            f"BlockMask({self.mask!r}, q_len={self.q_len}, kv_len={self.kv_len}, "
            f"tiles=({self.tile_q}, {self.tile_kv}), visited={self.visited_tiles}/{self.num_tiles}"
            f", partial={self.partial_tiles})"
        )

    def to_string(self) -> str:
        """The tile states as a picture: ``#`` full, ``+`` partial, ``.`` empty."""
        chars = {EMPTY: ".", PARTIAL: "+", FULL: "#"}
        return "\n".join("".join(chars[s] for s in row) for row in self.status.tolist())

    # --- use with a request ------------------------------------------------------------------
    def incompatibility(self, request: AttentionRequest) -> str | None:
        """Why this summary cannot describe ``request``'s mask (None when it can)."""
        if (self.q_len, self.kv_len) != (request.q_len, request.kv_len):
            return (
                f"the block mask was built for q_len={self.q_len}, kv_len={self.kv_len} but the "
                f"call has Nq={request.q_len}, Nk={request.kv_len}"
            )
        corner = self(*request.indices((0, min(2, request.q_len)), (0, min(2, request.kv_len))))
        corner = corner.reshape((1,) * (4 - corner.ndim) + tuple(corner.shape))
        for what, built, size, dim in (
            ("batch", self.batch, request.batch, 0),
            ("heads", self.heads, request.q_heads, 1),
        ):
            if built not in (1, size):
                return f"the block mask was built for {what}={built} but the call has {size}"
            if built == 1 and size > 1 and corner.shape[dim] > 1:
                return (
                    f"the block mask was built with {what}=1 but its mask depends on the "
                    f"{what} index; build it with {what}={size}"
                )
        return None


def build_block_mask(
    mask: MaskFunction | Tensor | None,
    *,
    q_len: int,
    kv_len: int,
    causal: CausalArg = False,
    batch: int = 1,
    heads: int = 1,
    tile_q: int | None = None,
    tile_kv: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> BlockMask:
    """Summarise a mask tile by tile once, to reuse it across calls (like FlexAttention's
    ``create_block_mask``)::

        bm = build_block_mask(masks.sliding_window(255), q_len=N, kv_len=N, causal=True)
        for q, k, v in batches:
            out = qkv.attention(q, k, v, mask=bm, backend="chunked")

    Args:
        mask: a mask function ``(b, h, q_idx, kv_idx) -> bool``, a bool tensor broadcastable to
            ``(batch, heads, q_len, kv_len)`` (True = attend), or None.
        q_len, kv_len: ``Nq`` and ``Nk`` of the calls it will serve.
        causal: as in :func:`qkv.attention`; folded into the mask (and summarised exactly).
        batch, heads: evaluate the mask over this many batch entries and query heads. Leave at 1
            when the mask ignores ``b`` (resp. ``h``): the summary then serves any batch size.
            A call whose mask turns out to depend on an index built with 1 is refused.
        tile_q, tile_kv: tile sizes; default :func:`default_tile_sizes` of ``device``/``dtype``.
            Calls that pass this block mask run with these tile sizes.
        device: where the mask function is evaluated (the device of the calls).
        dtype: the dtype of the calls, to pick default tile sizes.

    Returns:
        A :class:`BlockMask`, usable as ``mask=`` with every backend.
    """
    default_q, default_kv = default_tile_sizes(device, dtype)
    tile_q, tile_kv = tile_q or default_q, tile_kv or default_kv
    if tile_q < 1 or tile_kv < 1 or q_len < 0 or kv_len < 0:
        raise ValueError(
            f"need tile sizes >= 1 and lengths >= 0; got tile_q={tile_q}, tile_kv={tile_kv}, "
            f"q_len={q_len}, kv_len={kv_len}"
        )
    parts: list[MaskFn] = []
    alignment = _alignment(causal)
    offset = kv_len - q_len if alignment == "bottom_right" else 0
    if alignment is not None:
        parts.append(M.causal(offset))
    if isinstance(mask, Tensor):
        parts.append(M.dense(mask.to(device)))
    elif mask is not None:
        parts.append(M.mask_function(mask))
    combined = None if not parts else parts[0] if len(parts) == 1 else M.and_masks(*parts)

    hinted = hinted_status(combined, q_len, kv_len, tile_q, tile_kv)

    def tile_fn(q_range: tuple[int, int], kv_range: tuple[int, int]) -> Tensor | None:
        if combined is None:
            return None
        return combined.tile(batch, heads, q_range, kv_range, device)

    status = _summarize(tile_fn, q_len, kv_len, tile_q, tile_kv, hinted)
    return BlockMask(
        status,
        mask=combined,
        q_len=q_len,
        kv_len=kv_len,
        tile_q=tile_q,
        tile_kv=tile_kv,
        batch=batch,
        heads=heads,
    )


def _alignment(causal: CausalArg) -> str | None:
    if causal is None or causal is False:
        return None
    if causal is True:
        return "top_left"
    if causal in ("top_left", "bottom_right"):
        return causal
    raise ValueError(f'causal must be False, True, "top_left" or "bottom_right"; got {causal!r}')


_STATUS: weakref.WeakKeyDictionary[AttentionRequest, dict[tuple[int, int, bool], Tensor]] = (
    weakref.WeakKeyDictionary()
)


def request_status(
    request: AttentionRequest, tile_q: int, tile_kv: int, *, resolve: bool = True
) -> Tensor:
    """The ``(nQ, nK)`` tile states of a call's whole mask (``request.whole_mask``), computed
    once per request and tile size and shared by pricing and execution.

    With ``resolve=False`` only what is known without evaluating anything (tiles of a mask
    function of your own stay :data:`~qkv.masks.UNKNOWN`: what ``auto`` prices); with
    ``resolve=True`` those tiles are evaluated (what a backend runs). A :class:`BlockMask`
    passed as the mask brings its own states at its own tile sizes.
    """
    per_request = _STATUS.setdefault(request, {})
    key = (tile_q, tile_kv, resolve)
    if (known := per_request.get(key)) is not None:
        return known
    hinted = per_request.get((tile_q, tile_kv, False))
    if hinted is None:
        finer = [
            (tq, w) for (tq, w, r) in per_request if not r and tile_q % tq == 0 and tile_kv % w == 0
        ]
        if finer:  # pooled from finer tiles: no second pass over the mask
            height, width = max(finer)
            hinted = _pool_columns(per_request[(height, width, False)], tile_kv // width)
            hinted = _pool_columns(hinted.T, tile_q // height).T.contiguous()
        else:
            hinted = hinted_status(
                request.whole_mask, request.q_len, request.kv_len, tile_q, tile_kv
            )
        per_request[(tile_q, tile_kv, False)] = hinted
    if resolve:
        status = _summarize(
            request.mask_tile, request.q_len, request.kv_len, tile_q, tile_kv, hinted
        )
        per_request[key] = status
        return status
    return hinted


def _pool_columns(status: Tensor, factor: int) -> Tensor:
    """Tile states of key tiles ``factor`` times wider: EMPTY or FULL where every narrow tile
    is, UNKNOWN where one is, PARTIAL otherwise (exact: a tile is full iff its parts are).
    Query tiles pool the same way, on the transpose."""
    if factor == 1:
        return status
    rows, cols = status.shape
    wide = -(-cols // factor)
    absent = -1  # the narrow tiles past the last key: neither empty nor full, just absent
    padded = torch.full((rows, wide * factor), absent, dtype=torch.int8)
    padded[:, :cols] = status
    parts = padded.view(rows, wide, factor)
    all_empty = ((parts == EMPTY) | (parts == absent)).all(-1)
    all_full = ((parts == FULL) | (parts == absent)).all(-1)
    out = torch.full((rows, wide), PARTIAL, dtype=torch.int8)
    out.masked_fill_((parts == UNKNOWN).any(-1), UNKNOWN)
    return out.masked_fill_(all_full, FULL).masked_fill_(all_empty, EMPTY)


def block_mask_for(request: AttentionRequest, tile_q: int, tile_kv: int) -> BlockMask:
    """The tile summary of one call's whole mask (causal, mask function or tensor).

    A :class:`BlockMask` passed as the request's mask is reused with its own tile sizes (the
    caller checks :meth:`BlockMask.incompatibility` first) and combined with the call's causal
    flag; otherwise :func:`request_status` at these tile sizes.
    """
    if isinstance(request.mask, BlockMask):
        tile_q, tile_kv = request.mask.tile_q, request.mask.tile_kv
    return BlockMask(
        request_status(request, tile_q, tile_kv),
        mask=request.whole_mask,
        q_len=request.q_len,
        kv_len=request.kv_len,
        tile_q=tile_q,
        tile_kv=tile_kv,
        batch=request.batch,
        heads=request.q_heads,
    )
