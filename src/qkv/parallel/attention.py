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
- ``"ring"``: K/V blocks travel around the ring of ranks (rank ``r`` sends to ``r + 1``), one
  hop per step, the transfer of the next block overlapped with the computation of the current
  one. A block travels only as far as the farthest rank that needs it, so a sliding window
  that reaches one neighbour exchanges with that neighbour only. Backward sends each block's
  K/V gradient back along the same hops, accumulating on the way.

Backward: each rank differentiates its own block calls and the merge with autograd (every
backend that serves ``return_lse`` also differentiates it), then one communication phase
returns the K/V gradients to their owners. Tensors every rank holds (a bias tensor for the
whole sequence, a relative-position table) receive this rank's part of their gradient; sum it
over the ranks as for any replicated parameter (DDP's all-reduce does).
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


@dataclass(frozen=True, eq=False)
class _Plan:
    """Everything every rank knows alike: layouts, the mask, which blocks are needed."""

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
    need: tuple[tuple[bool, ...], ...] = ()  # need[r][o]: rank r reads the K/V of rank o

    def q_ranges(self, rank: int) -> list[Range]:
        return self.q_layout.ranges(rank)

    def kv_ranges(self, rank: int) -> list[Range]:
        return self.kv_layout.ranges(rank)

    def state(self, q_range: Range, kv_range: Range) -> int:
        """EMPTY, FULL, PARTIAL or UNKNOWN for queries ``q_range`` x keys ``kv_range``."""
        if self.mask is None:
            return FULL
        bounds = (torch.tensor(q_range), torch.tensor(kv_range))
        return int(classify_tiles(self.mask, *bounds)[0, 0])


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


class _Partial:
    """The running merge of block results for one query range (stats dtype)."""

    def __init__(self) -> None:
        self.out: Tensor | None = None
        self.lse: Tensor | None = None

    def add(self, result: tuple[Tensor, Tensor] | None) -> None:
        if result is None:
            return
        out, lse = result[0].to(result[1].dtype), result[1]
        if self.out is None or self.lse is None:
            self.out, self.lse = out, lse
            return
        self.out, self.lse = merge(self.out, self.lse, out, lse)


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
    top = torch.maximum(lse_a, lse_b).detach()  # the merge does not depend on it
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w_a, w_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = w_a + w_b
    attended = total > 0
    safe = torch.where(attended, total, torch.ones_like(total))
    out = (w_a / safe)[..., None] * out_a + (w_b / safe)[..., None] * out_b
    lse = torch.where(attended, top + torch.log(safe), float("-inf"))
    return out, lse


def _finish(
    plan: _Plan, partials: list[_Partial], q: Tensor, value_dim: int
) -> tuple[Tensor, Tensor]:
    """The shard's ``(out, lse)`` from its query ranges' merges, in shard order."""
    sd = stats_dtype(q.dtype)
    outs, lses = [], []
    for partial, (a, b) in zip(partials, plan.q_ranges(plan.rank), strict=True):
        if partial.out is None or partial.lse is None:  # nothing attended by any row
            outs.append(q.new_zeros(*q.shape[:2], b - a, value_dim, dtype=sd))
            lses.append(q.new_full((*q.shape[:2], b - a), float("-inf"), dtype=sd))
        else:
            outs.append(partial.out)
            lses.append(partial.lse)
    if not outs:
        return q.new_zeros(*q.shape[:3], value_dim, dtype=sd), q.new_zeros(q.shape[:3], dtype=sd)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _query_pieces(plan: _Plan, q: Tensor) -> list[tuple[Range, Tensor]]:
    """This rank's query ranges with their slices of the local ``q``."""
    pieces, offset = [], 0
    for a, b in plan.q_ranges(plan.rank):
        pieces.append(((a, b), q[:, :, offset : offset + b - a]))
        offset += b - a
    return pieces


def _absorb(
    plan: _Plan, partials: list[_Partial], q: Tensor, kv: Tensor, head_dim: int, origin: int
) -> None:
    """Compute every non-empty block of queries x the K/V of ``origin``."""
    for partial, (q_range, q_piece) in zip(partials, _query_pieces(plan, q), strict=True):
        offset = 0
        for kv_range in plan.kv_ranges(origin):
            n = kv_range[1] - kv_range[0]
            piece = kv[:, :, offset : offset + n]
            k, v = piece[..., :head_dim], piece[..., head_dim:]
            partial.add(_block(plan, q_piece, k, v, q_range, kv_range))
            offset += n


# --- forward: the two methods --------------------------------------------------------------------


def _forward_all_gather(plan: _Plan, q: Tensor, kv: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """Every rank's K/V gathered (one collective), then this rank's non-empty blocks."""
    lengths = [plan.kv_layout.shard_length(r) for r in range(plan.world)]
    gathered = all_gather_padded(kv, lengths, plan.group, plan.stats, "forward")
    partials = [_Partial() for _ in plan.q_ranges(plan.rank)]
    for o in range(plan.world):
        if plan.need[plan.rank][o]:
            _absorb(plan, partials, q, kv if o == plan.rank else gathered[o], head_dim, o)
    return _finish(plan, partials, q, kv.shape[-1] - head_dim)


def _forward_ring(plan: _Plan, q: Tensor, kv: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """Step ``s`` moves the K/V of origin ``r - s + 1`` from rank ``r`` to ``r + 1`` where that
    origin's reach allows, while the block held since step ``s - 1`` is computed."""
    P, r = plan.world, plan.rank
    reach = _ring_reach(plan)
    steps = max(reach, default=0)
    partials = [_Partial() for _ in plan.q_ranges(r)]
    current: Tensor | None = kv
    for s in range(1, steps + 1):
        held, coming = (r - s + 1) % P, (r - s) % P
        sends = [((r + 1) % P, current)] if current is not None and reach[held] >= s else []
        buffer = _kv_buffer(plan, kv, coming) if reach[coming] >= s else None
        recvs = [] if buffer is None else [((r - 1) % P, buffer)]
        works = exchange(sends, recvs, plan.group, plan.stats, "forward")
        if current is not None and plan.need[r][held]:
            _absorb(plan, partials, q, current, head_dim, held)  # overlaps the transfer
        for work in works:
            work.wait()
        current = buffer
    last = (r - steps) % P
    if current is not None and plan.need[r][last]:
        _absorb(plan, partials, q, current, head_dim, last)
    return _finish(plan, partials, q, kv.shape[-1] - head_dim)


def _kv_buffer(plan: _Plan, kv: Tensor, origin: int, dtype: torch.dtype | None = None) -> Tensor:
    """An empty ``(B, Hkv, n_origin, D + Dv)`` buffer for the K/V (or gradient) of ``origin``."""
    shape = (*kv.shape[:2], plan.kv_layout.shard_length(origin), kv.shape[3])
    return kv.new_empty(shape, dtype=dtype)


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
    head_dim: int
    out: Tensor  # (B, Hq, nq, Dv)
    lse: Tensor  # (B, Hq, nq)
    grad_out: Tensor
    grad_lse: Tensor
    dq: Tensor
    inputs: list[Tensor]  # bias leaf (if it needs grad) and the score function's leaves
    leaves: list[Tensor | None]

    def block_grads(self, kv: Tensor, origin: int, into: Tensor) -> None:
        """Add the gradient of the K/V block of ``origin`` (``kv``) from this rank's queries
        to ``into`` (nothing when no block of it is needed); ``dq`` and the leaves' gradients
        accumulate too.

        With ``w_i = exp(lse_i - lse)`` the merge gives ``dO_i = w_i dO`` and
        ``dlse_i = w_i (rowsum(dO * (o_i - out)) + dlse)``: each block's call is rerun and
        differentiated with those (so nothing but ``q, k, v, out, lse`` is kept from forward).
        """
        plan, sd = self.plan, self.out.dtype
        if not plan.need[plan.rank][origin]:
            return
        q_offset = 0
        for q_range in plan.q_ranges(plan.rank):
            rows = slice(q_offset, q_offset + q_range[1] - q_range[0])
            q_offset = rows.stop
            kv_offset = 0
            for kv_range in plan.kv_ranges(origin):
                cols = slice(kv_offset, kv_offset + kv_range[1] - kv_range[0])
                kv_offset = cols.stop
                if plan.state(q_range, kv_range) == EMPTY:
                    continue
                d = self.head_dim
                with torch.enable_grad():  # separate leaves: no (n, D + Dv) zeros per slice
                    q_leaf = self.q[:, :, rows].detach().requires_grad_()
                    k_leaf = kv[:, :, cols, :d].detach().requires_grad_()
                    v_leaf = kv[:, :, cols, d:].detach().requires_grad_()
                    result = _block(plan, q_leaf, k_leaf, v_leaf, q_range, kv_range)
                assert result is not None
                grads = self._through(result, rows, [q_leaf, k_leaf, v_leaf, *self.inputs])
                self.dq[:, :, rows] += grads[0].to(sd)
                into[:, :, cols, :d] += grads[1].to(sd)
                into[:, :, cols, d:] += grads[2].to(sd)
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


def _backward_all_gather(state: _Backward, kv: Tensor) -> Tensor:
    """Gather the K/V again, differentiate every needed block, sum each rank's K/V gradient
    over the ranks (one all-reduce) and keep this rank's."""
    plan = state.plan
    lengths = [plan.kv_layout.shard_length(r) for r in range(plan.world)]
    gathered = all_gather_padded(kv, lengths, plan.group, plan.stats, "backward")
    total = kv.new_zeros(
        plan.world, *kv.shape[:2], max(lengths), kv.shape[3], dtype=state.out.dtype
    )
    for o in range(plan.world):
        state.block_grads(kv if o == plan.rank else gathered[o], o, total[o, :, :, : lengths[o]])
    all_reduce_sum(total, plan.group, plan.stats, "backward")
    return total[plan.rank, :, :, : lengths[plan.rank]]


def _backward_ring(state: _Backward, kv: Tensor) -> Tensor:
    """The forward's hops again, each block travelling with the gradient accumulated for it so
    far; where a block's travel ends, its gradient goes home in one message. At step ``s``
    rank ``r`` holds the block of origin ``r - s + 1``: it adds its own part, then passes block
    and gradient on to ``r + 1`` (or the gradient home when the block goes no further)."""
    plan = state.plan
    P, r = plan.world, plan.rank
    reach = _ring_reach(plan)
    steps = max(reach, default=0)
    sd = state.out.dtype
    current: Tensor | None = kv
    carried: Tensor | None = None  # the gradient travelling with the current block
    own: Tensor | None = None  # this rank's K/V gradient, once it is home
    for s in range(1, steps + 2):
        held = (r - s + 1) % P
        if current is not None:
            if carried is None:
                carried = torch.zeros_like(current, dtype=sd)
            state.block_grads(current, held, carried)  # accumulates in place
        sends: list[tuple[int, Tensor]] = []
        if current is not None and carried is not None:
            if reach[held] >= s:
                sends = [((r + 1) % P, current), ((r + 1) % P, carried)]
            elif held != r:  # the block's travel ends here: its gradient goes home
                sends = [(held, carried)]
            else:  # this rank's own block, which never left
                own = carried
        recvs: list[tuple[int, Tensor]] = []
        coming = (r - s) % P
        buffer = grad_buffer = home = None
        if s <= steps and reach[coming] >= s:
            buffer = _kv_buffer(plan, kv, coming)
            grad_buffer = _kv_buffer(plan, kv, coming, sd)
            recvs += [((r - 1) % P, buffer), ((r - 1) % P, grad_buffer)]
        if reach[r] > 0 and s == reach[r] + 1:
            home = _kv_buffer(plan, kv, r, sd)
            recvs.append(((r + reach[r]) % P, home))
        for work in exchange(sends, recvs, plan.group, plan.stats, "backward"):
            work.wait()
        if home is not None:
            own = home
        current, carried = buffer, grad_buffer
    return torch.zeros_like(kv, dtype=sd) if own is None else own


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
        out, lse = run(local, q.detach(), _packed(k, v), k.shape[-1])
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
            head_dim=k.shape[-1],
            out=out,
            lse=lse,
            grad_out=grad_out.to(sd),
            grad_lse=torch.where(torch.isfinite(lse), grad_lse.to(sd), 0.0),
            dq=torch.zeros_like(q, dtype=sd),
            inputs=learnable,
            leaves=[None] * len(learnable),
        )
        back = _backward_ring if plan.method == "ring" else _backward_all_gather
        dkv = back(state, _packed(k, v))
        found = dict(zip([id(t) for t in learnable], state.leaves, strict=True))
        bias_grad = None if bias_leaf is None else found.get(id(bias_leaf))
        leaf_grads = [found.get(id(t)) for t in leaves]
        return (
            None,
            state.dq.to(q.dtype),
            dkv[..., : k.shape[-1]].to(k.dtype),
            dkv[..., k.shape[-1] :].to(v.dtype),
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

    Returns:
        ``out (B, Hq, nq, Dv)`` in the input dtype (and ``lse`` with ``return_lse=True``).

    Raises:
        TypeError, ValueError: naming the argument, as :func:`qkv.attention` does, and when the
            shards do not form the given layout.
    """
    if method not in ("ring", "all_gather"):
        raise ValueError(f"method must be 'ring' or 'all_gather'; got {method!r}")
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
    )
    plan = dataclasses.replace(plan, need=_needs(plan))
    leaves = _score_leaves(score_mod, q.device)
    differentiable = (q, k, v, bias_tensor, *leaves)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable):
        out, lse = _ContextParallel.apply(plan, q, k, v, bias_tensor, *leaves)
    else:  # inference: nothing to keep
        run = _forward_ring if method == "ring" else _forward_all_gather
        with_bias = plan if bias_tensor is None else _with_bias(plan, bias_tensor)
        out_sd, lse = run(with_bias, q, _packed(k, v), k.shape[-1])
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
