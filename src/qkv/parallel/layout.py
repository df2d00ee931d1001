"""Which positions of a sequence each process holds: contiguous and zigzag layouts.

Notation: ``N`` the sequence length, ``P`` the number of processes (ranks), ``r`` a rank.

- **contiguous**: the sequence cut into ``P`` consecutive chunks; rank ``r`` holds chunk ``r``.
- **zigzag** (head-tail load balancing): the sequence cut into ``2P`` chunks; rank ``r`` holds
  chunks ``r`` and ``2P - 1 - r``, one from each end. Under a causal mask the early chunks see
  few keys and the late ones many, so every rank gets the same amount of work::

      N = 16, P = 2:   chunk   0     1     2     3
                       rank    0     1     1     0        rank 0 holds 0-3 and 12-15

Chunks differ by at most one position (the first ``N mod chunks`` are one longer), so ``N``
need not be divisible by ``P``; a chunk may be empty when ``N`` is smaller than the number of
chunks. A rank's shard is its chunks concatenated in order: positions are contiguous within
each chunk, not across them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch
from torch import Tensor

__all__ = ["LayoutKind", "SequenceLayout", "shard", "unshard"]

LayoutKind: TypeAlias = Literal["contiguous", "zigzag"]
LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class SequenceLayout:
    """Where every position of a sequence of ``length`` lives over ``world_size`` ranks.

    Attributes:
        length: ``N``, positions in the whole sequence.
        world_size: ``P``, the number of ranks.
        kind: ``"contiguous"`` or ``"zigzag"`` (see the module docstring).
    """

    length: int
    world_size: int
    kind: LayoutKind = "contiguous"

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise ValueError(f"layout must be 'contiguous' or 'zigzag'; got {self.kind!r}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1; got {self.world_size}")
        if self.length < 0:
            raise ValueError(f"sequence length must be >= 0; got {self.length}")

    def chunks(self) -> list[tuple[int, int]]:
        """The ``P`` (contiguous) or ``2P`` (zigzag) chunks as ``[start, end)`` position ranges."""
        count = self.world_size * (2 if self.kind == "zigzag" else 1)
        base, extra = divmod(self.length, count)
        bounds = [0]
        for c in range(count):
            bounds.append(bounds[-1] + base + (1 if c < extra else 0))
        return [(bounds[c], bounds[c + 1]) for c in range(count)]

    def ranges(self, rank: int) -> list[tuple[int, int]]:
        """The position ranges rank ``rank`` holds, in shard order (empty chunks left out)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}); got {rank}")
        chunks = self.chunks()
        held = [chunks[rank]]
        if self.kind == "zigzag":
            held.append(chunks[2 * self.world_size - 1 - rank])
        return [(a, b) for a, b in held if b > a]

    def shard_length(self, rank: int) -> int:
        """Positions rank ``rank`` holds."""
        return sum(b - a for a, b in self.ranges(rank))

    def positions(self, rank: int, device: torch.device | str | None = None) -> Tensor:
        """The global position of every entry of rank ``rank``'s shard, ``(shard_length,)``
        int64 (what RoPE and ALiBi must see)."""
        parts = [torch.arange(a, b, device=device) for a, b in self.ranges(rank)]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=device)


def _layout_for(length: int, world_size: int, layout: LayoutKind) -> SequenceLayout:
    return SequenceLayout(int(length), int(world_size), layout)


def shard(
    x: Tensor, world_size: int, rank: int, *, dim: int = 2, layout: LayoutKind = "contiguous"
) -> Tensor:
    """Rank ``rank``'s shard of ``x`` along the sequence dimension ``dim`` (default 2, the
    ``N`` of ``(B, H, N, D)``): its chunks of :class:`SequenceLayout` concatenated.

    Args:
        x: the whole sequence, e.g. ``(B, H, N, D)``.
        world_size: ``P``.
        rank: which shard.
        dim: the sequence dimension.
        layout: ``"contiguous"`` or ``"zigzag"``.

    Returns:
        ``x`` with ``dim`` of size ``shard_length(rank)`` (a copy for zigzag).
    """
    plan = _layout_for(x.shape[dim], world_size, layout)
    pieces = [x.narrow(dim, a, b - a) for a, b in plan.ranges(rank)]
    if not pieces:
        return x.narrow(dim, 0, 0)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def unshard(shards: Sequence[Tensor], *, dim: int = 2, layout: LayoutKind = "contiguous") -> Tensor:
    """The whole sequence from every rank's shard (``shards[r]`` from rank ``r``), the inverse
    of :func:`shard`.

    Raises:
        ValueError: if the shards' lengths are not the ones ``layout`` gives their total.
    """
    if not shards:
        raise ValueError("unshard needs the shards of every rank; got none")
    lengths = [s.shape[dim] for s in shards]
    plan = _layout_for(sum(lengths), len(shards), layout)
    expected = [plan.shard_length(r) for r in range(len(shards))]
    if lengths != expected:
        raise ValueError(
            f"shards of lengths {lengths} along dim {dim} are not a {layout} layout of "
            f"{sum(lengths)} positions over {len(shards)} ranks (expected {expected})"
        )
    placed: list[tuple[int, Tensor]] = []
    for rank, piece in enumerate(shards):
        offset = 0
        for a, b in plan.ranges(rank):
            placed.append((a, piece.narrow(dim, offset, b - a)))
            offset += b - a
    if not placed:  # an empty sequence
        return shards[0]
    placed.sort(key=lambda item: item[0])
    return torch.cat([t for _, t in placed], dim=dim)
