"""Numerics shared by every floor that computes attention probabilities.

One softmax for the library: :func:`masked_softmax` (used by the reference backend, the seq2seq
score functions and the approximations), and :func:`grouped_matmul` for grouped-query heads.
Nothing here knows about requests, backends or modules; it sits just above :mod:`qkv.request`
(for :func:`~qkv.request.stats_dtype`) so that every higher floor can import it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qkv.request import stats_dtype

__all__ = ["grouped_matmul", "masked_logsumexp", "masked_softmax", "masked_softmax_upcast"]


def grouped_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` where ``a`` has ``G`` times as many heads as ``b`` (grouped-query attention).

    ``a (B, G * Hkv, M, K)`` x ``b (B, Hkv, K, N)`` -> ``(B, G * Hkv, M, N)``. Query head
    ``h`` uses key/value head ``h // G``. The group is folded into the row dimension, so ``b`` is
    broadcast by the matmul and never copied.
    """
    B, Ha, M, K = a.shape
    Hb = b.shape[1]
    G = Ha // Hb
    folded = a.reshape(B, Hb, G * M, K)  # (B, Hkv, G*M, K)
    return (folded @ b).view(B, Ha, M, b.shape[-1])  # (B, Hq, M, N)


def masked_softmax(scores: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax over the last dim where ``mask`` is True; a row with nothing to attend gives zeros.

    Masked entries become ``-inf`` before the max is taken, so they contribute exactly 0. The max is
    detached (softmax does not depend on it) and replaced by 0 in fully masked rows, and the sum by
    1, so those rows give zeros and no NaN reaches the gradients. With no keys at all (``Nk = 0``)
    the empty probabilities are returned as they are, and ``P V`` is then zeros.
    """
    if scores.shape[-1] == 0:  # no keys at all (Nk = 0): every row is empty, as in SDPA
        return scores
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    # An attended NaN or +inf score (row max NaN or +inf) makes the row NaN: NaN at every key
    # whose score is not -inf, 0 at the masked ones (so its gradient reaches only those keys).
    poisoned = row_max.isnan() | (row_max == float("inf"))
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp = torch.exp(scores - row_max)
    total = exp.sum(dim=-1, keepdim=True)
    probs = exp / torch.where((total > 0) & ~poisoned, total, torch.ones_like(total))
    return torch.where(poisoned & (scores != float("-inf")), float("nan"), probs)


def masked_softmax_upcast(scores: Tensor, keep: Tensor | None) -> Tensor:
    """:func:`masked_softmax` computed in :func:`~qkv.request.stats_dtype` (float32 for half
    inputs, the input dtype otherwise) and returned in ``scores``' dtype; ``keep`` (True =
    attend) broadcasts against ``scores``."""
    return masked_softmax(scores.to(stats_dtype(scores.dtype)), keep).to(scores.dtype)


def masked_logsumexp(scores: Tensor, mask: Tensor | None) -> Tensor:
    """``log sum exp`` over the last dim where ``mask`` is True: ``(..., N)`` -> ``(...)``.

    ``-inf`` on a row with nothing to attend (with zero, never NaN, gradients there); NaN on a
    row whose attended scores hold a NaN or ``+inf``, the rule of :func:`masked_softmax`.
    """
    if scores.shape[-1] == 0:
        return scores.new_full(scores.shape[:-1], float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    poisoned = row_max.isnan() | (row_max == float("inf"))
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    total = torch.exp(scores - row_max).sum(dim=-1, keepdim=True)
    attended = (total > 0) & ~poisoned
    lse = row_max + torch.log(torch.where(attended, total, torch.ones_like(total)))
    lse = torch.where(attended, lse, float("-inf"))
    return torch.where(poisoned, float("nan"), lse).squeeze(-1)
