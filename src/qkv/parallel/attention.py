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
from dataclasses import dataclass, field
from typing import Literal, TypeAlias, overload

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from qkv import masks as M
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
    need: list[list[bool]] = field(default_factory=list)  # need[r][o]: r reads o's K/V

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


def _needs(plan: _Plan) -> list[list[bool]]:
    return [
        [
            any(plan.state(qr, kr) != EMPTY for qr in plan.q_ranges(r) for kr in plan.kv_ranges(o))
            for o in range(plan.world)
        ]
        for r in range(plan.world)
    ]


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
    plan: _Plan, q: Tensor, kv: Tensor, head_dim: int, q_range: Range, kv_range: Range
) -> tuple[Tensor, Tensor] | None:
    """Attention of local queries ``q`` (global positions ``q_range``) over the packed K/V
    block ``kv`` (global positions ``kv_range``): ``(out, lse)``, or None when the mask hides
    the whole block."""
    state = plan.state(q_range, kv_range)
    if state == EMPTY:
        return None
    k, v = kv[..., :head_dim], kv[..., head_dim:]
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
            partial.add(_block(plan, q_piece, piece, head_dim, q_range, kv_range))
            offset += n


# --- the two methods -----------------------------------------------------------------------------


def _run_all_gather(
    plan: _Plan, q: Tensor, kv: Tensor, head_dim: int, value_dim: int
) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    """Forward of ``"all_gather"``: returns ``(out, lse, blocks)`` where ``blocks[o]`` is the
    K/V of rank ``o`` as used (leaves requiring grad when ``kv`` does)."""
    lengths = [plan.kv_layout.shard_length(r) for r in range(plan.world)]
    with torch.no_grad():
        gathered = all_gather_padded(kv.detach(), lengths, plan.group, plan.stats, "forward")
    partials = [_Partial() for _ in plan.q_ranges(plan.rank)]
    blocks: dict[int, Tensor] = {}
    for o in range(plan.world):
        if not plan.need[plan.rank][o]:
            continue
        block = kv if o == plan.rank else gathered[o].requires_grad_(kv.requires_grad)
        blocks[o] = block
        _absorb(plan, partials, q, block, head_dim, o)
    out, lse = _finish(plan, partials, q, value_dim)
    return out, lse, blocks


def _backward_all_gather(plan: _Plan, kv: Tensor, grads: dict[int, Tensor | None]) -> Tensor:
    """Sum every rank's gradient for every rank's K/V; keep this rank's."""
    lengths = [plan.kv_layout.shard_length(r) for r in range(plan.world)]
    longest = max(lengths)
    total = kv.new_zeros(plan.world, *kv.shape[:2], longest, kv.shape[3])
    for o, g in grads.items():
        if g is not None and o != plan.rank:
            total[o, :, :, : lengths[o]] = g
    all_reduce_sum(total, plan.group, plan.stats, "backward")
    mine = total[plan.rank, :, :, : lengths[plan.rank]]
    own = grads.get(plan.rank)
    return mine if own is None else mine + own


def _run_ring(
    plan: _Plan, q: Tensor, kv: Tensor, head_dim: int, value_dim: int
) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    """Forward of ``"ring"`` (see the module docstring): step ``s`` moves the K/V of origin
    ``r - s + 1`` from rank ``r`` to ``r + 1`` where that origin's reach allows, while the
    block received at step ``s - 1`` is computed."""
    P, r = plan.world, plan.rank
    reach = _ring_reach(plan)
    steps = max(reach, default=0)
    partials = [_Partial() for _ in plan.q_ranges(r)]
    blocks: dict[int, Tensor] = {}
    current: Tensor | None = kv
    for s in range(1, steps + 1):
        sending, coming = (r - s + 1) % P, (r - s) % P
        sends = (
            [((r + 1) % P, current.detach())] if current is not None and reach[sending] >= s else []
        )
        buffer = None
        if reach[coming] >= s:
            shape = (*kv.shape[:2], plan.kv_layout.shard_length(coming), kv.shape[3])
            buffer = kv.new_empty(shape)
        recvs = [((r - 1) % P, buffer)] if buffer is not None else []
        works = exchange(sends, recvs, plan.group, plan.stats, "forward")
        _use(plan, partials, blocks, q, current, head_dim, sending)  # overlaps the transfer
        for work in works:
            work.wait()
        current = None if buffer is None else buffer.requires_grad_(kv.requires_grad)
    _use(plan, partials, blocks, q, current, head_dim, (r - steps) % P)
    out, lse = _finish(plan, partials, q, value_dim)
    return out, lse, blocks


def _use(
    plan: _Plan,
    partials: list[_Partial],
    blocks: dict[int, Tensor],
    q: Tensor,
    block: Tensor | None,
    head_dim: int,
    origin: int,
) -> None:
    if block is None or origin in blocks:
        return
    blocks[origin] = block
    if plan.need[plan.rank][origin]:
        _absorb(plan, partials, q, block, head_dim, origin)


