"""Exact attention over a sequence sharded across processes (context parallelism).

Notation: ``P`` ranks; on this rank ``nq`` queries and ``nk`` keys of a sequence of ``Nq``
queries and ``Nk`` keys; ``B``, ``Hq``, ``Hkv``, ``D``, ``Dv`` as in :func:`qkv.attention`.

The algorithm. Each rank holds a shard of the queries and a shard of the keys and values
(:mod:`qkv.parallel.layout`). A query row's softmax over all ``Nk`` keys is assembled from
blocks: for each key block ``i`` the rank runs :func:`qkv.attention` with ``return_lse=True``,
getting the block's output ``o_i`` and log-sum-exp ``lse_i``, and merges them exactly::

    lse = log sum_i exp(lse_i)          out = sum_i exp(lse_i - lse) * o_i

in the statistics dtype (float32; float64 for float64), with the row maximum taken out first
(a row no block attends keeps ``lse = -inf`` and ``out = 0``). Each block runs as a call of its
own size with the **same** mask and score function the user gave for the whole sequence,
restricted to the block (:meth:`qkv.masks.MaskFn.block`, :func:`qkv.scores.block_score`): a
causal mask, a window, documents, padding, prefix-LM, ALiBi, a relative-position table, a mask
function of your own all see global positions, and a built-in stays on the kernels that lower
it. The mask's tile classification over ``(query range, key block)`` pairs says which blocks are
EMPTY: those are neither computed nor (with ``method="ring"``) sent.

Methods:

- ``"all_gather"``: every rank gathers every rank's K/V (one collective, padded to the longest
  shard), then computes its non-empty blocks. Backward sums each block's K/V gradient over the
  ranks (an all-reduce) and keeps its own.
- ``"ring"``: K/V travel around the ring of ranks (rank ``r`` sends to ``r + 1``) in pieces (a
  shard cut into ``pieces``), one hop per step, the transfer of the next piece overlapped with
  the computation of the current one. A shard travels only as far as the farthest rank that
  needs it, so a sliding window that reaches one neighbour exchanges with that neighbour only.
  Backward sends the pieces along the same hops again, each with the gradient accumulated for
  it since its first hop, and where a piece's travel ends its gradient goes home.

Memory: forward and backward are one ``autograd.Function`` that keeps only ``q``, ``k``, ``v``,
the merged output and log-sum-exp; backward recomputes each block (as FlashAttention recomputes
its tiles) and differentiates it with autograd (every backend that serves ``return_lse`` also
differentiates it). Results merge in place into preallocated accumulators, and the block calls
are piece x piece, so with ``method="ring"`` a rank holds its shard's tensors plus at most a
few pieces of K/V and gradients (the one it computes, the one arriving, a gradient coming
home): ``O(N / P)``. ``method="all_gather"`` holds every rank's K/V, ``O(N)``.

Tensors every rank holds (a bias tensor for the whole sequence, a relative-position table)
receive this rank's part of their gradient; sum it over the ranks as for any replicated
parameter (DDP's all-reduce does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias, overload

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from qkv import masks as M
from qkv.backends.block_mask import BlockMask
from qkv.functional.attention import attention as attention_call
from qkv.mask_core import EMPTY, FULL, MaskFn, classify_tiles
from qkv.parallel.comm import CommStats, all_gather_padded, all_reduce_sum, exchange
from qkv.parallel.layout import LayoutKind, SequenceLayout
from qkv.request import (
    BiasArg,
    CausalArg,
    MaskArg,
    as_4d,
    broadcasts_to,
    stats_dtype,
)
from qkv.scores import ScoreMod, block_score, check_score_call

__all__ = ["ContextParallel", "Method", "context_parallel_attention", "global_lengths", "merge"]

Method: TypeAlias = Literal["ring", "all_gather"]
Range: TypeAlias = tuple[int, int]


@dataclass(frozen=True)
class ContextParallel:
    """How a module runs attention context-parallel (see
    :meth:`qkv.nn.MultiHeadAttention.set_context_parallel`).

    Attributes:
        group: the process group whose ranks hold the shards (None: the world).
        layout: ``"contiguous"`` or ``"zigzag"``.
        method: ``"ring"`` or ``"all_gather"``.
    """

    group: dist.ProcessGroup | None = None
    layout: LayoutKind = "contiguous"
    method: Method = "ring"

    def __post_init__(self) -> None:
        if self.layout not in ("contiguous", "zigzag"):
            raise ValueError(f"layout must be 'contiguous' or 'zigzag'; got {self.layout!r}")
        if self.method not in ("ring", "all_gather"):
            raise ValueError(f"method must be 'ring' or 'all_gather'; got {self.method!r}")

    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def rank(self) -> int:
        return dist.get_rank(self.group)


# --- the plan: who holds what, who needs what --------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """A run of consecutive positions of one rank's shard: global positions ``[start, stop)``,
    found at ``offset`` in that rank's local tensors."""

    start: int
    stop: int
    offset: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    @property
    def span(self) -> Range:
        return self.start, self.stop

    @property
    def local(self) -> slice:
        return slice(self.offset, self.offset + self.length)


