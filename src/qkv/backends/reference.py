"""The reference backend: the formula ``softmax(q k^T * scale + bias) v`` written out.

It materializes the ``(B, Hq, Nq, Nk)`` scores, serves every request, and in float64 it is the
gold standard every other backend is tested against. Read it first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qkv.request import AttentionRequest, stats_dtype

__all__ = ["ReferenceBackend", "grouped_matmul", "masked_logsumexp", "masked_softmax"]


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
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp = torch.exp(scores - row_max)
    total = exp.sum(dim=-1, keepdim=True)
    return exp / torch.where(total > 0, total, torch.ones_like(total))


def masked_logsumexp(scores: Tensor, mask: Tensor | None) -> Tensor:
    """``log sum exp`` over the last dim where ``mask`` is True: ``(..., N)`` -> ``(...)``;
    ``-inf`` on a row with nothing to attend, with zero (never NaN) gradients there."""
    if scores.shape[-1] == 0:
        return scores.new_full(scores.shape[:-1], float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    total = torch.exp(scores - row_max).sum(dim=-1, keepdim=True)
    attended = total > 0
    lse = row_max + torch.log(torch.where(attended, total, torch.ones_like(total)))
    return torch.where(attended, lse, float("-inf")).squeeze(-1)


def reference_attention(request: AttentionRequest) -> tuple[Tensor, Tensor]:
    """Returns ``out (B, Hq, Nq, Dv)`` and the probabilities ``(B, Hq, Nq, Nk)`` before dropout."""
    out, probs, _ = _reference(request, with_lse=False)
    return out, probs


def reference_attention_lse(request: AttentionRequest) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`reference_attention` and each row's log-sum-exp ``(B, Hq, Nq)`` in the stats
    dtype (``-inf`` on rows with nothing to attend), differentiable by autograd."""
    out, probs, lse = _reference(request, with_lse=True)
    assert lse is not None
    return out, probs, lse


def _reference(request: AttentionRequest, with_lse: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    q, k, v = request.q, request.k, request.v
    # Scale before the matmul, as the fused kernels do: float16 q = k = 40 at D = 64 has an
    # unscaled product of 102,400 (past 65,504, inf) but a scaled one of 12,800.
    scores = grouped_matmul(q * request.scale, k.transpose(-2, -1))  # (B, Hq, Nq, Nk)
    scores = scores.to(stats_dtype(q.dtype))
    scores = request.modify_scores(scores, request.full_q, request.full_kv)
    mask = request.mask_tile(request.full_q, request.full_kv)
    probs = masked_softmax(scores, mask)
    lse = masked_logsumexp(scores, mask) if with_lse else None
    dropped = F.dropout(probs, request.dropout_p) if request.dropout_p > 0 else probs
    out = grouped_matmul(dropped.to(v.dtype), v)  # (B, Hq, Nq, Dv)
    return out, probs, lse


class ReferenceBackend:
    """Serves every request; O(Nq * Nk) memory. Last in ``auto``'s order: it wins only where
    its estimate is the lowest of those that can serve, which in practice means small calls that
    SDPA cannot serve (``return_weights=True``, a non-additive score function such as softcap),
    where the chunked backend's per-tile overhead costs more than the whole formula."""

    name = "reference"

    def supports(self, request: AttentionRequest) -> str | None:
        return None

    def forward(self, request: AttentionRequest) -> tuple[Tensor, Tensor | None]:
        out, probs = reference_attention(request)
        return out, (probs.to(request.dtype) if request.return_weights else None)

    def forward_lse(self, request: AttentionRequest) -> tuple[Tensor, Tensor | None, Tensor]:
        out, probs, lse = reference_attention_lse(request)
        return out, (probs.to(request.dtype) if request.return_weights else None), lse
