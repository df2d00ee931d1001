"""The messages context parallelism sends, counted.

Keys and values travel packed as one tensor ``(B, Hkv, n, D + Dv)`` (one message per block,
not two), gradients the same way back. Every send, receive and collective is recorded in a
:class:`CommStats` when one is given, so tests and benchmarks can count exchanges and bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from qkv.parallel.layout import LayoutKind, SequenceLayout, shard, unshard

__all__ = [
    "CommEvent",
    "CommStats",
    "all_gather_padded",
    "all_reduce_sum",
    "exchange",
    "gather_sequence",
    "sum_over_ranks",
]


@dataclass(frozen=True)
class CommEvent:
    """One message or collective: ``kind`` (``"send"``, ``"recv"``, ``"all_gather"``,
    ``"all_reduce"``), the peer rank (in the group; -1 for a collective), the bytes this rank
    sent (for a collective: its own contribution) and the pass (``"forward"``/``"backward"``)."""

    kind: str
    peer: int
    nbytes: int
    phase: str


@dataclass
class CommStats:
    """What one rank sent and received. Pass one to :func:`qkv.parallel.attention` (it appends
    to :attr:`events`)."""

    events: list[CommEvent] = field(default_factory=list)

    def record(self, kind: str, peer: int, nbytes: int, phase: str) -> None:
        self.events.append(CommEvent(kind, peer, nbytes, phase))

    def peers(self, kind: str = "send", phase: str | None = None) -> set[int]:
        """Ranks this rank sent to (``kind="send"``) or received from (``"recv"``)."""
        return {e.peer for e in self.events if e.kind == kind and phase in (None, e.phase)}

    def count(self, kind: str, phase: str | None = None) -> int:
        return sum(1 for e in self.events if e.kind == kind and phase in (None, e.phase))

    def bytes_sent(self, phase: str | None = None) -> int:
        """Bytes this rank put on the wire: its point-to-point sends, and for a collective the
        bytes a ring implementation sends per rank (``(P - 1) / P`` of the result for an
        all-gather, twice that for an all-reduce), recorded at the call."""
        return sum(e.nbytes for e in self.events if e.kind != "recv" and phase in (None, e.phase))


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _global(group: dist.ProcessGroup | None, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def exchange(
    sends: list[tuple[int, Tensor]],
    recvs: list[tuple[int, Tensor]],
    group: dist.ProcessGroup | None,
    stats: CommStats | None,
    phase: str,
) -> list[dist.Work]:
    """Post point-to-point sends of ``(peer, tensor)`` and receives into ``(peer, buffer)``
    (peers are group ranks) and return the pending works; ``wait()`` them before reading the
    buffers. Nothing is posted when both lists are empty."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), _global(group, p), group) for p, t in sends]
    ops += [dist.P2POp(dist.irecv, buf, _global(group, p), group) for p, buf in recvs]
    if stats is not None:
        for p, t in sends:
            stats.record("send", p, _nbytes(t), phase)
        for p, buf in recvs:
            stats.record("recv", p, _nbytes(buf), phase)
    return dist.batch_isend_irecv(ops) if ops else []


def all_gather_padded(
    x: Tensor,
    lengths: list[int],
    group: dist.ProcessGroup | None,
    stats: CommStats | None,
    phase: str,
) -> list[Tensor]:
    """Every rank's ``x`` (sequence along dim 2, rank ``r`` holding ``lengths[r]`` positions):
    padded to the longest, gathered, and cut back."""
    longest = max(lengths)
    padded = x.new_zeros(*x.shape[:2], longest, x.shape[3])
    padded[:, :, : x.shape[2]] = x
    gathered = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(gathered, padded.contiguous(), group=group)
    if stats is not None:
        world = len(lengths)
        stats.record("all_gather", -1, _nbytes(padded) * (world - 1), phase)
    return [g[:, :, :n] for g, n in zip(gathered, lengths, strict=True)]


def all_reduce_sum(
    x: Tensor, group: dist.ProcessGroup | None, stats: CommStats | None, phase: str
) -> Tensor:
    """The sum of ``x`` over the ranks (in place)."""
    dist.all_reduce(x, group=group)
    if stats is not None:
        world = dist.get_world_size(group)
        stats.record("all_reduce", -1, 2 * _nbytes(x) * (world - 1) // world, phase)
    return x


# --- collectives autograd can differentiate (for the layers around attention) ------------------


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, dim: int, layout: LayoutKind, group: dist.ProcessGroup | None
    ) -> Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        local = torch.tensor([x.shape[dim]], dtype=torch.long, device=x.device)
        every = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(every, local, group=group)
        lengths = [int(t) for t in every]
        longest = max(lengths)
        padded = x.new_zeros(*x.shape[:dim], longest, *x.shape[dim + 1 :])
        padded.narrow(dim, 0, x.shape[dim]).copy_(x)
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded.contiguous(), group=group)
        shards = [g.narrow(dim, 0, n) for g, n in zip(gathered, lengths, strict=True)]
        ctx.dim, ctx.group, ctx.rank, ctx.world = dim, group, rank, world
        ctx.layout = SequenceLayout(sum(lengths), world, layout)
        return unshard(shards, dim=dim, layout=layout)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)  # every rank's use of this rank's shard
        mine = shard(total, ctx.world, ctx.rank, dim=ctx.dim, layout=ctx.layout.kind)
        return mine, None, None, None


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        total = x.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


def gather_sequence(
    x: Tensor, *, dim: int, layout: LayoutKind, group: dist.ProcessGroup | None = None
) -> Tensor:
    """The whole sequence, in global order, from every rank's shard ``x`` (sharded along
    ``dim`` in ``layout``), on every rank; differentiable: backward sums the gradient every rank
    sends to this rank's positions. For small per-token tensors (pooling scores), not K/V."""
    return _GatherSequence.apply(x, dim, layout, group)


def sum_over_ranks(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """``x`` summed over the ranks of ``group``, on every rank; differentiable (backward sums
    the gradients likewise: every rank holds the same sum, and every rank's loss reads it)."""
    return _SumOverRanks.apply(x, group)
