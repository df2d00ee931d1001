r"""Position information for attention: added to the inputs, rotated into queries and keys, or
added to the scores.

- :class:`SinusoidalPositionalEncoding`: the fixed sines and cosines of the original
  Transformer, added to the ``(B, N, dim)`` embeddings.
- :class:`LearnedPositionalEmbedding`: one learned vector per position (BERT, GPT-2), added
  likewise.
- :class:`RotaryEmbedding`: RoPE, rotating the ``(B, H, N, D)`` queries and keys inside
  attention (see :mod:`qkv.functional.rotary`); what :class:`~qkv.nn.multihead.MultiHeadAttention`
  takes as ``rope``.
- :func:`alibi_slopes` (re-exported from :mod:`qkv.scores`): ALiBi adds a distance penalty to the
  scores instead; pass ``qkv.scores.alibi(num_heads)`` as the attention ``bias``.

All three modules take an ``offset``: the position of the first input row, i.e. the number of
tokens already decoded when the inputs are the newest tokens of a KV-cached sequence.

Notation used for tensor shapes: ``B`` batch, ``N`` positions, ``H`` heads, ``D`` head dim.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from qkv.functional.rotary import apply_rotary, rotary_frequencies
from qkv.scores import alibi_slopes

__all__ = [
    "LearnedPositionalEmbedding",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "alibi_slopes",
]


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {name}={value!r}")
    return value


def _check_offset(offset: object) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0; got offset={offset!r}")
    return offset


def _check_embeddings(x: object, dim: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.ndim != 3 or x.shape[-1] != dim:
        raise ValueError(f"x must have shape (B, N, dim) with dim={dim}; got {tuple(x.shape)}")
    return x


def _ordinary_tensors() -> contextlib.AbstractContextManager[None]:
    """Build cached tables as ordinary tensors even inside ``torch.inference_mode()``: a table
    first grown while decoding in inference mode is reused later in training, and autograd
    refuses to save an inference tensor for backward."""
    return torch.inference_mode(False)


def _sinusoid_table(length: int, dim: int, base: float = 10000.0) -> Tensor:
    """``(length, dim)`` float32 table: ``PE[p, 2i] = sin(p / base^(2i/dim))``,
    ``PE[p, 2i+1] = cos(p / base^(2i/dim))``. An odd ``dim`` drops the last cosine column.

    Computed in float64 (large ``p`` times small frequencies) and stored as float32.
    """
    position = torch.arange(length, dtype=torch.float64).unsqueeze(1)  # (length, 1)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (ceil(dim/2),)
    angles = position * inv_freq  # (length, ceil(dim/2))
    table = torch.empty(length, dim, dtype=torch.float64)
    table[:, 0::2] = angles.sin()
    table[:, 1::2] = angles[:, : dim // 2].cos()
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    r"""Fixed sinusoidal positions added to the inputs.

    Vaswani et al. "Attention Is All You Need" (2017), Section 3.5::

        PE[p, 2i]     = sin(p / base^(2i / dim))
        PE[p, 2i + 1] = cos(p / base^(2i / dim))
        forward(x, offset)[b, n] = x[b, n] + PE[offset + n]

    The table is a non-persistent buffer: it follows ``.to(device)`` but is not saved in the
    ``state_dict`` (it is a function of ``dim`` and ``base``). It is computed for ``max_len``
    positions up front and recomputed longer when an input reaches past it, since any position
    has a well-defined encoding. Scaling the embeddings by ``sqrt(dim)`` and dropout, as in the
    paper, are the caller's.

    Args:
        dim: ``dim``, the embedding size (odd sizes are allowed).
        max_len: positions precomputed at construction.
        base: the wavelength base, 10000 in the paper.

    Attributes:
        pe: ``(max_len, dim)`` float32 buffer (or longer, once grown).
    """

    pe: Tensor

    def __init__(self, dim: int, max_len: int = 4096, *, base: float = 10000.0) -> None:
        super().__init__()
        self.dim = _check_size("dim", dim)
        _check_size("max_len", max_len)
        if not base > 0:
            raise ValueError(f"base must be > 0; got base={base!r}")
        self.base = float(base)
        with _ordinary_tensors():
            table = _sinusoid_table(max_len, dim, self.base)
        self.register_buffer("pe", table, persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """Add the encodings of positions ``offset .. offset + N - 1``.

        Args:
            x: ``(B, N, dim)`` embeddings.
            offset: position of ``x[:, 0]`` (tokens already decoded).

        Returns:
            ``(B, N, dim)`` in ``x.dtype``.

        Raises:
            TypeError, ValueError: for a non-tensor, a wrong shape or a negative ``offset``.
        """
        x = _check_embeddings(x, self.dim)
        end = _check_offset(offset) + x.shape[1]
        if end > self.pe.shape[0]:
            # Grow to the next power of two so that a decoding loop recomputes rarely.
            length = 1 << (end - 1).bit_length()
            with _ordinary_tensors():
                self.pe = _sinusoid_table(length, self.dim, self.base).to(self.pe)
        return x + self.pe[offset:end].to(x.dtype)  # (B, N, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_len={self.pe.shape[0]}, base={self.base:g}"


class LearnedPositionalEmbedding(nn.Module):
    """One learned vector per position, added to the inputs (BERT, GPT-2).

    ``forward(x, offset)[b, n] = x[b, n] + weight[offset + n]``. Positions past ``max_len``
    have no vector and raise.

    Args:
        max_len: number of positions.
        dim: embedding size.

    Attributes:
        weight: ``(max_len, dim)`` parameter, initialised from ``N(0, 0.02^2)`` as in GPT-2.
    """

    def __init__(self, max_len: int, dim: int) -> None:
        super().__init__()
        self.max_len = _check_size("max_len", max_len)
        self.dim = _check_size("dim", dim)
        self.weight = nn.Parameter(torch.empty(max_len, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """Add the embeddings of positions ``offset .. offset + N - 1``.

        Args:
            x: ``(B, N, dim)`` embeddings.
            offset: position of ``x[:, 0]``.

        Returns:
            ``(B, N, dim)``.

        Raises:
            ValueError: for a wrong shape, or positions past ``max_len``.
        """
        x = _check_embeddings(x, self.dim)
        end = _check_offset(offset) + x.shape[1]
        if end > self.max_len:
            raise ValueError(
                f"positions {offset} .. {end - 1} (offset={offset}, N={x.shape[1]}) exceed "
                f"max_len ({self.max_len}) of the learned positional embedding"
            )
        return x + self.weight[offset:end].to(x.dtype)  # (B, N, dim)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, dim={self.dim}"


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) for ``(B, H, N, D)`` queries and keys.

    A thin cache around :func:`~qkv.functional.rotary.rotary_frequencies` and
    :func:`~qkv.functional.rotary.apply_rotary` (rotate-half convention, GPT-NeoX / LLaMA; see
    that module for the formula). It has no parameters; the cos/sin tables are a cache, not
    state: computed for ``max_positions`` positions at construction, and recomputed on the
    inputs' device, longer when a position reaches past them. They are kept in float32
    (float64 for float64 inputs) whatever the module's dtype, because ``.half()`` would
    otherwise round the tables themselves.

    Args:
        head_dim: ``D``, even.
        base: ``theta_i = base^(-2i / D)``.
        max_positions: positions precomputed at construction.

    Raises:
        ValueError: for an odd ``head_dim``, ``base <= 0`` or ``max_positions < 1``.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, max_positions: int = 2048) -> None:
        super().__init__()
        _check_size("max_positions", max_positions)
        # Also validates head_dim and base, with messages naming them.
        with _ordinary_tensors():
            self._cos, self._sin = rotary_frequencies(head_dim, max_positions, base)
        self.head_dim = head_dim
        self.base = float(base)
        self.max_positions = max_positions

    def tables(
        self, length: int, *, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """The cached ``cos, sin``, each ``(P, D)`` with ``P >= length``, on ``device``, in
        float64 for ``dtype=float64`` and float32 otherwise."""
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        cached = self._cos.shape[0]
        if cached < length or self._cos.device != device or self._cos.dtype != table_dtype:
            # Grow to the next power of two so that a decoding loop recomputes rarely.
            size = cached if length <= cached else 1 << (length - 1).bit_length()
            with _ordinary_tensors():
                self._cos, self._sin = rotary_frequencies(
                    self.head_dim, size, self.base, dtype=table_dtype, device=device
                )
        return self._cos, self._sin

    def rotate(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """Rotate ``x (B, H, N, D)`` as positions ``offset .. offset + N - 1`` (or the explicit
        ``(N,)`` / ``(B, N)`` integer ``positions``); returns ``(B, H, N, D)`` in ``x.dtype``."""
        if positions is None:
            length = _check_offset(offset) + (x.shape[2] if x.ndim == 4 else 0)
        else:
            length = int(positions.max()) + 1 if positions.numel() else 0
        cos, sin = self.tables(length, device=x.device, dtype=x.dtype)
        return apply_rotary(x, cos, sin, offset=offset, positions=positions)

    def forward(
        self, q: Tensor, k: Tensor, offset: int = 0, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Rotate queries and keys that sit at the same positions (self-attention).

        Args:
            q: ``(B, Hq, N, D)``.
            k: ``(B, Hkv, N, D)``.
            offset: position of the first row: the KV-cache length when decoding.
            positions: ``(N,)`` or ``(B, N)`` explicit integer positions instead of ``offset``.

        Returns:
            ``(q_rotated, k_rotated)``, shapes and dtypes as given.
        """
        return self.rotate(q, offset, positions), self.rotate(k, offset, positions)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base:g}, max_positions={self.max_positions}"
