r"""Rotary position embedding (RoPE) as pure functions.

Su et al. "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021). Queries and
keys are rotated, pair of features by pair of features, by an angle proportional to their
position, so that a score depends on the two positions only through their difference::

    <R(m) q, R(n) k> = <q, R(n - m) k>        R(p): rotation by the angles p * theta_i

with ``theta_i = base^(-2i / D)`` for ``i = 0 .. D/2 - 1``.

Convention: *rotate-half* (GPT-NeoX, Hugging Face LLaMA): feature ``i`` is paired with feature
``i + D/2``, not with its neighbour ``2i + 1`` as in the paper and Meta's original LLaMA code.
The two give the same scores up to a fixed permutation of the projection weights, but weights
trained with one convention must be permuted before they are used with the other::

    x = [x_0 .. x_{D/2-1} | x_{D/2} .. x_{D-1}]
    rotate_half(x) = [-x_{D/2} .. -x_{D-1} | x_0 .. x_{D/2-1}]
    rotary(x, p) = x * cos(p theta) + rotate_half(x) * sin(p theta)     (theta repeated twice)

Notation used for tensor shapes: ``B`` batch, ``H`` heads, ``N`` positions, ``D`` head dim,
``P`` rows of a cos/sin table (positions it covers).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_rotary", "rotary_frequencies", "rotate_half"]


def _check_head_dim(head_dim: object) -> int:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2:
        raise ValueError(f"head_dim must be an even int >= 2; got head_dim={head_dim!r}")
    if head_dim % 2:
        raise ValueError(
            f"head_dim must be even for rotary embedding (features are rotated in pairs); "
            f"got head_dim={head_dim}"
        )
    return head_dim


def rotary_frequencies(
    head_dim: int,
    positions: int | Tensor,
    base: float = 10000.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """The cos and sin tables of RoPE, in the rotate-half layout.

    Angles are computed in float64 and only then cast: in float32, ``p * theta`` at positions in
    the tens of thousands already loses a few bits of the angle.

    Args:
        head_dim: ``D``, even.
        positions: an int ``P`` for positions ``0 .. P - 1``, or a tensor of positions of any
            shape ``(*S)`` (integer, or float for interpolated positions).
        base: ``theta_i = base^(-2i / D)``; 10000 in the paper, larger in long-context models.
        dtype: of the returned tables.
        device: of the returned tables; a positions tensor's own device when None.

    Returns:
        ``cos, sin``, each ``(P, D)`` (or ``(*S, D)``); column ``i`` and ``i + D/2`` hold the
        same angle.

    Raises:
        ValueError: for an odd or non-positive ``head_dim``, ``base <= 0`` or negative ``positions``.
    """
    head_dim = _check_head_dim(head_dim)
    if not base > 0:
        raise ValueError(f"base must be > 0; got base={base!r}")
    if isinstance(positions, Tensor):
        if positions.dtype == torch.bool or positions.is_complex():
            raise ValueError(f"positions must be an integer or float tensor; got {positions.dtype}")
        pos = positions.to(device=device or positions.device, dtype=torch.float64)
    else:
        if isinstance(positions, bool) or not isinstance(positions, int) or positions < 0:
            raise ValueError(f"positions must be an int >= 0 or a tensor; got {positions!r}")
        pos = torch.arange(positions, device=device, dtype=torch.float64)
    exponents = torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float64) / head_dim
    inv_freq = base**-exponents  # (D/2,)
    angles = pos.unsqueeze(-1) * inv_freq  # (*S, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (*S, D): rotate-half pairs i and i + D/2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """``[x1 | x2] -> [-x2 | x1]`` over the last dim: a quarter turn of each pair ``(i, i + D/2)``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    offset: int = 0,
    positions: Tensor | None = None,
) -> Tensor:
    """Rotate ``x`` by its positions, looked up in the tables of :func:`rotary_frequencies`.

    By default the ``N`` rows of ``x`` sit at positions ``offset .. offset + N - 1`` (``offset``
    is the number of tokens already in a KV cache when decoding); ``positions`` gives them
    explicitly instead (packed or left-padded batches).

    The product runs in at least the tables' precision (float32 tables: float32 even for
    half-precision ``x``) and is cast back to ``x.dtype``.

    Args:
        x: ``(B, H, N, D)`` queries or keys.
        cos: ``(P, D)`` table, row ``p`` for position ``p``.
        sin: ``(P, D)``, like ``cos``.
        offset: position of the first row of ``x``; only without ``positions``.
        positions: ``(N,)`` or ``(B, N)`` integer positions, each in ``[0, P)``.

    Returns:
        ``(B, H, N, D)`` in ``x.dtype``.

    Raises:
        ValueError: for a wrong rank, an odd ``D``, tables that do not match ``D`` or do not
            cover the positions asked for, or both ``offset`` and ``positions``.
    """
    _check_rotary_args(x, cos, sin)
    N = x.shape[2]
    if positions is None:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be an int >= 0; got offset={offset!r}")
        if offset + N > cos.shape[0]:
            raise ValueError(
                f"the cos/sin tables cover {cos.shape[0]} positions but x needs positions "
                f"{offset} .. {offset + N - 1} (offset={offset}, N={N})"
            )
        c, s = cos[offset : offset + N], sin[offset : offset + N]  # (N, D)
    else:
        if offset:
            raise ValueError(f"give either offset or positions, not both; got offset={offset}")
        c, s = _gather(cos, sin, positions, x)  # (N, D) or (B, 1, N, D)
    dtype = torch.promote_types(x.dtype, c.dtype)
    xc = x.to(dtype)
    return (xc * c.to(dtype) + rotate_half(xc) * s.to(dtype)).to(x.dtype)  # (B, H, N, D)


def _check_rotary_args(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(
            f"x must have shape (B, H, N, D); got a {x.ndim}-d tensor of shape {tuple(x.shape)}"
        )
    _check_head_dim(x.shape[-1])
    if cos.ndim != 2 or cos.shape != sin.shape:
        raise ValueError(
            f"cos and sin must be (P, D) tables of the same shape; "
            f"got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    if cos.shape[1] != x.shape[-1]:
        raise ValueError(
            f"the tables' dim ({cos.shape[1]}) must equal x's head dim D ({x.shape[-1]}); "
            f"got x {tuple(x.shape)}, cos {tuple(cos.shape)}"
        )


def _gather(cos: Tensor, sin: Tensor, positions: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Table rows at ``positions``: ``(N, D)`` for ``(N,)`` positions, ``(B, 1, N, D)`` for
    ``(B, N)`` (the 1 broadcasts over heads)."""
    B, _, N, _ = x.shape
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ValueError(f"positions must be an integer tensor; got {positions.dtype}")
    if tuple(positions.shape) not in ((N,), (B, N)):
        raise ValueError(
            f"positions must have shape (N,) = ({N},) or (B, N) = ({B}, {N}); "
            f"got {tuple(positions.shape)}"
        )
    # Checked here because an out-of-range index on a GPU is an opaque device assert; the check
    # costs a host sync, which the ``offset`` form avoids in decoding loops.
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= cos.shape[0]):
        raise ValueError(
            f"positions must lie in [0, {cos.shape[0]}) (the rows of the cos/sin tables); "
            f"got min {int(positions.min())}, max {int(positions.max())}"
        )
    idx = positions.to(cos.device).long()
    c, s = cos[idx], sin[idx]  # (N, D) or (B, N, D)
    if positions.ndim == 2:
        c, s = c.unsqueeze(1), s.unsqueeze(1)  # (B, 1, N, D)
    return c, s
