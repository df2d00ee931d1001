"""PyTorch's fused ``scaled_dot_product_attention``, used only where it computes our function.

Masks become SDPA's boolean ``attn_mask``; additive biases become its float ``attn_mask``; a
plain causal request becomes ``is_causal``. Grouped heads use ``enable_gqa``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qkv.request import AttentionRequest
from qkv.scores import is_additive

__all__ = ["SdpaBackend"]


class SdpaBackend:
    name = "sdpa"

    def supports(self, request: AttentionRequest) -> str | None:
        if request.return_weights:
            return "SDPA does not return the attention probabilities (return_weights=True)"
        if request.score_mod is not None and not is_additive(request.score_mod):
            return f"score function {request.score_mod!r} is not an additive bias, and SDPA can only add one"
        return None

    def forward(self, request: AttentionRequest) -> tuple[Tensor, Tensor | None]:
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


def _sdpa_mask(request: AttentionRequest) -> tuple[Tensor | None, bool]:
    """SDPA's ``(attn_mask, is_causal)`` for the request's mask, causal flag and bias."""
    plain_causal = request.causal == "top_left" or (
        request.causal == "bottom_right" and request.q_len == request.kv_len
    )
    bias = request.dense_bias()
    if request.mask is None and bias is None and (request.causal is None or plain_causal):
        return None, request.causal is not None
    mask = request.mask_tile(request.full_q, request.full_kv)
    if bias is None:
        return mask, False
    bias = bias.to(request.dtype)
    if mask is None:
        return bias, False
    return torch.where(mask, bias, float("-inf")), False
