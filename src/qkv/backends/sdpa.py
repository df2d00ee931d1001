"""PyTorch's fused ``scaled_dot_product_attention``, used only where it computes our function.

Masks become SDPA's boolean ``attn_mask``; additive biases become its float ``attn_mask``; a
plain causal request becomes ``is_causal``. Grouped heads use ``enable_gqa``.

Where PyTorch's kernel does not compute qkv's function, this backend does not send it there:

- ``Nk = 0`` (or any empty dim): the formula on empty scores (zeros); the CPU kernel gives NaN
  for float16 queries of magnitude >= 3e4.
- Non-finite values in ``q`` or ``k``: with a mask the kernel adds it as ``-inf``, so a NaN
  score at a masked-out key (or in a fully masked row) poisons the whole row, where qkv's rule
  (see :func:`qkv.attention`) is that masked scores never matter; without one (and with
  ``is_causal``) PyTorch's CPU kernel zero-fills a row whose attended scores are NaN, where the
  rule makes it NaN. Such calls run on the chunked backend. Finding them costs one reduction
  over ``q`` and one over ``k`` (a sum, which is finite exactly when every term is, barring a
  float32 overflow that only sends a call to chunked needlessly).
- Training on the CPU under ``torch.use_deterministic_algorithms(True)``: PyTorch's CPU
  backward gives different bits on 1 and 2 threads (PyTorch does not flag it), so
  :meth:`supports` declines and ``auto`` picks a backend that does not (reference, chunked and
  cpu give the same bits on any thread count there).
- ``is_causal`` with ``scale <= 0``: PyTorch's CPU kernel scales after masking, so the masked
  ``-inf`` scores become NaN (``scale = 0``) or ``+inf``; such a call gets an explicit causal
  mask instead.
- Training on the CPU with logits that may exceed ``2**24`` in magnitude (bounded by
  ``scale * max |q_i| * max |k_j|``): the CPU flash backward gives NaN gradients from about
  ``7e8`` on (float32 rounding of ``s - lse`` overflows ``exp``), so :meth:`supports` declines
  and ``auto`` picks another backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qkv.backends.chunked import chunked_attention
from qkv.backends.reference import reference_attention
from qkv.request import AttentionRequest, stats_dtype
from qkv.scores import is_additive

__all__ = ["LOGIT_LIMIT_FOR_CPU_BACKWARD", "SdpaBackend", "is_plain", "uses_is_causal"]

#: Largest bound on ``|q k^T * scale|`` for which SDPA serves a CPU call that needs gradients
#: (float32 spacing there is 2, far from where ``exp`` of a rounding error overflows).
LOGIT_LIMIT_FOR_CPU_BACKWARD = float(2**24)


class SdpaBackend:
    name = "sdpa"

    def supports(self, request: AttentionRequest) -> str | None:
        if request.return_weights:
            return "SDPA does not return the attention probabilities (return_weights=True)"
        if request.score_mod is not None and not is_additive(request.score_mod):
            return f"score function {request.score_mod!r} is not an additive bias, and SDPA can only add one"
        if (
            request.device.type == "cpu"
            and request.needs_grad
            and torch.are_deterministic_algorithms_enabled()
        ):
            return (
                "torch.use_deterministic_algorithms(True) is on, and PyTorch's CPU SDPA backward "
                "gives different bits on different thread counts"
            )
        if _cpu_backward_may_overflow(request):
            return (
                "logits may exceed 2**24 in magnitude, where PyTorch's CPU SDPA backward gives "
                "NaN gradients"
            )
        return None

    def forward(self, request: AttentionRequest) -> tuple[Tensor, Tensor | None]:
        if request.score_elements == 0:  # nothing to attend: zeros (the kernel may give NaN)
            return reference_attention(request)[0], None
        if not _finite(request.q, request.k):
            # qkv.attention's rule for NaN and inf (masked scores never matter, attended NaN
            # makes the row NaN) is not SDPA's: see the module docstring.
            return chunked_attention(request)[0], None
        attn_mask, is_causal = _sdpa_mask(request)
        out = F.scaled_dot_product_attention(
            request.q,
            request.k,
            request.v,
            attn_mask=attn_mask,
            dropout_p=request.dropout_p,
            is_causal=is_causal,
            scale=request.scale,
            enable_gqa=request.group_size > 1,
        )
        return out, None


def _finite(q: Tensor, k: Tensor) -> bool:
    """Whether every entry of ``q`` and ``k`` is finite: one sum over each, in the statistics
    dtype (inf or NaN anywhere makes it non-finite; no boolean copy is made)."""
    with torch.no_grad():
        sd = stats_dtype(q.dtype)
        total = q.sum(dtype=sd) + k.sum(dtype=sd)
        return bool(torch.isfinite(total))


def _cpu_backward_may_overflow(request: AttentionRequest) -> bool:
    """Whether a CPU call that needs gradients may have logits past
    :data:`LOGIT_LIMIT_FOR_CPU_BACKWARD` (Cauchy-Schwarz bound from the row norms)."""
    if request.device.type != "cpu" or not request.needs_grad or request.dtype == torch.float64:
        return False
    if request.q.numel() == 0 or request.k.numel() == 0:
        return False
    with torch.no_grad():
        q_norm = request.q.detach().float().norm(dim=-1).max()
        k_norm = request.k.detach().float().norm(dim=-1).max()
        bound = float(q_norm * k_norm) * abs(request.scale)
    return not bound <= LOGIT_LIMIT_FOR_CPU_BACKWARD  # NaN/inf inputs count as overflowing


def uses_is_causal(request: AttentionRequest) -> bool:
    """Whether SDPA runs the call with ``is_causal=True`` (skipping the masked half)."""
    return is_plain(request) and request.causal is not None


def is_plain(request: AttentionRequest) -> bool:
    """No mask and no bias beyond what ``is_causal`` expresses (which needs ``scale > 0``; a
    causal flag that hides nothing was dropped when the request was built)."""
    if request.causal is None:
        plain_causal = True
    else:
        aligned = request.causal == "top_left" or request.q_len == request.kv_len
        plain_causal = aligned and request.scale > 0
    return (
        request.mask is None and request.bias is None and request.score_mod is None and plain_causal
    )


def _sdpa_mask(request: AttentionRequest) -> tuple[Tensor | None, bool]:
    """SDPA's ``(attn_mask, is_causal)`` for the request's mask, causal flag and bias."""
    if is_plain(request):
        return None, uses_is_causal(request)
    bias = request.dense_bias()
    mask = request.mask_tile(request.full_q, request.full_kv)
    if bias is None:
        return mask, False
    bias = bias.to(request.dtype)
    if mask is None:
        return bias, False
    return torch.where(mask, bias, float("-inf")), False