def _backward_ring(plan: _Plan, kv: Tensor, grads: dict[int, Tensor | None]) -> Tensor:
    """The forward hops in reverse: at step ``s`` (last first) rank ``r`` returns the gradient
    accumulated for the block it received (origin ``r - s``) to ``r - 1``, and adds what
    ``r + 1`` returns for the block it sent (origin ``r - s + 1``)."""
    P, r = plan.world, plan.rank
    reach = _ring_reach(plan)
    acc: dict[int, Tensor] = {}
    for o, g in grads.items():
        if g is not None:
            acc[o] = g
    for s in range(max(reach, default=0), 0, -1):
        received, sent = (r - s) % P, (r - s + 1) % P
        sends, recvs = [], []
        if reach[received] >= s:
            shape = (*kv.shape[:2], plan.kv_layout.shard_length(received), kv.shape[3])
            sends.append(((r - 1) % P, acc.get(received, kv.new_zeros(shape))))
        buffer = None
        if reach[sent] >= s:
            shape = (*kv.shape[:2], plan.kv_layout.shard_length(sent), kv.shape[3])
            buffer = kv.new_empty(shape)
            recvs.append(((r + 1) % P, buffer))
        for work in exchange(sends, recvs, plan.group, plan.stats, "backward"):
            work.wait()
        if buffer is not None:
            acc[sent] = buffer if sent not in acc else acc[sent] + buffer
    return acc.get(r, torch.zeros_like(kv))


# --- autograd ------------------------------------------------------------------------------------


class _ContextParallel(torch.autograd.Function):
    """Forward: the method's communication and block calls, with an autograd graph of the
    block calls and the merge kept on the side. Backward: that graph differentiated locally,
    then the K/V gradients returned to their owners (one communication phase)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        plan: _Plan,
        q: Tensor,
        kv: Tensor,
        head_dim: int,
        value_dim: int,
        bias: Tensor | None,
        *leaves: Tensor,
    ) -> tuple[Tensor, Tensor]:
        run = _run_ring if plan.method == "ring" else _run_all_gather
        with torch.enable_grad():
            q_leaf = q.detach().requires_grad_(q.requires_grad)
            kv_leaf = kv.detach().requires_grad_(kv.requires_grad)
            bias_leaf = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)
            local = plan if bias_leaf is None else _with_bias(plan, bias_leaf)
            out, lse, blocks = run(local, q_leaf, kv_leaf, head_dim, value_dim)
        ctx.graph = (out, lse, q_leaf, kv_leaf, bias_leaf, blocks, leaves)  # type: ignore[attr-defined]
        ctx.plan = plan  # type: ignore[attr-defined]
        return out.detach().to(q.dtype), lse.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor, grad_lse: Tensor) -> tuple[Tensor | None, ...]:
        out, lse, q_leaf, kv_leaf, bias_leaf, blocks, leaves = ctx.graph  # type: ignore[attr-defined]
        plan: _Plan = ctx.plan  # type: ignore[attr-defined]
        origins = [o for o, b in blocks.items() if b.requires_grad]
        inputs = [q_leaf, bias_leaf, *leaves, *(blocks[o] for o in origins)]
        wanted = [(n, t) for n, t in enumerate(inputs) if t is not None and t.requires_grad]
        found: list[Tensor | None] = [None] * len(inputs)
        targets = [t for t in (out, lse) if t.requires_grad]
        if wanted and targets:
            grads_out = [grad_out.to(out.dtype), grad_lse][: len(targets)]
            got = torch.autograd.grad(
                targets, [t for _, t in wanted], grads_out, allow_unused=True, retain_graph=True
            )
            for (n, _), g in zip(wanted, got, strict=True):
                found[n] = g
        block_grads = dict(zip(origins, found[2 + len(leaves) :], strict=True))
        dkv = None
        if kv_leaf.requires_grad:
            back = _backward_ring if plan.method == "ring" else _backward_all_gather
            dkv = back(plan, kv_leaf, block_grads)
        leaf_grads = [
            torch.zeros_like(leaf) if g is None else g
            for g, leaf in zip(found[2 : 2 + len(leaves)], leaves, strict=True)
        ]
        ctx.graph = None  # type: ignore[attr-defined]
        dq = found[0]
        if dq is None and q_leaf.requires_grad:  # no row attends anything (or no rows)
            dq = torch.zeros_like(q_leaf)
        return (
            None,
            dq,
            dkv,
            None,
            None,
            found[1],
            *leaf_grads,
        )


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
    :func:`qkv.attention` gives on the whole sequence (forward and backward).

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
    plan.need.extend(_needs(plan))
    kv = torch.cat([k, v], dim=-1)  # (B, Hkv, nk, D + Dv): one message per block
    leaves = _score_leaves(score_mod)
    differentiable = (q, kv, bias_tensor, *leaves)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable):
        out, lse = _ContextParallel.apply(
            plan, q, kv, k.shape[-1], v.shape[-1], bias_tensor, *leaves
        )
    else:  # inference: no graph to keep
        run = _run_ring if method == "ring" else _run_all_gather
        with_bias = plan if bias_tensor is None else _with_bias(plan, bias_tensor)
        out_sd, lse, _ = run(with_bias, q, kv, k.shape[-1], v.shape[-1])
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
        if isinstance(fn, _block_mask_type()):
            raise TypeError(
                "mask: a BlockMask is built for one call's tiles; pass the mask it summarises"
            )
        fn.check_call(batch, heads, q_len, kv_len, device)
        parts.append(fn)
    return M.and_masks(*parts) if parts else None


def _block_mask_type() -> type:
    from qkv.backends.block_mask import BlockMask

    return BlockMask


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


def _score_leaves(score_mod: Callable[..., Tensor] | None) -> tuple[Tensor, ...]:
    """Tensors requiring grad that the score function reads (a table's parameter, a tensor it
    closes over): found by running it on one score and walking the graph to its leaves."""
    if score_mod is None or not torch.is_grad_enabled():
        return ()
    found: dict[int, Tensor] = {}
    if isinstance(score_mod, nn.Module):
        found.update((id(p), p) for p in score_mod.parameters() if p.requires_grad)
    zero = torch.zeros((), dtype=torch.long)
    index = (zero.view(1, 1, 1, 1),) * 4
    probe = score_mod(torch.zeros(1, 1, 1, 1), *index)
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
