r"""Attention through a feature map: ``out_i = phi(q_i)^T S / phi(q_i)^T z`` with
``S = sum_j phi(k_j) v_j^T`` and ``z = sum_j phi(k_j)``.

Shared by linear attention (``phi = elu + 1``) and Performer (positive random features). The
cost is ``O(N M Dv)`` instead of ``O(N^2 D)`` for ``M`` features. Causal attention sums only
the keys each query may see, chunk by chunk: the keys before a chunk enter through the running
state ``(S, z)``, those inside it through a small masked ``C x C`` product, so memory stays
``O(N M + C^2)`` rather than the ``O(N M Dv)`` of a cumulative sum.
"""

from __future__ import annotations

import torch
from torch import Tensor


def kernel_attention(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    *,
    keep: Tensor | None,
    offset: int | None,
    chunk_size: int,
) -> Tensor:
    """Normalised kernel attention on grouped tensors.

    Args:
        phi_q: ``(B, Hkv, G, Nq, M)`` non-negative query features.
        phi_k: ``(B, Hkv, 1, Nk, M)`` non-negative key features.
        v: ``(B, Hkv, 1, Nk, Dv)``.
        keep: bool ``(B, Nk)``, True at real keys, or None.
        offset: None for non-causal; else query ``i`` sees keys ``j <= i + offset``.
        chunk_size: ``C``, queries per step of the causal sum.

    Returns:
        ``(B, Hkv, G, Nq, Dv)``; a query that sees no key gets zeros.
    """
    if keep is not None:
        phi_k = phi_k * keep[:, None, None, :, None].to(phi_k.dtype)  # padded keys drop out
    if offset is None:
        state = phi_k.transpose(-1, -2) @ v  # (B, Hkv, 1, M, Dv)
        norm = phi_k.sum(dim=-2).unsqueeze(-1)  # (B, Hkv, 1, M, 1)
        return _normalise(phi_q @ state, phi_q @ norm)
    return _causal(phi_q, phi_k, v, offset, chunk_size)


def _normalise(numerator: Tensor, denominator: Tensor) -> Tensor:
    # Positive features give a positive denominator whenever a key is visible; a row that
    # sees none has numerator 0 and must stay 0, not 0 / 0.
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return numerator / safe


def _causal(phi_q: Tensor, phi_k: Tensor, v: Tensor, offset: int, chunk_size: int) -> Tensor:
    Nq, Nk = phi_q.shape[-2], phi_k.shape[-2]
    M, Dv = phi_k.shape[-1], v.shape[-1]
    state = phi_k.new_zeros(*phi_k.shape[:3], M, Dv)  # (B, Hkv, 1, M, Dv)
    norm = phi_k.new_zeros(*phi_k.shape[:3], M, 1)  # (B, Hkv, 1, M, 1)
    done = 0  # keys [0, done) are in (state, norm)
    outs = []
    for a in range(0, Nq, chunk_size):
        b = min(a + chunk_size, Nq)
        # Keys every query of the chunk sees: j <= a + offset.
        full_end = min(max(a + offset + 1, 0), Nk)
        if full_end > done:
            state = (
                state + phi_k[..., done:full_end, :].transpose(-1, -2) @ v[..., done:full_end, :]
            )
            norm = norm + phi_k[..., done:full_end, :].sum(dim=-2).unsqueeze(-1)
            done = full_end
        fq = phi_q[..., a:b, :]  # (B, Hkv, G, C, M)
        numerator = fq @ state  # (B, Hkv, G, C, Dv)
        denominator = fq @ norm  # (B, Hkv, G, C, 1)
        # Keys some but not all queries of the chunk see: done <= j <= b - 1 + offset.
        part_end = min(max(b + offset, 0), Nk)
        if part_end > done:
            local = fq @ phi_k[..., done:part_end, :].transpose(-1, -2)  # (B, Hkv, G, C, P)
            q_pos = torch.arange(a, b, device=fq.device)[:, None]
            k_pos = torch.arange(done, part_end, device=fq.device)[None, :]
            local = local * (k_pos <= q_pos + offset).to(local.dtype)
            numerator = numerator + local @ v[..., done:part_end, :]
            denominator = denominator + local.sum(dim=-1, keepdim=True)
        outs.append(_normalise(numerator, denominator))
    return torch.cat(outs, dim=-2)  # (B, Hkv, G, Nq, Dv)


def kernel_rows(fq: Tensor, fk: Tensor, keep: Tensor | None) -> Tensor:
    """The attention rows ``(B, H, Nq, Nk)`` a feature-map method implies: ``phi(q_i) .
    phi(k_j)`` normalised over ``j``, with ``keep (B, Nk)`` (True = real key) applied."""
    if keep is not None:
        fk = fk * keep[:, None, :, None]
    w_ij = fq @ fk.transpose(-1, -2)
    return w_ij / w_ij.sum(-1, keepdim=True)