def _cut(ranges: list[Range], cuts: int) -> list[_Piece]:
    """Each range cut into ``cuts`` near-equal pieces (the first ones one longer), in order,
    with their offsets in the shard the ranges form."""
    pieces, offset = [], 0
    for start, stop in ranges:
        base, extra = divmod(stop - start, cuts)
        for i in range(cuts):
            length = base + (1 if i < extra else 0)
            pieces.append(_Piece(start, start + length, offset))
            start, offset = start + length, offset + length
    return pieces


def _chunks(layout: SequenceLayout, rank: int) -> list[Range]:
    """The chunks rank ``rank`` holds, in shard order, empty ones too (so that every rank has
    as many pieces as every other)."""
    chunks = layout.chunks()
    if layout.kind == "zigzag":
        return [chunks[rank], chunks[2 * layout.world_size - 1 - rank]]
    return [chunks[rank]]


@dataclass(frozen=True, eq=False)
class _Plan:
    """Everything every rank knows alike: layouts, the mask, which blocks are needed, and how
    finely shards are cut (``cuts`` pieces per chunk, the same on every rank, so every rank's
    shard has the same number of pieces and the ring moves them in lockstep)."""

    rank: int
    world: int
    group: dist.ProcessGroup | None
    q_layout: SequenceLayout
    kv_layout: SequenceLayout
    mask: MaskFn | None
    score_mod: Callable[..., Tensor] | None
    bias: Tensor | None  # a bias tensor for the whole (B, Hq, Nq, Nk), 4-d
    scale: float | None
    backend: str
    method: Method
    stats: CommStats | None
    cuts: int = 1
    need: tuple[tuple[bool, ...], ...] = ()  # need[r][o]: rank r reads the K/V of rank o
    states: dict[tuple[Range, Range], int] = dataclasses.field(default_factory=dict)

    def q_ranges(self, rank: int) -> list[Range]:
        return self.q_layout.ranges(rank)

    def kv_ranges(self, rank: int) -> list[Range]:
        return self.kv_layout.ranges(rank)

    def q_pieces(self) -> list[_Piece]:
        """This rank's queries, cut as the K/V are: every block call is piece x piece (a
        call's temporaries grow with its query rows, so they are cut as finely)."""
        return _cut(_chunks(self.q_layout, self.rank), self.cuts)

    def kv_pieces(self, origin: int) -> list[_Piece]:
        return _cut(_chunks(self.kv_layout, origin), self.cuts)

    def state(self, q_range: Range, kv_range: Range) -> int:
        """EMPTY, FULL, PARTIAL or UNKNOWN for queries ``q_range`` x keys ``kv_range`` (worked
        out once per pair: forward and backward ask for every block)."""
        if self.mask is None:
            return FULL
        found = self.states.get((q_range, kv_range))
        if found is None:
            bounds = (torch.tensor(q_range), torch.tensor(kv_range))
            found = self.states[q_range, kv_range] = int(classify_tiles(self.mask, *bounds)[0, 0])
        return found


#: Default: a shard's K/V travel in about this many pieces (fewer for short shards), so that a
#: rank holds a few pieces in flight instead of whole shards (the ``pieces`` argument).
DEFAULT_PIECES = 32
#: The shortest piece the default cuts (shorter blocks cost more in calls than they save).
MIN_PIECE = 256


