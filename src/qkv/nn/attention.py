r"""``Attention``: the single-head module of the tutorial, over :func:`qkv.attention`.

::

    Attention(x, y) = softmax((x W_q^T)(y W_k^T)^T / sqrt(dim)) (y W_v^T) W_o^T

``x`` are the queries' inputs and ``y`` the keys' (``y = x`` in self-attention). For several
heads, grouped heads, RoPE or a KV cache use :class:`~qkv.nn.multihead.MultiHeadAttention`.

Notation used for tensor shapes: ``B`` batch, ``Nq`` queries, ``Nk`` keys.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from qkv.functional.attention import attention
from qkv.masks import MaskFunction
from qkv.request import CausalArg
from qkv.scores import ScoreFunction

__all__ = ["Attention"]


def _check_input(name: str, x: object, dim: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.ndim != 3 or x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape (B, N, dim) with dim={dim}; got {tuple(x.shape)}")
    return x


def _with_head_dim(name: str, t: Tensor | None) -> Tensor | None:
    """A ``(Nq, Nk)`` or ``(B, Nq, Nk)`` mask or bias as ``(1 | B, 1, Nq, Nk)``."""
    if t is None or t.ndim == 2:
        return t
    if t.ndim == 3:
        return t.unsqueeze(1)  # (B, 1, Nq, Nk): the one head
    raise ValueError(f"{name} must have shape (Nq, Nk) or (B, Nq, Nk); got {tuple(t.shape)}")


class Attention(nn.Module):
    r"""Single-head scaled dot-product attention with learned projections.

    ::

        q = query W_q^T    k = key W_k^T    v = value W_v^T        (B, N, dim) each
        out = softmax(q k^T / sqrt(dim) + bias, masked) v W_o^T    (B, Nq, dim)

    Args:
        dim: size of the inputs, the projections and the output.
        bias: whether the four projections have biases.
        backend: the :func:`qkv.attention` backend.

    Attributes:
        q_proj, k_proj, v_proj, out_proj: ``Linear(dim, dim)``.
    """

    def __init__(self, dim: int, *, bias: bool = False, backend: str = "auto") -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int; got dim={dim!r}")
        self.dim = dim
        self.backend = backend
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        mask: Tensor | MaskFunction | None = None,
        bias: Tensor | ScoreFunction | None = None,
        causal: CausalArg = False,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query`` over ``key`` / ``value``.

        Args:
            query: ``(B, Nq, dim)``.
            key: ``(B, Nk, dim)``; ``query`` when None (self-attention).
            value: ``(B, Nk, dim)``; ``key`` when None.
            mask: bool ``(Nq, Nk)`` or ``(B, Nq, Nk)``, True = attend, or a mask function.
            bias: float ``(Nq, Nk)`` or ``(B, Nq, Nk)`` added to the scaled scores, or a score
                function.
            causal: as in :func:`qkv.attention`.
            need_weights: also return the weights.

        Returns:
            ``out (B, Nq, dim)`` and ``weights (B, Nq, Nk)`` or None.
        """
        query = _check_input("query", query, self.dim)
        key = query if key is None else _check_input("key", key, self.dim)
        value = key if value is None else _check_input("value", value, self.dim)
        q = self.q_proj(query).unsqueeze(1)  # (B, 1, Nq, dim): one head
        k = self.k_proj(key).unsqueeze(1)  # (B, 1, Nk, dim)
        v = self.v_proj(value).unsqueeze(1)  # (B, 1, Nk, dim)
        mask = _with_head_dim("mask", mask) if isinstance(mask, Tensor) else mask
        bias = _with_head_dim("bias", bias) if isinstance(bias, Tensor) else bias
        opts: dict[str, Any] = {
            "mask": mask,
            "bias": bias,
            "causal": causal,
            "backend": self.backend,
        }
        if need_weights:
            out, weights = attention(q, k, v, return_weights=True, **opts)
            return self.out_proj(out.squeeze(1)), weights.squeeze(1)  # (B, Nq, dim), (B, Nq, Nk)
        out = attention(q, k, v, **opts)
        return self.out_proj(out.squeeze(1)), None  # (B, Nq, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bias={self.q_proj.bias is not None}"
