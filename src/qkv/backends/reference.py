"""The reference backend: the formula ``softmax(q k^T * scale + bias) v`` written out.

It materializes the ``(B, Hq, Nq, Nk)`` scores, serves every request, and in float64 it is the
gold standard every other backend is tested against. Read it first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from qkv.numerics import grouped_matmul, masked_logsumexp, masked_softmax
from qkv.request import AttentionRequest, stats_dtype

__all__ = [
    "ReferenceBackend",
    "grouped_matmul",
    "masked_logsumexp",
    "masked_softmax",
    "reference_gradients",
]


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
    # Half inputs are multiplied in float32, as fused kernels accumulate and keep their scores:
    # float16 logits past 65,504 stay finite, bfloat16 ones are not rounded to 8 bits, and the
    # answer does not depend on the backend auto picks. Scaled before the matmul, as they do.
    sd = stats_dtype(q.dtype)
    scores = grouped_matmul(q.to(sd) * request.scale, k.to(sd).transpose(-2, -1))  # (B, Hq, Nq, Nk)
    scores = request.modify_scores(scores, request.full_q, request.full_kv)
    mask = request.mask_tile(request.full_q, request.full_kv)
    probs = masked_softmax(scores, mask)
    lse = masked_logsumexp(scores, mask) if with_lse else None
    dropped = F.dropout(probs, request.dropout_p) if request.dropout_p > 0 else probs
    out = grouped_matmul(dropped.to(v.dtype), v)  # (B, Hq, Nq, Dv)
    return out, probs, lse


def reference_gradients(
    request: AttentionRequest,
    inputs: Sequence[Tensor | None],
    grad_out: Tensor,
    backend: str,
) -> list[Tensor | None]:
    """Gradients of the formula's output with respect to ``inputs``, themselves differentiable.

    The tiled backends (chunked, cpu) compute their gradients by hand; when a graph of the
    gradients is asked for (``torch.autograd.grad(..., create_graph=True)``, e.g. a gradient
    penalty) their backward calls this instead: it recomputes the output with the formula from
    the request's own ``q, k, v``, bias and score function (which must be the tensors autograd
    saved, not detached copies) and differentiates it with ``create_graph=True``. That costs the
    reference backend's ``O(Nq * Nk)`` memory, in that case only.

    Args:
        request: the call, holding the tensors the gradients are taken with respect to.
        inputs: the tensors to differentiate by (None, or tensors not requiring grad, get None).
        grad_out: ``(B, Hq, Nq, Dv)``, the gradient of the output.
        backend: the backend's name, for the error message.

    Raises:
        RuntimeError: with dropout, whose masks the formula cannot redraw as the forward did.
    """
    if request.dropout_p > 0:
        raise RuntimeError(
            f"double backward (create_graph=True) with dropout_p={request.dropout_p} is not "
            f"supported by backend {backend!r}; use backend='reference'"
        )
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    with torch.enable_grad():
        out, _ = reference_attention(request)
        found = torch.autograd.grad(out, wanted, grad_out, create_graph=True, allow_unused=True)
    # A tensor passed twice (q is k) gets its whole gradient once: autograd adds the slots up.
    by_id = {id(t): g for t, g in zip(wanted, found, strict=True)}
    return [None if t is None else by_id.pop(id(t), None) for t in inputs]


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