def _cuts(
    q_layout: SequenceLayout, kv_layout: SequenceLayout, per_shard: int, shortest_piece: int
) -> int:
    """Pieces per chunk: about ``per_shard`` pieces per shard, as long as a piece keeps
    ``shortest_piece`` positions (and at least 1: no piece is empty unless a chunk is)."""
    chunks = 2 if kv_layout.kind == "zigzag" else 1
    shortest = min(b - a for layout in (q_layout, kv_layout) for a, b in layout.chunks())
    return max(1, min(-(-per_shard // chunks), shortest // shortest_piece))


def _needs(plan: _Plan) -> tuple[tuple[bool, ...], ...]:
    """Whether rank ``r``'s queries see any key of rank ``o``, for every pair: the same on
    every rank, since it is worked out from the whole mask and the layouts alone."""
    return tuple(
        tuple(
            any(plan.state(qr, kr) != EMPTY for qr in plan.q_ranges(r) for kr in plan.kv_ranges(o))
            for o in range(plan.world)
        )
        for r in range(plan.world)
    )


def _ring_reach(plan: _Plan) -> list[int]:
    """For each origin rank ``o``, how many hops its K/V travel along the ring: up to the
    farthest rank ``o + s`` that needs them (0: they stay home)."""
    reach = []
    for o in range(plan.world):
        hops = [s for s in range(1, plan.world) if plan.need[(o + s) % plan.world][o]]
        reach.append(max(hops, default=0))
    return reach


# --- one block, and the merge --------------------------------------------------------------------


def _block(
    plan: _Plan, q: Tensor, k: Tensor, v: Tensor, q_range: Range, kv_range: Range
) -> tuple[Tensor, Tensor] | None:
    """Attention of local queries ``q`` (global positions ``q_range``) over the keys and values
    ``k``, ``v`` (global positions ``kv_range``): ``(out, lse)``, or None when the mask hides
    the whole block."""
    if q_range[0] == q_range[1] or kv_range[0] == kv_range[1]:
        return None
    state = plan.state(q_range, kv_range)
    if state == EMPTY:
        return None
    mask = None if plan.mask is None or state == FULL else plan.mask.block(q_range, kv_range)
    bias: BiasArg = None
    if plan.score_mod is not None:
        bias = block_score(plan.score_mod, q_range, kv_range)
    elif plan.bias is not None:
        t = plan.bias
        rows = slice(*q_range) if t.shape[-2] > 1 else slice(None)
        cols = slice(*kv_range) if t.shape[-1] > 1 else slice(None)
        bias = t[..., rows, cols]
    out, lse = attention_call(
        q, k, v, mask=mask, bias=bias, scale=plan.scale, return_lse=True, backend=plan.backend
    )
    return out, lse


def _weights(lse_a: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(w_a, w_b, lse, attended)`` of the merge of two log-sum-exps: ``w_x = exp(lse_x -
    lse)``, computed after taking out the row maximum (a row neither attends: zeros, -inf)."""
    top = torch.maximum(lse_a, lse_b).detach()  # the merge does not depend on it
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w_a, w_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = w_a + w_b
    attended = total > 0
    safe = torch.where(attended, total, torch.ones_like(total))
    lse = torch.where(attended, top + torch.log(safe), float("-inf"))
    return w_a / safe, w_b / safe, lse, attended


def merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """The attention of two disjoint key sets merged into one, exactly.

    Args:
        out_a, out_b: ``(B, H, n, Dv)`` outputs over each key set.
        lse_a, lse_b: ``(B, H, n)`` their log-sum-exps (``-inf``: the row attended nothing).

    Returns:
        ``out = w_a out_a + w_b out_b`` with ``w = exp(lse_x - lse)`` and
        ``lse = log(exp(lse_a) + exp(lse_b))``, computed after taking out the row maximum; a
        row neither attends gives ``out = 0``, ``lse = -inf`` and zero gradients.
    """
    w_a, w_b, lse, _ = _weights(lse_a, lse_b)
    return w_a[..., None] * out_a + w_b[..., None] * out_b, lse


class _Merged:
    """The shard's running ``(out, lse)`` (stats dtype), preallocated once: each block's
    result merges into its rows in place, so forward holds one output, not one per block."""

    def __init__(self, q: Tensor, value_dim: int) -> None:
        sd = stats_dtype(q.dtype)
        self.out = q.new_zeros(*q.shape[:3], value_dim, dtype=sd)  # (B, Hq, nq, Dv)
        self.lse = q.new_full(q.shape[:3], float("-inf"), dtype=sd)  # (B, Hq, nq)

    def add(self, rows: slice, result: tuple[Tensor, Tensor] | None) -> None:
        if result is None:
            return
        out, lse = self.out[:, :, rows], self.lse[:, :, rows]
        w_a, w_b, merged, _ = _weights(lse, result[1])
        out.mul_(w_a[..., None]).add_(w_b[..., None] * result[0].to(out.dtype))
        lse.copy_(merged)


def _absorb(plan: _Plan, merged: _Merged, q: Tensor, k: Tensor, v: Tensor, kv_range: Range) -> None:
    """Merge every non-empty block of this rank's query pieces x the keys ``k`` and values
    ``v`` (global positions ``kv_range``)."""
    for qp in plan.q_pieces():
        merged.add(qp.local, _block(plan, q[:, :, qp.local], k, v, qp.span, kv_range))


# --- forward: the two methods --------------------------------------------------------------------


def _forward_all_gather(plan: _Plan, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Every rank's K/V gathered (one collective), then this rank's non-empty blocks."""
    lengths = [plan.kv_layout.shard_length(r) for r in range(plan.world)]
    d = k.shape[-1]
    gathered = all_gather_padded(_packed(k, v), lengths, plan.group, plan.stats, "forward")
    merged = _Merged(q, v.shape[-1])
    for o in range(plan.world):
        if not plan.need[plan.rank][o]:
            continue
        kv = gathered[o]
        for kp in plan.kv_pieces(o):
            piece = kv[:, :, kp.local]
            _absorb(plan, merged, q, piece[..., :d], piece[..., d:], kp.span)
    return merged.out, merged.lse


def _forward_ring(plan: _Plan, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The K/V travel piece by piece: for piece ``j`` of every shard, step ``s`` has rank ``r``
    hold piece ``j`` of origin ``r - s``, pass it on to ``r + 1`` (as far as that origin's
    reach) and receive the next from ``r - 1`` while it computes the one it holds. A rank so
    holds two pieces of K/V at a time besides its own shard."""
    P, r, d = plan.world, plan.rank, k.shape[-1]
    reach = _ring_reach(plan)
    steps = max(reach, default=0)
    merged = _Merged(q, v.shape[-1])
    own = plan.kv_pieces(r)
    for j in range(len(own)):
        current: Tensor | None = None  # piece j of origin r - s, received
        for s in range(steps + 1):
            o, coming = (r - s) % P, (r - s - 1) % P
            piece, next_piece = plan.kv_pieces(o)[j], plan.kv_pieces(coming)[j]
            held = piece.length > 0 and (s == 0 or current is not None)
            if s == 0:
                kj, vj = k[:, :, piece.local], v[:, :, piece.local]
            elif current is not None:
                kj, vj = current[..., :d], current[..., d:]
            sends = []
            if held and s < reach[o]:
                sends = [((r + 1) % P, _packed(kj, vj) if s == 0 else current)]
            buffer = None
            if next_piece.length > 0 and s + 1 <= reach[coming]:
                buffer = _kv_buffer(k, v, next_piece.length)
            recvs = [] if buffer is None else [((r - 1) % P, buffer)]
            works = exchange(sends, recvs, plan.group, plan.stats, "forward")  # type: ignore[arg-type]
            if held and plan.need[r][o]:
                _absorb(plan, merged, q, kj, vj, piece.span)  # overlaps the transfer
            for work in works:
                work.wait()
            current = buffer
    return merged.out, merged.lse


def _kv_buffer(k: Tensor, v: Tensor, length: int, dtype: torch.dtype | None = None) -> Tensor:
    """An empty ``(B, Hkv, length, D + Dv)`` buffer for a K/V piece (or its gradient)."""
    return k.new_empty(*k.shape[:2], length, k.shape[3] + v.shape[3], dtype=dtype)


# --- backward: each block recomputed, its gradients sent home ------------------------------------


@dataclass
class _Backward:
    """What every block's backward reads and where its gradients go (stats dtype).

    ``out``/``lse`` are the merged forward results, ``grad_out``/``grad_lse`` their gradients;
    ``dq`` accumulates this rank's query gradient, ``leaves`` the gradients of the bias tensor
    and the score function's learnable tensors (None until a block reads them).
    """

    plan: _Plan
    q: Tensor
    out: Tensor  # (B, Hq, nq, Dv)
    lse: Tensor  # (B, Hq, nq)
    grad_out: Tensor
    grad_lse: Tensor
    dq: Tensor
    inputs: list[Tensor]  # bias leaf (if it needs grad) and the score function's leaves
    leaves: list[Tensor | None]

    def block_grads(self, k: Tensor, v: Tensor, kv_range: Range, dk: Tensor, dv: Tensor) -> None:
        """Add the gradients of the keys ``k`` and values ``v`` (global positions
        ``kv_range``) from this rank's queries to ``dk`` and ``dv``; ``dq`` and the leaves'
        gradients accumulate too.

        With ``w_i = exp(lse_i - lse)`` the merge gives ``dO_i = w_i dO`` and
        ``dlse_i = w_i (rowsum(dO * (o_i - out)) + dlse)``: each block's call is rerun and
        differentiated with those (so nothing but ``q, k, v, out, lse`` is kept from forward).
        """
        sd = self.out.dtype
        for qp in self.plan.q_pieces():
            if qp.length == 0 or self.plan.state(qp.span, kv_range) == EMPTY:
                continue
            rows = qp.local
            with torch.enable_grad():  # separate leaves: no (n, D + Dv) zeros per slice
                q_leaf = self.q[:, :, rows].detach().requires_grad_()
                k_leaf = k.detach().requires_grad_()
                v_leaf = v.detach().requires_grad_()
                result = _block(self.plan, q_leaf, k_leaf, v_leaf, qp.span, kv_range)
            if result is None:
                continue
            grads = self._through(result, rows, [q_leaf, k_leaf, v_leaf, *self.inputs])
            self.dq[:, :, rows] += grads[0].to(sd)
            dk += grads[1].to(sd)
            dv += grads[2].to(sd)
            for n, g in enumerate(grads[3:]):
                total = self.leaves[n]
                self.leaves[n] = g if total is None else total + g

    def _through(
        self, result: tuple[Tensor, Tensor], rows: slice, inputs: list[Tensor]
    ) -> list[Tensor]:
        out_i, lse_i = result
        lse, out = self.lse[:, :, rows], self.out[:, :, rows]
        safe = torch.where(torch.isfinite(lse), lse, 0.0)
        weight = torch.exp(lse_i.detach() - safe)  # (B, Hq, n); 0 where the block sees nothing
        grad_out = self.grad_out[:, :, rows]
        spread = (grad_out * (out_i.detach().to(out.dtype) - out)).sum(-1)
        grad_lse_i = weight * (spread + self.grad_lse[:, :, rows])
        found = torch.autograd.grad(
            (out_i, lse_i),
            inputs,
            (weight[..., None] * grad_out, grad_lse_i),
            allow_unused=True,
        )
        return [torch.zeros_like(t) if g is None else g for g, t in zip(found, inputs, strict=True)]


def _backward_all_gather(state: _Backward, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Gather the K/V again, differentiate every needed block, sum each rank's K/V gradient
    over the ranks (one all-reduce) and keep this rank's."""
    plan, d = state.plan, k.shape[-1]
    lengths = [plan.kv_layout.shard_length(r) for r in range(plan.world)]
    gathered = all_gather_padded(_packed(k, v), lengths, plan.group, plan.stats, "backward")
    total = k.new_zeros(
        plan.world, *k.shape[:2], max(lengths), d + v.shape[-1], dtype=state.out.dtype
    )
    for o in range(plan.world):
        if not plan.need[plan.rank][o]:
            continue
        for kp in plan.kv_pieces(o):
            kv, into = gathered[o][:, :, kp.local], total[o][:, :, kp.local]
            state.block_grads(kv[..., :d], kv[..., d:], kp.span, into[..., :d], into[..., d:])
    all_reduce_sum(total, plan.group, plan.stats, "backward")
    mine = total[plan.rank, :, :, : lengths[plan.rank]]
    return mine[..., :d], mine[..., d:]


def _backward_ring(state: _Backward, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The forward's hops again, piece by piece. A piece that left home travels with the
    gradient accumulated for it so far (from the first rank it reached); where its travel
    ends, that gradient goes home in one message. Per step a rank posts the K/V it passes on
    and the receive of the next first, computes its part while they travel, then exchanges
    gradients: it sends on the one it added to and receives the next piece's (and its own
    piece's coming home). It holds at most the K/V and gradient of the piece it computes, of
    the piece arriving, and a gradient coming home.

    Each exchange is a ring exchange of its own (every rank sends and receives in it), so no
    rank's first exchange waits on another rank's second: on NCCL, whose point-to-point
    batches run in order on a stream, that would be a cycle around the ring."""
    plan = state.plan
    P, r, d = plan.world, plan.rank, k.shape[-1]
    sd = state.out.dtype
    reach = _ring_reach(plan)
    steps = max(reach, default=0)
    dk, dv = torch.zeros_like(k, dtype=sd), torch.zeros_like(v, dtype=sd)
    own = plan.kv_pieces(r)
    for j, mine in enumerate(own):
        current: Tensor | None = None  # piece j of origin r - s, received
        carried: Tensor | None = None  # its gradient, received with it (from hop 2 on)
        for s in range(steps + 1):
            o, coming = (r - s) % P, (r - s - 1) % P
            piece, next_piece = plan.kv_pieces(o)[j], plan.kv_pieces(coming)[j]
            held = piece.length > 0 and (s == 0 or current is not None)
            onward = held and s < reach[o]
            if s == 0:
                kj, vj = k[:, :, piece.local], v[:, :, piece.local]
            elif current is not None:
                kj, vj = current[..., :d], current[..., d:]
            sends = [((r + 1) % P, _packed(kj, vj) if s == 0 else current)] if onward else []
            recvs: list[tuple[int, Tensor]] = []
            grad_recvs: list[tuple[int, Tensor]] = []
            buffer = grad_buffer = home = None
            if next_piece.length > 0 and s + 1 <= reach[coming]:
                buffer = _kv_buffer(k, v, next_piece.length)
                recvs.append(((r - 1) % P, buffer))
                if s + 1 >= 2:  # a gradient travels with it from its second hop on
                    grad_buffer = _kv_buffer(k, v, next_piece.length, sd)
                    grad_recvs.append(((r - 1) % P, grad_buffer))
            if mine.length > 0 and reach[r] > 0 and s == reach[r]:
                home = _kv_buffer(k, v, mine.length, sd)
                grad_recvs.append(((r + reach[r]) % P, home))
            works = exchange(sends, recvs, plan.group, plan.stats, "backward")  # type: ignore[arg-type]
            grad_sends: list[tuple[int, Tensor]] = []
            if s == 0:  # this rank's own piece: straight into its gradient
                if plan.need[r][r]:
                    into = dk[:, :, piece.local], dv[:, :, piece.local]
                    state.block_grads(kj, vj, piece.span, *into)
            elif held:
                if carried is None:
                    carried = _kv_buffer(k, v, piece.length, sd).zero_()
                if plan.need[r][o]:
                    state.block_grads(kj, vj, piece.span, carried[..., :d], carried[..., d:])
                to = (r + 1) % P if onward else o  # on, or home where the travel ends
                grad_sends = [(to, carried)]
            works += exchange(grad_sends, grad_recvs, plan.group, plan.stats, "backward")
            for work in works:
                work.wait()
            if home is not None:
                dk[:, :, mine.local] += home[..., :d]
                dv[:, :, mine.local] += home[..., d:]
            current, carried = buffer, grad_buffer
    return dk, dv


# --- autograd ------------------------------------------------------------------------------------


class _ContextParallel(torch.autograd.Function):
    """Forward: the method's communication and block calls, keeping only ``q``, the local K/V,
    the merged output and log-sum-exp. Backward: the blocks again (recomputed, as
    FlashAttention recomputes its tiles), their gradients sent to the ranks that own the K/V."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        plan: _Plan,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor | None,
        *leaves: Tensor,
    ) -> tuple[Tensor, Tensor]:
        run = _forward_ring if plan.method == "ring" else _forward_all_gather
        local = plan if bias is None else _with_bias(plan, bias.detach())
        out, lse = run(local, q.detach(), k.detach(), v.detach())
        ctx.save_for_backward(q, k, v, out, lse)  # k and v are the caller's: no copy kept
        ctx.plan = plan  # type: ignore[attr-defined]
        ctx.bias = bias  # type: ignore[attr-defined]
        ctx.leaves = leaves  # type: ignore[attr-defined]
        return out.to(q.dtype), lse

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor, grad_lse: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        plan: _Plan = ctx.plan  # type: ignore[attr-defined]
        bias: Tensor | None = ctx.bias  # type: ignore[attr-defined]
        leaves: tuple[Tensor, ...] = ctx.leaves  # type: ignore[attr-defined]
        bias_leaf = None
        if bias is not None:
            bias_leaf = bias.detach().requires_grad_(bias.requires_grad)
            plan = _with_bias(plan, bias_leaf)
        learnable = [t for t in (bias_leaf, *leaves) if t is not None and t.requires_grad]
        sd = out.dtype
        state = _Backward(
            plan=plan,
            q=q.detach(),
            out=out,
            lse=lse,
            grad_out=grad_out.to(sd),
            grad_lse=torch.where(torch.isfinite(lse), grad_lse.to(sd), 0.0),
            dq=torch.zeros_like(q, dtype=sd),
            inputs=learnable,
            leaves=[None] * len(learnable),
        )
        back = _backward_ring if plan.method == "ring" else _backward_all_gather
        dk, dv = back(state, k.detach(), v.detach())
        found = dict(zip([id(t) for t in learnable], state.leaves, strict=True))
        bias_grad = None if bias_leaf is None else found.get(id(bias_leaf))
        leaf_grads = [found.get(id(t)) for t in leaves]
        return (
            None,
            state.dq.to(q.dtype),
            dk.to(k.dtype),
            dv.to(v.dtype),
            None if bias_grad is None or bias is None else bias_grad.to(bias.dtype),
            *[
                torch.zeros_like(t) if g is None else g.to(t.dtype)
                for g, t in zip(leaf_grads, leaves, strict=True)
            ],
        )


def _packed(k: Tensor, v: Tensor) -> Tensor:
    """``(B, Hkv, n, D + Dv)``: keys and values as one tensor, one message per block."""
    return torch.cat([k.detach(), v.detach()], dim=-1)


def _with_bias(plan: _Plan, bias: Tensor) -> _Plan:
    return dataclasses.replace(plan, bias=bias)


# --- the public function -------------------------------------------------------------------------


@overload
def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskArg = ...,
    bias: BiasArg = ...,
    causal: CausalArg = ...,
    scale: float | None = ...,
    group: dist.ProcessGroup | None = ...,
    layout: LayoutKind = ...,
    method: Method = ...,
    lengths: tuple[int, int] | None = ...,
    return_lse: Literal[False] = ...,
    backend: str = ...,
    stats: CommStats | None = ...,
    pieces: int | None = ...,
) -> Tensor: ...


@overload
def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskArg = ...,
    bias: BiasArg = ...,
    causal: CausalArg = ...,
    scale: float | None = ...,
    group: dist.ProcessGroup | None = ...,
    layout: LayoutKind = ...,
    method: Method = ...,
    lengths: tuple[int, int] | None = ...,
    return_lse: Literal[True],
    backend: str = ...,
    stats: CommStats | None = ...,
    pieces: int | None = ...,
) -> tuple[Tensor, Tensor]: ...


def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskArg = None,
    bias: BiasArg = None,
    causal: CausalArg = False,
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    layout: LayoutKind = "contiguous",
    method: Method = "ring",
    lengths: tuple[int, int] | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    stats: CommStats | None = None,
    pieces: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Exact attention over a sequence sharded across the ranks of ``group``.

    Every rank calls it with its own shards; the result is this rank's shard of what
    :func:`qkv.attention` gives on the whole sequence (forward and backward). Every rank must
    pass the same mask, bias, causal, layout and method (each rank derives from them, alone,
    which blocks are exchanged), and run backward when the others do.

    Args:
        q: ``(B, Hq, nq, D)`` this rank's queries: its shard (``layout``) of ``Nq`` queries.
        k: ``(B, Hkv, nk, D)`` this rank's keys: its shard of ``Nk`` keys, same layout (for
            cross-attention shard the memory like the queries; ``Nk`` may differ from ``Nq``).
        v: ``(B, Hkv, nk, Dv)`` this rank's values.
        mask: the mask for the **whole** sequence in global positions, exactly what
            :func:`qkv.attention` takes (a mask function of :mod:`qkv.masks` or your own, or a
            bool tensor broadcastable to ``(B, Hq, Nq, Nk)``).
        bias: the same for the bias: a score function (ALiBi, softcap, a
            :class:`~qkv.scores.RelativePositionBias`, your own) or a float tensor for the whole
            ``(B, Hq, Nq, Nk)``.
        causal: as in :func:`qkv.attention`, on the global ``(Nq, Nk)``.
        scale: multiplies ``q k^T``; default ``1 / sqrt(D)``.
        group: the process group (default: the world).
        layout: how the sequence is sharded, ``"contiguous"`` or ``"zigzag"``
            (:mod:`qkv.parallel.layout`; :func:`qkv.parallel.shard` makes either).
        method: ``"ring"`` (point-to-point, overlapped, skipping ranks a mask does not need) or
            ``"all_gather"`` (one collective).
        lengths: the global ``(Nq, Nk)``; default: found with one small all-gather of the
            shard lengths (pass them to save it).
        return_lse: also return the shard's log-sum-exp ``(B, Hq, nq)`` (stats dtype).
        backend: the backend every block runs on (one that serves ``return_lse``).
        stats: a :class:`~qkv.parallel.CommStats` to record every message in.
        pieces: into how many pieces each shard is cut (each chunk into ``pieces / 2`` for
            zigzag), for the block calls and for the ring's messages: a rank holds a few
            pieces of K/V and gradients in flight, not whole shards, and each call's
            temporaries are a piece's, so more pieces cost less memory and more calls and
            messages. Default: 32, fewer where a piece would be shorter than 256 positions;
            never more than the shortest chunk has positions.

    Returns:
        ``out (B, Hq, nq, Dv)`` in the input dtype (and ``lse`` with ``return_lse=True``).

    Raises:
        TypeError, ValueError: naming the argument, as :func:`qkv.attention` does, and when the
            shards do not form the given layout.
    """
    if method not in ("ring", "all_gather"):
        raise ValueError(f"method must be 'ring' or 'all_gather'; got {method!r}")
    if pieces is not None and (
        isinstance(pieces, bool) or not isinstance(pieces, int) or pieces < 1
    ):
        raise ValueError(f"pieces must be a positive int or None; got {pieces!r}")
    _check_local(q, k, v)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if lengths is None:
        lengths = global_lengths(q.shape[2], k.shape[2], group, q.device, stats)
    q_len, kv_len = int(lengths[0]), int(lengths[1])
    q_layout = SequenceLayout(q_len, world, layout)
    kv_layout = SequenceLayout(kv_len, world, layout)
    for name, plan_layout, local in (("q", q_layout, q), ("k", kv_layout, k)):
        if plan_layout.shard_length(rank) != local.shape[2]:
            raise ValueError(
                f"{name} holds {local.shape[2]} positions on rank {rank}, but a {layout} layout "
                f"of {plan_layout.length} positions over {world} ranks gives it "
                f"{plan_layout.shard_length(rank)}"
            )
    batch, heads = q.shape[0], q.shape[1]
    target = (batch, heads, q_len, kv_len)
    whole = _whole_mask(mask, causal, target, q.device)
    bias_tensor, score_mod = _global_bias(bias, target, q.device)
    plan = _Plan(
        rank=rank,
        world=world,
        group=group,
        q_layout=q_layout,
        kv_layout=kv_layout,
        mask=whole,
        score_mod=score_mod,
        bias=None,
        scale=scale,
        backend=backend,
        method=method,
        stats=stats,
        cuts=_cuts(q_layout, kv_layout, pieces or DEFAULT_PIECES, 1 if pieces else MIN_PIECE),
    )
    plan = dataclasses.replace(plan, need=_needs(plan))
    leaves = _score_leaves(score_mod, q.device)
    differentiable = (q, k, v, bias_tensor, *leaves)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable):
        out, lse = _ContextParallel.apply(plan, q, k, v, bias_tensor, *leaves)
    else:  # inference: nothing to keep
        run = _forward_ring if method == "ring" else _forward_all_gather
        with_bias = plan if bias_tensor is None else _with_bias(plan, bias_tensor)
        out_sd, lse = run(with_bias, q, k, v)
        out = out_sd.to(q.dtype)
    return (out, lse) if return_lse else out


def _check_local(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.ndim != 4:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-d tensor (B, H, n, D); got {shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not fit "
            "(B, Hq, nq, D), (B, Hkv, nk, D), (B, Hkv, nk, Dv)"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"query heads Hq ({q.shape[1]}) must be a multiple of key/value heads Hkv ({k.shape[1]})"
        )


def global_lengths(
    q_len: int,
    kv_len: int,
    group: dist.ProcessGroup | None,
    device: torch.device | str | None = None,
    stats: CommStats | None = None,
) -> tuple[int, int]:
    """The whole sequence's ``(Nq, Nk)`` from every rank's shard lengths (one small
    all-gather; ``device`` must be one the group's backend communicates on)."""
    world = dist.get_world_size(group)
    mine = torch.tensor([q_len, kv_len], dtype=torch.long, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    if stats is not None:
        stats.record("all_gather", -1, 16 * (world - 1), "lengths")
    total = torch.stack(every).sum(0).tolist()
    return int(total[0]), int(total[1])


def _whole_mask(
    mask: MaskArg, causal: CausalArg, target: tuple[int, int, int, int], device: torch.device
) -> MaskFn | None:
    """The causal flag and the mask as one mask for the whole call (as
    ``AttentionRequest.whole_mask``), checked against the global sizes."""
    batch, heads, q_len, kv_len = target
    parts: list[MaskFn] = []
    if causal is True or causal == "top_left":
        parts.append(M.causal(0))
    elif causal == "bottom_right":
        parts.append(M.causal(kv_len - q_len))
    elif causal not in (False, None):
        raise ValueError(
            f'causal must be False, True, "top_left" or "bottom_right"; got {causal!r}'
        )
    if isinstance(mask, Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = attend); got dtype {mask.dtype}")
        if not broadcasts_to(tuple(mask.shape), target):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to the whole sequence's "
                f"(B, Hq, Nq, Nk) = {target}"
            )
        parts.append(M.Dense(as_4d(mask), "mask"))
    elif mask is not None:
        if not callable(mask):
            raise TypeError(f"mask must be a bool tensor, a mask function or None; got {mask!r}")
        fn = M.mask_function(mask)
        if isinstance(fn, BlockMask):
            raise TypeError(
                "mask: a BlockMask is built for one call's tiles; pass the mask it summarises"
            )
        fn.check_call(batch, heads, q_len, kv_len, device)
        parts.append(fn)
    return M.and_masks(*parts) if parts else None


def _global_bias(
    bias: BiasArg, target: tuple[int, int, int, int], device: torch.device
) -> tuple[Tensor | None, Callable[..., Tensor] | None]:
    if bias is None:
        return None, None
    if isinstance(bias, Tensor):
        if not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be a floating-point tensor; got dtype {bias.dtype}")
        if not broadcasts_to(tuple(bias.shape), target):
            raise ValueError(
                f"bias of shape {tuple(bias.shape)} does not broadcast to the whole sequence's "
                f"(B, Hq, Nq, Nk) = {target}"
            )
        return as_4d(bias), None
    if callable(bias):
        check_score_call(bias, *target)
        # Brought to the whole call's scale once, as qkv.attention would on one process.
        return None, bias.for_call(*target) if isinstance(bias, ScoreMod) else bias
    raise TypeError(f"bias must be a float tensor, a score function or None; got {bias!r}")


def _score_leaves(
    score_mod: Callable[..., Tensor] | None, device: torch.device
) -> tuple[Tensor, ...]:
    """Tensors requiring grad that the score function reads (a table's parameter, a tensor it
    closes over): found by running it on one score and walking the graph to its leaves."""
    if score_mod is None or not torch.is_grad_enabled():
        return ()
    found: dict[int, Tensor] = {}
    if isinstance(score_mod, nn.Module):
        found.update((id(p), p) for p in score_mod.parameters() if p.requires_grad)
    index = (torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device),) * 4
    probe = score_mod(torch.zeros(1, 1, 1, 1, device=device), *index)
    stack = [probe.grad_fn] if isinstance(probe, Tensor) and probe.requires_grad else []
    while stack:
        node = stack.pop()
        if node is None:
            continue
        leaf = getattr(node, "variable", None)
        if isinstance(leaf, Tensor):
            found.setdefault(id(leaf), leaf)
        stack.extend(child for child, _ in node.next_functions)
    return tuple(found.values())
