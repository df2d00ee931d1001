"""Per-head statistics of attention weights: what kind of head is this?

Each statistic is a mean over the query rows of one head (rows that attend to nothing, i.e. fully
masked queries whose weights are all zero, are left out of the mean):

- ``entropy``: ``-sum_j p_ij log p_ij`` in nats. 0 = looks at one key; ``log Nk`` = uniform.
- ``max_weight``: ``max_j p_ij``; near 1 for a head that picks one token.
- ``mean_distance``: ``sum_j p_ij |i + offset - j|`` in key positions, the "mean attention
  distance" of local vs global heads. ``offset`` aligns queries to keys bottom-right
  (``Nk - Nq``, 0 for self-attention), as decoding against a KV cache does.
- ``diagonal_distance``: ``sum_j p_ij |j / (Nk - 1) - i / (Nq - 1)|``, the distance from the
  proportional diagonal as a fraction of the source; small for a cross-attention head that
  follows a monotonic alignment between sentences of different lengths.
- ``first_token_weight``: ``p_i0``, the weight on the first key; a large value marks an
  "attention sink" (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks").
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from qkv.viz._checks import as_weights, check_nonnegative

__all__ = ["HeadStats", "head_stats"]


@dataclass(frozen=True)
class HeadStats:
    """Per-head statistics, every field a float32 tensor of shape ``(B, H)`` or ``(H,)``.

    See the module docstring for the definitions.
    """

    entropy: Tensor
    max_weight: Tensor
    mean_distance: Tensor
    diagonal_distance: Tensor
    first_token_weight: Tensor

    def __post_init__(self) -> None:
        shape = self.entropy.shape
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"HeadStats.{field.name} must be a Tensor; got {type(value).__name__}"
                )
            if value.ndim not in (1, 2) or value.shape != shape:
                raise ValueError(
                    f"HeadStats.{field.name} must have the shape of entropy, (B, H) or (H,); "
                    f"got {tuple(value.shape)} and entropy {tuple(shape)}"
                )

    @property
    def num_heads(self) -> int:
        return int(self.entropy.shape[-1])

    def as_dict(self) -> dict[str, Tensor]:
        """The statistics by name, in field order."""
        return {field.name: getattr(self, field.name) for field in fields(self)}

    def batch_mean(self) -> HeadStats:
        """Averaged over the batch: every field ``(H,)`` (a no-op when already ``(H,)``)."""
        if self.entropy.ndim == 1:
            return self
        return HeadStats(**{name: value.mean(dim=0) for name, value in self.as_dict().items()})


def head_stats(weights: Tensor, *, query_offset: int | None = None) -> HeadStats:
    """Statistics of every head from its attention weights.

    Args:
        weights: ``(B, H, Nq, Nk)`` or ``(H, Nq, Nk)`` attention probabilities (rows sum to 1,
            or are all zero for fully masked queries), e.g. from
            ``qkv.attention(..., return_weights=True)``.
        query_offset: position of query ``i`` among the keys is ``i + query_offset`` for
            ``mean_distance``; default ``Nk - Nq`` (bottom-right, 0 for self-attention).

    Returns:
        :class:`HeadStats` with fields shaped ``(B, H)``, or ``(H,)`` for 3-d input.
    """
    if not isinstance(weights, Tensor):
        raise TypeError(
            f"weights must be a torch.Tensor (B, H, Nq, Nk); got {type(weights).__name__}"
        )
    squeeze = weights.ndim == 3
    values = as_weights(
        weights.unsqueeze(0) if squeeze else weights, "weights", 4, "(B, H, Nq, Nk) or (H, Nq, Nk)"
    )
    check_nonnegative(values, "weights")
    nq, nk = values.shape[-2:]
    offset = nk - nq if query_offset is None else int(query_offset)
    q_pos = torch.arange(nq, dtype=values.dtype).view(nq, 1)  # (Nq, 1)
    k_pos = torch.arange(nk, dtype=values.dtype).view(1, nk)  # (1, Nk)
    # A length-1 axis has no extent; put its single position at 0 on the proportional diagonal.
    diagonal = (k_pos / max(nk - 1, 1) - q_pos / max(nq - 1, 1)).abs()  # (Nq, Nk)
    per_row = {
        "entropy": -torch.xlogy(values, values).sum(dim=-1),  # (B, H, Nq)
        "max_weight": values.amax(dim=-1),
        "mean_distance": (values * (q_pos + offset - k_pos).abs()).sum(dim=-1),
        "diagonal_distance": (values * diagonal).sum(dim=-1),
        "first_token_weight": values[..., 0],
    }
    attended = values.sum(dim=-1) > 0  # (B, H, Nq): fully masked rows are left out
    rows = attended.sum(dim=-1).clamp(min=1)  # (B, H)
    stats = {
        name: ((row * attended).sum(dim=-1) / rows).to(torch.float32)  # (B, H)
        for name, row in per_row.items()
    }
    if squeeze:
        stats = {name: value[0] for name, value in stats.items()}  # (H,)
    return HeadStats(**stats)
