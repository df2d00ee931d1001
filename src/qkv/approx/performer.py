r"""Performer's FAVOR+: positive orthogonal random features for the softmax kernel (NOT exact).

Choromanski et al., "Rethinking Attention with Performers" (ICLR 2021). With ``M`` random
vectors ``w_1 .. w_M ~ N(0, I_D)`` (drawn in orthogonal blocks), the softmax kernel is estimated
without bias by positive features

    exp(x . y) = E[phi(x) . phi(y)],     phi(x) = exp(W x - |x|^2 / 2) / sqrt(M)      (M,)

applied to ``x = q * scale^(1/2)``, ``y = k * scale^(1/2)``; then attention is kernel attention
(:mod:`qkv.approx.kernelized`), ``O(N M Dv)``. The estimate's error falls like ``1/sqrt(M)``;
redrawing ``W`` during training (:class:`PerformerAttention`) keeps a model from fitting one
draw.

Numerics: ``exp`` is taken after subtracting the largest exponent of each query row and the
largest over all real keys of each head. Both constants cancel between the numerator and the
denominator, so the result is unchanged, but nothing overflows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qkv.approx._common import (
    causal_offset,
    check_positive,
    check_qkv,
    group_queries,
    key_padding,
    resolve_scale,
    ungroup,
)
from qkv.approx.kernelized import kernel_attention, kernel_rows
from qkv.request import CausalArg

__all__ = [
    "PerformerAttention",
    "orthogonal_features",
    "performer_attention",
    "performer_rows",
    "positive_features",
]


def orthogonal_features(
    num_features: int,
    dim: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """``W (M, D)``: rows in blocks of ``D`` mutually orthogonal directions, each row scaled to
    the norm of a ``N(0, I_D)`` vector, so every row is marginally Gaussian (FAVOR+'s ORF).

    Args:
        num_features: ``M``.
        dim: ``D``, the head dim.
        generator: for reproducible draws.
    """
    check_positive("orthogonal_features", "num_features", num_features)
    check_positive("orthogonal_features", "dim", dim)
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        orthonormal, upper = torch.linalg.qr(gaussian)  # columns orthonormal
        # Signs of R's diagonal fixed to +: only then are Q's columns uniformly distributed
        # (LAPACK's signs are not random, and skewed directions bias the kernel estimate).
        orthonormal = orthonormal * torch.sign(torch.diagonal(upper))[None, :]
        blocks.append(orthonormal.T)
    directions = torch.cat(blocks)[:num_features]  # (M, D)
    norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (directions * norms[:, None]).to(dtype=dtype, device=device)


def positive_features(x: Tensor, projection: Tensor, *, over_keys: Tensor | None = None) -> Tensor:
    """``phi(x) = exp(W x - |x|^2 / 2 - c) / sqrt(M)`` for ``x (..., N, D)`` -> ``(..., N, M)``.

    ``c`` is the largest exponent of each row (queries, ``over_keys=None``) or, for keys, the
    largest over all rows where ``over_keys`` (bool ``(..., N)``) is True; a constant that
    cancels in attention (see the module docstring). It is detached: the value does not depend
    on it, so neither does the gradient.
    """
    projected = x @ projection.T.to(x.dtype)  # (..., N, M)
    exponent = projected - (x * x).sum(dim=-1, keepdim=True) / 2
    if over_keys is None:
        top = exponent.amax(dim=-1, keepdim=True)
    else:
        hidden = exponent.masked_fill(~over_keys[..., None], float("-inf"))
        top = hidden.amax(dim=(-1, -2), keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return torch.exp(exponent - top.detach()) / math.sqrt(projection.shape[0])


def performer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    projection: Tensor,
    mask: Tensor | None = None,
    causal: CausalArg = False,
    scale: float | None = None,
    chunk_size: int = 128,
) -> Tensor:
    """Softmax attention estimated with FAVOR+ positive random features.

    Args:
        q: ``(B, Hq, Nq, D)``.
        k: ``(B, Hkv, Nk, D)``; ``Hq`` a multiple of ``Hkv`` (grouped-query attention).
        v: ``(B, Hkv, Nk, Dv)``.
        projection: ``W (M, D)``, e.g. from :func:`orthogonal_features`; shared by all heads.
        mask: key padding, bool ``(B, Nk)`` or ``(B, 1, 1, Nk)``, True = real key.
        causal: False, True/``"top_left"`` or ``"bottom_right"`` (as :func:`qkv.attention`).
        scale: of the scores, default ``D ** -0.5``.
        chunk_size: queries per step of the causal sum.

    Returns:
        ``(B, Hq, Nq, Dv)``, an unbiased-kernel estimate of ``softmax(q k^T * scale) v``
        (the ratio itself is slightly biased); zeros for a query that sees no key.
    """
    name = "performer_attention"
    q, k, v = check_qkv(name, q, k, v)
    if not isinstance(projection, Tensor) or projection.ndim != 2:
        raise TypeError(f"{name}: projection must be a (M, D) tensor; got {projection!r:.60}")
    if projection.shape[1] != q.shape[-1]:
        raise ValueError(
            f"{name}: projection must have shape (M, D) with D = {q.shape[-1]}; got "
            f"{tuple(projection.shape)}"
        )
    check_positive(name, "chunk_size", chunk_size)
    B, Hkv, Nk = k.shape[0], k.shape[1], k.shape[2]
    keep = key_padding(name, mask, B, Nk)
    offset = causal_offset(name, causal, q.shape[2], Nk)
    root = resolve_scale(name, scale, q.shape[-1]) ** 0.5
    every_key = keep if keep is not None else torch.ones(B, Nk, dtype=torch.bool, device=k.device)
    phi_q = positive_features(group_queries(q, Hkv) * root, projection)  # (B, Hkv, G, Nq, M)
    phi_k = positive_features(
        (k * root).unsqueeze(2), projection, over_keys=every_key[:, None, None, :]
    )  # (B, Hkv, 1, Nk, M)
    out = kernel_attention(
        phi_q, phi_k, v.unsqueeze(2), keep=keep, offset=offset, chunk_size=chunk_size
    )
    return ungroup(out)  # (B, Hq, Nq, Dv)


class PerformerAttention(nn.Module):
    """:func:`performer_attention` with its random features as a buffer, redrawn in training.

    Args:
        head_dim: ``D``.
        num_features: ``M`` (default 256); the error falls like ``1 / sqrt(M)``.
        redraw_interval: in training mode, draw new features every this many calls (the paper
            redraws periodically); None never redraws. Evaluation always uses the current draw.
        seed: seed of the first draw (later draws continue the same generator).

    Attributes:
        projection: buffer ``W (M, D)``, saved with the model so evaluation is reproducible.
    """

    projection: Tensor

    def __init__(
        self,
        head_dim: int,
        num_features: int = 256,
        *,
        redraw_interval: int | None = 1000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.head_dim = check_positive("PerformerAttention", "head_dim", head_dim)
        self.num_features = check_positive("PerformerAttention", "num_features", num_features)
        if redraw_interval is not None:
            check_positive("PerformerAttention", "redraw_interval", redraw_interval)
        self.redraw_interval = redraw_interval
        self._generator = torch.Generator().manual_seed(seed)
        self._calls = 0
        self.register_buffer("projection", self._draw())

    def _draw(self) -> Tensor:
        return orthogonal_features(self.num_features, self.head_dim, generator=self._generator)

    @torch.no_grad()
    def redraw(self) -> None:
        """Draw new random features in place (same device and dtype)."""
        self.projection.copy_(self._draw())

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
        """As :func:`performer_attention` with this module's ``projection``."""
        if self.training and self.redraw_interval is not None:
            if self._calls and self._calls % self.redraw_interval == 0:
                self.redraw()
            self._calls += 1
        return performer_attention(
            q, k, v, projection=self.projection, mask=mask, causal=causal, scale=scale
        )

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, num_features={self.num_features}, "
            f"redraw_interval={self.redraw_interval}"
        )


def performer_rows(q: Tensor, k: Tensor, knob: int, keep: Tensor | None) -> Tensor:
    """The rows ``(B, H, Nq, Nk)`` FAVOR+ implies with ``knob`` orthogonal random features
    (seed 0, as ``performer`` with ``seed=0`` draws them)."""
    s = q.shape[-1] ** -0.5
    w = orthogonal_features(
        knob, q.shape[-1], generator=torch.Generator().manual_seed(0), dtype=q.dtype
    )
    fq = positive_features(q * s**0.5, w)
    every = keep if keep is not None else torch.ones(k.shape[0], k.shape[2], dtype=torch.bool)
    fk = positive_features(k * s**0.5, w, over_keys=every[:, None, :])
    return kernel_rows(fq, fk, keep)
