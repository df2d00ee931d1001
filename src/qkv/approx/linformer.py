r"""Linformer: attention over learned low-rank projections of the keys and values (NOT exact).

Wang, Li, Khabsa, Fang, Ma, "Linformer: Self-Attention with Linear Complexity" (2020). Learned
``E, F (r, L)`` project the ``Nk <= L`` keys and values along the sequence to ``r`` rows::

    K' = E[:, :Nk] K    (r, D)        V' = F[:, :Nk] V    (r, Dv)
    out = softmax(Q K'^T * s) V'      O(N r D) instead of O(N^2 D)

The projections are parameters, so this is a module (:class:`LinformerAttention`), trained
with the model. Padded keys are zeroed before projecting. With ``r = Nk`` and ``E = F = I``
it is exact attention. There is no causal form (each projected row mixes all positions).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

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

__all__ = ["LinformerAttention", "linformer_attention"]


def linformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_projection: Tensor,
    value_projection: Tensor,
    mask: Tensor | None = None,
    causal: CausalArg = False,
    scale: float | None = None,
) -> Tensor:
    """Linformer attention with given projections.

    Args:
        q: ``(B, Hq, Nq, D)``.
        k: ``(B, Hkv, Nk, D)``; ``Hq`` a multiple of ``Hkv`` (grouped-query attention).
        v: ``(B, Hkv, Nk, Dv)``.
        key_projection: ``E (r, L)`` with ``L >= Nk``; its first ``Nk`` columns are used.
        value_projection: ``F (r, L)``.
        mask: key padding, bool ``(B, Nk)`` or ``(B, 1, 1, Nk)``, True = real key.
        causal: must be False.
        scale: of the scores, default ``D ** -0.5``.

    Returns:
        ``(B, Hq, Nq, Dv)``.
    """
    name = "linformer_attention"
    q, k, v = check_qkv(name, q, k, v)
    if causal not in (False, None):
        raise ValueError(
            f"{name}: causal={causal!r} is not supported: each projected key mixes all "
            f"positions; use linear or performer attention for causal models"
        )
    Nk = k.shape[2]
    for what, p in (("key_projection", key_projection), ("value_projection", value_projection)):
        if not isinstance(p, Tensor) or p.ndim != 2 or p.shape[1] < Nk:
            shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
            raise ValueError(
                f"{name}: {what} must have shape (r, L) with L >= Nk = {Nk}; got {shape}"
            )
    keep = key_padding(name, mask, k.shape[0], Nk)
    if keep is not None:
        k = k * keep[:, None, :, None].to(k.dtype)  # padded keys project to nothing
        v = v * keep[:, None, :, None].to(v.dtype)
    s = resolve_scale(name, scale, q.shape[-1])
    k_low = key_projection[:, :Nk].to(k.dtype) @ k  # (B, Hkv, r, D)
    v_low = value_projection[:, :Nk].to(v.dtype) @ v  # (B, Hkv, r, Dv)
    qg = group_queries(q, k.shape[1])  # (B, Hkv, G, Nq, D)
    scores = qg @ k_low.unsqueeze(2).transpose(-1, -2) * s  # (B, Hkv, G, Nq, r)
    weights = masked_softmax_upcast(scores, None)  # float32 at least, float64 kept
    return ungroup(weights @ v_low.unsqueeze(2))  # (B, Hq, Nq, Dv)


class LinformerAttention(nn.Module):
    """:func:`linformer_attention` with learned projections.

    Args:
        max_len: ``L``, the longest key sequence it can serve.
        rank: ``r``, projected length (the paper uses 128-256 for ``L = 512 .. 4096``).
        share_kv: one projection for keys and values (the paper's "key-value sharing").

    Attributes:
        key_projection: ``E (r, L)``, initialised uniform in ``+-1/sqrt(r)``.
        value_projection: ``F (r, L)`` (the same parameter with ``share_kv``).
    """

    def __init__(self, max_len: int = 512, rank: int = 64, *, share_kv: bool = False) -> None:
        super().__init__()
        self.max_len = check_positive("LinformerAttention", "max_len", max_len)
        self.rank = check_positive("LinformerAttention", "rank", rank)
        bound = rank**-0.5
        self.key_projection = nn.Parameter(torch.empty(rank, max_len).uniform_(-bound, bound))
        self.value_projection = (
            self.key_projection
            if share_kv
            else nn.Parameter(torch.empty(rank, max_len).uniform_(-bound, bound))
        )

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        mask: Tensor | None = None,
        causal: CausalArg = False,
        scale: float | None = None,
    ) -> Tensor:
        """As :func:`linformer_attention` with this module's projections."""
        if isinstance(k, Tensor) and k.ndim == 4 and k.shape[2] > self.max_len:
            raise ValueError(
                f"LinformerAttention: Nk ({k.shape[2]}) exceeds max_len ({self.max_len}); "
                f"build it with a larger max_len"
            )
        return linformer_attention(
            q,
            k,
            v,
            key_projection=self.key_projection,
            value_projection=self.value_projection,
            mask=mask,
            causal=causal,
            scale=scale,
        )

    def extra_repr(self) -> str:
        shared = self.value_projection is self.key_projection
        return f"max_len={self.max_len}, rank={self.rank}" + (", share_kv=True" if shared else "")
