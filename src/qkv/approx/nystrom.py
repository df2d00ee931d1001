r"""Nystrom approximation of softmax attention with segment-mean landmarks (NOT exact).

Xiong et al., "Nystromformer: A Nystrom-Based Algorithm for Approximating Self-Attention"
(AAAI 2021). With ``m`` landmark queries ``Q~`` and keys ``K~`` (means of ``m`` contiguous
segments of the queries and of the real keys)::

    F = softmax(Q  K~^T * s)    (Nq, m)
    A = softmax(Q~ K~^T * s)    (m, m)
    C = softmax(Q~ K^T  * s)    (m, Nk)      padded keys masked
    out = F A^+ (C V)                        O(N m D) instead of O(N^2 D)

``A^+`` is the Moore-Penrose pseudo-inverse, by the paper's Newton-Schulz iteration
(``pinv_iterations``, 6 in the paper) or exactly (``pinv_iterations=None``). With as many
landmarks as tokens (``m = Nq = Nk``, one token per segment) ``F = A = C = P`` and
``P P^+ P V = P V``: exact attention, up to the pseudo-inverse's accuracy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qkv.approx._common import (
    check_positive,
    check_qkv,
    group_queries,
    key_padding,
    resolve_scale,
    ungroup,
)
from qkv.numerics import masked_softmax_upcast
from qkv.request import CausalArg

__all__ = ["iterative_pinv", "nystrom_attention", "segment_means"]


def segment_means(x: Tensor, segments: int, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Means of ``segments`` contiguous, near-equal segments of ``x (..., N, D)``.

    Segment ``i`` covers positions ``floor(i N / m) .. floor((i + 1) N / m) - 1``. With ``keep``
    (bool ``(B, N)``, broadcast over the middle dims of ``x``) only kept positions count.

    Returns:
        ``means (..., m, D)`` and ``valid`` bool ``(B | 1, 1, 1, m)``: False for a segment with
        no kept position (its mean is 0).
    """
    N = x.shape[-2]
    edges = torch.arange(segments + 1, device=x.device) * N // segments  # (m + 1,)
    pos = torch.arange(N, device=x.device)
    member = (pos[None, :] >= edges[:-1, None]) & (pos[None, :] < edges[1:, None])  # (m, N)
    weights = member[None].to(x.dtype)  # (1, m, N)
    if keep is not None:
        weights = weights * keep[:, None, :].to(x.dtype)  # (B, m, N)
    count = weights.sum(dim=-1, keepdim=True)  # (B | 1, m, 1)
    weights = weights / torch.where(count > 0, count, torch.ones_like(count))
    means = weights[:, None, None] @ x  # (B, Hkv, G, m, D)
    return means, (count[:, None, None, :, 0] > 0)


def iterative_pinv(a: Tensor, iterations: int) -> Tensor:
    """Newton-Schulz iteration for the pseudo-inverse of ``a (..., m, m)`` as in Xiong et al.:
    ``Z0 = a^T / (max_col_sum(a) * max_row_sum(a))``, then
    ``Z <- Z (13 I - a Z (15 I - a Z (7 I - a Z))) / 4``."""
    absolute = a.abs()
    col = absolute.sum(dim=-2).amax(dim=-1)  # (...)
    row = absolute.sum(dim=-1).amax(dim=-1)
    norm = (col * row)[..., None, None]
    # An all-zero a (a batch row without real keys) has pseudo-inverse 0, not 0 / 0.
    z = a.transpose(-1, -2) / torch.where(norm > 0, norm, torch.ones_like(norm))
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def nystrom_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: CausalArg = False,
    num_landmarks: int = 64,
    pinv_iterations: int | None = 6,
    scale: float | None = None,
) -> Tensor:
    """Nystromformer attention (Xiong et al. 2021), see the module docstring.

    Args:
        q: ``(B, Hq, Nq, D)``.
        k: ``(B, Hkv, Nk, D)``; ``Hq`` a multiple of ``Hkv`` (grouped-query attention).
        v: ``(B, Hkv, Nk, Dv)``.
        mask: key padding, bool ``(B, Nk)`` or ``(B, 1, 1, Nk)``, True = real key; key
            landmarks average real keys only.
        causal: must be False: landmarks mix past and future tokens, so there is no causal form.
        num_landmarks: ``m``; capped at ``min(Nq, Nk)``.
        pinv_iterations: Newton-Schulz steps for ``A^+``; None for ``torch.linalg.pinv``.
        scale: of the scores, default ``D ** -0.5``.

    Returns:
        ``(B, Hq, Nq, Dv)``; zeros for a batch row with no real key.
    """
    name = "nystrom_attention"
    q, k, v = check_qkv(name, q, k, v)
    if causal not in (False, None):
        raise ValueError(
            f"{name}: causal={causal!r} is not supported: landmarks average past and future "
            f"tokens; use linear or performer attention for causal models"
        )
    check_positive(name, "num_landmarks", num_landmarks)
    if pinv_iterations is not None:
        check_positive(name, "pinv_iterations", pinv_iterations)
    B, Hkv, Nk = k.shape[0], k.shape[1], k.shape[2]
    keep = key_padding(name, mask, B, Nk)
    s = resolve_scale(name, scale, q.shape[-1])
    m = min(num_landmarks, q.shape[2], Nk)
    qg = group_queries(q, Hkv)  # (B, Hkv, G, Nq, D)
    kg, vg = k.unsqueeze(2), v.unsqueeze(2)  # (B, Hkv, 1, Nk, D)
    q_land, _ = segment_means(qg, m)  # (B, Hkv, G, m, D)
    k_land, valid = segment_means(kg, m, keep)  # (B, Hkv, 1, m, D), (B | 1, 1, 1, m)
    keep5 = None if keep is None else keep[:, None, None, None, :]  # (B, 1, 1, 1, Nk)
    valid5 = valid[:, :, :, None, :]  # (B | 1, 1, 1, 1, m)
    f = masked_softmax_upcast(qg @ k_land.transpose(-1, -2) * s, valid5)  # (B, Hkv, G, Nq, m)
    a = masked_softmax_upcast(q_land @ k_land.transpose(-1, -2) * s, valid5)  # (B, Hkv, G, m, m)
    c = masked_softmax_upcast(q_land @ kg.transpose(-1, -2) * s, keep5)  # (B, Hkv, G, m, Nk)
    work = a.float() if a.dtype in (torch.float16, torch.bfloat16) else a
    inverse = (
        torch.linalg.pinv(work)
        if pinv_iterations is None
        else iterative_pinv(work, pinv_iterations)
    )
    out = f @ (inverse.to(a.dtype) @ (c @ vg))  # (B, Hkv, G, Nq, Dv)
    return ungroup(out)
