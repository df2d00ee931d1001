r"""Linear attention with the ``elu + 1`` feature map (NOT exact).

Katharopoulos, Vyas, Pappas, Fleuret, "Transformers are RNNs: Fast Autoregressive Transformers
with Linear Attention" (ICML 2020). The softmax kernel ``exp(q . k)`` is replaced by
``phi(q) . phi(k)`` with ``phi(x) = elu(x) + 1 > 0``, so that

    out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / phi(q_i)^T (sum_j phi(k_j))

costs ``O(N D Dv)`` instead of ``O(N^2 D)``. This is a different model, not an estimate of
softmax attention: its outputs differ from :func:`qkv.attention` and do not converge to them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from qkv.approx._common import (
    causal_offset,
    check_positive,
    check_qkv,
    group_queries,
    key_padding,
    ungroup,
)
from qkv.approx.kernelized import kernel_attention, kernel_rows
from qkv.request import CausalArg

__all__ = [
    "elu_feature_map",
    "linear_attention",
    "linear_rows",
]


def elu_feature_map(x: Tensor) -> Tensor:
    """``phi(x) = elu(x) + 1``, elementwise, positive."""
    return F.elu(x) + 1.0


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: CausalArg = False,
    chunk_size: int = 128,
) -> Tensor:
    """Linear attention of Katharopoulos et al. (2020), ``phi = elu + 1``.

    Args:
        q: ``(B, Hq, Nq, D)``.
        k: ``(B, Hkv, Nk, D)``; ``Hq`` a multiple of ``Hkv`` (grouped-query attention).
        v: ``(B, Hkv, Nk, Dv)``.
        mask: key padding, bool ``(B, Nk)`` or ``(B, 1, 1, Nk)``, True = real key.
        causal: False, True/``"top_left"`` or ``"bottom_right"`` (as :func:`qkv.attention`);
            the causal form is the paper's recurrent one, summed ``chunk_size`` queries at a time.
        chunk_size: ``C``, queries per step of the causal sum (memory ``O(C^2)`` per head).

    Returns:
        ``(B, Hq, Nq, Dv)``; a query that sees no key gets zeros. No scale is applied: the
        feature map replaces ``exp(q . k / sqrt(D))``.
    """
    name = "linear_attention"
    q, k, v = check_qkv(name, q, k, v)
    check_positive(name, "chunk_size", chunk_size)
    keep = key_padding(name, mask, q.shape[0], k.shape[2])
    offset = causal_offset(name, causal, q.shape[2], k.shape[2])
    phi_q = elu_feature_map(group_queries(q, k.shape[1]))  # (B, Hkv, G, Nq, D)
    phi_k = elu_feature_map(k).unsqueeze(2)  # (B, Hkv, 1, Nk, D)
    out = kernel_attention(
        phi_q, phi_k, v.unsqueeze(2), keep=keep, offset=offset, chunk_size=chunk_size
    )
    return ungroup(out)  # (B, Hq, Nq, Dv)


def linear_rows(q: Tensor, k: Tensor, knob: int, keep: Tensor | None) -> Tensor:
    """The rows ``(B, H, Nq, Nk)`` linear attention implies (``knob`` unused: no knob)."""
    return kernel_rows(elu_feature_map(q), elu_feature_map(k), keep)
