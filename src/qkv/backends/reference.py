"""The reference backend: the formula ``softmax(q k^T * scale + bias) v`` written out.

It materializes the ``(B, Hq, Nq, Nk)`` scores, serves every request, and in float64 it is the
gold standard every other backend is tested against. Read it first.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from qkv.numerics import grouped_matmul, masked_softmax
from qkv.request import AttentionRequest, stats_dtype

__all__ = ["ReferenceBackend", "grouped_matmul", "masked_softmax"]


def reference_attention(request: AttentionRequest) -> tuple[Tensor, Tensor]:
    """Returns ``out (B, Hq, Nq, Dv)`` and the probabilities ``(B, Hq, Nq, Nk)`` before dropout."""
    q, k, v = request.q, request.k, request.v
    # Scale before the matmul, as the fused kernels do: float16 q = k = 40 at D = 64 has an
    # unscaled product of 102,400 (past 65,504, inf) but a scaled one of 12,800.
    scores = grouped_matmul(q * request.scale, k.transpose(-2, -1))  # (B, Hq, Nq, Nk)
    scores = scores.to(stats_dtype(q.dtype))
    scores = request.modify_scores(scores, request.full_q, request.full_kv)
    probs = masked_softmax(scores, request.mask_tile(request.full_q, request.full_kv))
    dropped = F.dropout(probs, request.dropout_p) if request.dropout_p > 0 else probs
    out = grouped_matmul(dropped.to(v.dtype), v)  # (B, Hq, Nq, Dv)
    return out, probs


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
