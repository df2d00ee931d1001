r"""A preallocated key/value cache for autoregressive decoding.

Shape contract (``B`` batch, ``Hkv`` key/value heads, ``D`` key head dim, ``Dv`` value head dim,
``L`` tokens cached so far, ``n`` new tokens)::

    buffers     k (B, Hkv, max_len, D)      v (B, Hkv, max_len, Dv)     allocated once
    update      k (B, Hkv, n, D)            v (B, Hkv, n, Dv)           written at L .. L + n - 1
    returns     k (B, Hkv, L + n, D)        v (B, Hkv, L + n, Dv)       views of the filled prefix

The keys are stored *after* any rotary embedding, so a cached key is never rotated again; the
new tokens' position is ``len(cache)`` before the update. Every row of the batch has the same
length ``L``; rows with shorter real content are masked by the caller (a ``key_padding_mask``).

Typical use, one cache per attention layer (as in gpt-fast)::

    cache = mha.make_kv_cache(batch_size=B, max_len=prompt_len + new_tokens)
    out, _ = mha(prompt, causal=True, kv_cache=cache)          # prefill
    for _ in range(new_tokens):
        out, _ = mha(next_token, causal=True, kv_cache=cache)  # (B, 1, E) each step

The cache is for inference: it writes into its buffers in place, which autograd cannot
differentiate through across steps, so :meth:`KVCache.update` refuses inputs that require
gradients. Run decoding under ``torch.no_grad()`` or ``torch.inference_mode()``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVCache"]


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {name}={value!r}")
    return value


class KVCache:
    """Keys and values of the tokens decoded so far, in preallocated buffers.

    See the module docstring for the shape contract.

    Args:
        batch_size: ``B``.
        num_kv_heads: ``Hkv``.
        max_len: the most tokens the cache can hold (prompt plus generated).
        head_dim: ``D``.
        value_dim: ``Dv``; ``head_dim`` when None.
        dtype: of the buffers; updates must match it.
        device: of the buffers; updates must match it.

    Attributes:
        k: ``(B, Hkv, max_len, D)`` buffer; only ``k[:, :, :len(self)]`` is meaningful.
        v: ``(B, Hkv, max_len, Dv)`` buffer.
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        value_dim: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        B = _check_size("batch_size", batch_size)
        H = _check_size("num_kv_heads", num_kv_heads)
        N = _check_size("max_len", max_len)
        D = _check_size("head_dim", head_dim)
        Dv = D if value_dim is None else _check_size("value_dim", value_dim)
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype; got dtype={dtype}")
        # Zeros rather than empty: the unfilled tail is never read, but a debugger or a stray
        # slice then shows zeros instead of garbage (or NaN).
        self.k = torch.zeros(B, H, N, D, dtype=dtype, device=device)
        self.v = torch.zeros(B, H, N, Dv, dtype=dtype, device=device)
        self._length = 0

    # --- sizes ------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def value_dim(self) -> int:
        return self.v.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def __len__(self) -> int:
        """Tokens cached so far, ``L``: also the position of the next token."""
        return self._length

    # --- use --------------------------------------------------------------------------------
    @property
    def keys(self) -> Tensor:
        """``(B, Hkv, L, D)`` view of the cached keys."""
        return self.k[:, :, : self._length]

    @property
    def values(self) -> Tensor:
        """``(B, Hkv, L, Dv)`` view of the cached values."""
        return self.v[:, :, : self._length]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``n`` new tokens and return everything cached.

        Args:
            k: ``(B, Hkv, n, D)`` keys of the new tokens (already rotated, with RoPE).
            v: ``(B, Hkv, n, Dv)`` their values.

        Returns:
            ``k_all (B, Hkv, L + n, D)`` and ``v_all (B, Hkv, L + n, Dv)``: views of the
            buffers, valid until the next :meth:`update` or :meth:`reset` overwrites them.

        Raises:
            TypeError: for a non-tensor or a dtype other than the cache's.
            ValueError: for shapes that do not match the cache, a device other than the cache's,
                inputs that require gradients, or more tokens than ``max_len`` leaves room for.
        """
        n = self._check_update(k, v)
        start, end = self._length, self._length + n
        if end > self.max_len:
            raise ValueError(
                f"KVCache overflow: {start} cached + {n} new = {end} tokens exceed "
                f"max_len ({self.max_len}); allocate a larger cache or reset() it"
            )
        self.k[:, :, start:end].copy_(k)
        self.v[:, :, start:end].copy_(v)
        self._length = end
        return self.keys, self.values

    def reset(self) -> None:
        """Forget every cached token (the buffers are kept and overwritten by later updates)."""
        self._length = 0

    def _check_update(self, k: Tensor, v: Tensor) -> int:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        expected_k = (
            f"(B, Hkv, n, D) = ({self.batch_size}, {self.num_kv_heads}, n, {self.head_dim})"
        )
        expected_v = (
            f"(B, Hkv, n, Dv) = ({self.batch_size}, {self.num_kv_heads}, n, {self.value_dim})"
        )
        if k.ndim != 4 or (k.shape[0], k.shape[1], k.shape[3]) != (
            self.batch_size,
            self.num_kv_heads,
            self.head_dim,
        ):
            raise ValueError(f"k must have shape {expected_k}; got {tuple(k.shape)}")
        if v.ndim != 4 or (v.shape[0], v.shape[1], v.shape[3]) != (
            self.batch_size,
            self.num_kv_heads,
            self.value_dim,
        ):
            raise ValueError(f"v must have shape {expected_v}; got {tuple(v.shape)}")
        if k.shape[2] != v.shape[2]:
            raise ValueError(
                f"k and v must have the same number of new tokens n (dim 2); "
                f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise TypeError(
                f"k and v must have the cache's dtype {self.dtype}; got k {k.dtype}, v {v.dtype}"
            )
        if k.device != self.device or v.device != self.device:
            raise ValueError(
                f"k and v must be on the cache's device {self.device}; got k {k.device}, v {v.device}"
            )
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise ValueError(
                "KVCache is for inference and cannot carry gradients across its in-place "
                "updates; decode under torch.no_grad() or torch.inference_mode()"
            )
        return k.shape[2]

    def __repr__(self) -> str:
        return (
            f"KVCache(batch_size={self.batch_size}, num_kv_heads={self.num_kv_heads}, "
            f"length={len(self)}, max_len={self.max_len}, head_dim={self.head_dim}, "
            f"value_dim={self.value_dim}, dtype={self.dtype}, device={self.device})"
        )
