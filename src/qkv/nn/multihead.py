r"""Multi-head attention with grouped key/value heads (MHA, GQA, MQA), batch-first.

The module owns the four projections and reshapes around :func:`qkv.attention`; it has no
attention code of its own. Key/value heads are shared by groups of query heads and never
repeated in memory::

    MHA  Hkv = Hq          GQA  Hkv = Hq / 2        MQA  Hkv = 1
    v   v   v   v          v       v                v
    k   k   k   k          k       k                k
    |   |   |   |         / \     / \            /  |  |  \
    q   q   q   q         q  q    q  q           q  q  q  q

Notation used for tensor shapes: ``B`` batch, ``Nq`` queries, ``Nk`` keys, ``E`` embed_dim,
``Hq`` num_heads, ``Hkv`` num_kv_heads, ``D = E / Hq`` head dim, ``Ek`` kdim, ``Ev`` vdim,
``L`` tokens already in a KV cache.

Three ways to call it:

- self-attention: ``mha(x)``, keys and values projected from ``x (B, N, E)``;
- cross-attention: ``mha(x, memory)`` (``value`` defaults to ``key``), or, to project the memory
  once for many decoding steps, ``kv = mha.project_kv(memory)`` then ``mha(x, key_value=kv)``;
- cached self-attention decoding: ``mha(x_new, causal=True, kv_cache=cache)``, see
  :mod:`qkv.nn.kv_cache`.

Context parallelism: after ``mha.set_context_parallel(group)`` every rank passes its shard of
the sequence (:func:`qkv.parallel.shard`) and gets its shard of the output; masks, biases and
``causal`` describe the whole sequence, and RoPE rotates each token at its global position.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from qkv import masks
from qkv.functional.attention import attention
from qkv.masks import MaskFunction
from qkv.nn.kv_cache import KVCache
from qkv.nn.positional import RotaryEmbedding
from qkv.parallel import ContextParallel, SequenceLayout, context_parallel_attention, global_lengths
from qkv.request import BiasArg, CausalArg, MaskArg, broadcasts_to

__all__ = ["MultiHeadAttention"]


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {name}={value!r}")
    return value


def _check_input(name: str, x: object, dim: int, dim_name: str) -> Tensor:
    """A ``(B, N, dim)`` float tensor, or an error naming the argument and its shape."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(
            f"{name} must have shape (B, N, {dim_name}) (batch-first); "
            f"got a {x.ndim}-d tensor of shape {tuple(x.shape)}"
        )
    if x.shape[-1] != dim:
        raise ValueError(
            f"{name}'s last dim ({x.shape[-1]}) must equal {dim_name} ({dim}); "
            f"got shape {tuple(x.shape)}"
        )
    return x


def _make_rope(rope: bool | RotaryEmbedding | None, head_dim: int) -> RotaryEmbedding | None:
    if rope is None or rope is False:
        return None
    if rope is True:
        if head_dim % 2:
            raise ValueError(
                f"rope needs an even head dim D = embed_dim / num_heads; got {head_dim}"
            )
        return RotaryEmbedding(head_dim)
    if isinstance(rope, RotaryEmbedding):
        if rope.head_dim != head_dim:
            raise ValueError(
                f"rope.head_dim ({rope.head_dim}) must equal the head dim "
                f"D = embed_dim / num_heads ({head_dim})"
            )
        return rope
    raise TypeError(f"rope must be a bool or a RotaryEmbedding; got {type(rope).__name__}")


class MultiHeadAttention(nn.Module):
    r"""Multi-head attention over :func:`qkv.attention`, with GQA/MQA, RoPE and a KV cache.

    Vaswani et al. "Attention Is All You Need" (2017); grouped-query attention from Ainslie et
    al. "GQA" (2023), multi-query from Shazeer "Fast Transformer Decoding" (2019)::

        q = query W_q^T (+ b_q)    split into Hq heads    (B, Hq, Nq, D)
        k = key   W_k^T (+ b_k)    split into Hkv heads   (B, Hkv, Nk, D)   RoPE rotates q and k
        v = value W_v^T (+ b_v)    split into Hkv heads   (B, Hkv, Nk, D)
        out = concat_h(softmax(q_h k_g(h)^T / sqrt(D) + bias, masked) v_g(h)) W_o^T (+ b_o)

    with ``g(h) = h // (Hq / Hkv)``. Inputs are batch-first, ``(B, N, E)``, always.

    Args:
        embed_dim: ``E``, the query (and output) size; a multiple of ``num_heads``.
        num_heads: ``Hq``.
        num_kv_heads: ``Hkv``, a divisor of ``num_heads``: ``num_heads`` (the default) is plain
            multi-head attention, 1 is multi-query, anything between grouped-query.
        kdim: ``Ek``, size of the key inputs (default ``E``), for cross-attention.
        vdim: ``Ev``, size of the value inputs (default ``E``).
        bias: whether the four projections have biases.
        dropout: probability of dropping an attention weight, in training mode only.
        rope: rotary position embedding of queries and keys (self-attention only): False, True
            (a :class:`~qkv.nn.positional.RotaryEmbedding` of base 10000), or a
            ``RotaryEmbedding`` of head dim ``D`` (for another base, or to share one cache).
        backend: the :func:`qkv.attention` backend, ``"auto"`` by default.
        attention: the attention function: ``"exact"`` (:func:`qkv.attention`, the default),
            the name of an approximation in :mod:`qkv.approx` (``"linear"``, ``"performer"``,
            ``"nystrom"``, ``"linformer"``, ``"bigbird"``, ``"local"``), NOT exact, or a callable
            ``fn(q, k, v, *, mask, causal) -> (B, Hq, Nq, D)``. See :meth:`set_attention`.
        attention_options: keyword options of the approximation, e.g. ``{"num_features": 128}``.

    Attributes:
        q_proj: ``Linear(E, E)``.
        k_proj: ``Linear(Ek, Hkv * D)``.
        v_proj: ``Linear(Ev, Hkv * D)``.
        out_proj: ``Linear(E, E)``.
        rope: the ``RotaryEmbedding`` or None.
        attention_name: ``"exact"``, the approximation's name, or the callable's name.
        attention_impl: None for exact attention, else the approximation (a module when it has
            parameters or buffers, so they are saved with the model).

    Raises:
        ValueError: when ``embed_dim % num_heads != 0`` or ``num_heads % num_kv_heads != 0``,
            for sizes < 1, ``dropout`` outside ``[0, 1)``, or a ``rope`` of another head dim.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        rope: bool | RotaryEmbedding = False,
        backend: str = "auto",
        attention: str | Callable[..., Tensor] = "exact",
        attention_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        E = _check_size("embed_dim", embed_dim)
        Hq = _check_size("num_heads", num_heads)
        if E % Hq:
            raise ValueError(f"embed_dim ({E}) must be divisible by num_heads ({Hq})")
        Hkv = Hq if num_kv_heads is None else _check_size("num_kv_heads", num_kv_heads)
        if Hq % Hkv:
            raise ValueError(f"num_heads ({Hq}) must be divisible by num_kv_heads ({Hkv})")
        if isinstance(dropout, bool) or not isinstance(dropout, int | float):
            raise ValueError(f"dropout must be a number in [0, 1); got dropout={dropout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got dropout={dropout!r}")
        self.embed_dim = E
        self.num_heads = Hq
        self.num_kv_heads = Hkv
        self.head_dim = D = E // Hq
        self.kdim = E if kdim is None else _check_size("kdim", kdim)
        self.vdim = E if vdim is None else _check_size("vdim", vdim)
        self.dropout = float(dropout)
        self.backend = backend
        self.q_proj = nn.Linear(E, E, bias=bias)
        self.k_proj = nn.Linear(self.kdim, Hkv * D, bias=bias)
        self.v_proj = nn.Linear(self.vdim, Hkv * D, bias=bias)
        self.out_proj = nn.Linear(E, E, bias=bias)
        self.rope = _make_rope(rope, D)
        self.attention_name = "exact"
        self.attention_impl: Callable[..., Tensor] | None = None
        self.set_attention(attention, **(attention_options or {}))
        self.context_parallel: ContextParallel | None = None

    def set_context_parallel(self, setting: ContextParallel | None) -> None:
        """Run attention context-parallel (:func:`qkv.parallel.context_parallel_attention`)
        with ``setting`` (its process group, layout and method), or on one process (None).

        Then :meth:`forward` takes this rank's shard ``(B, n, E)`` of the query sequence (and
        of ``key``/``value`` for cross-attention), in ``setting.layout``, and returns this
        rank's shard of the output. ``key_padding_mask`` ``(B, Nk)``, ``attn_mask`` and
        ``bias`` describe the whole sequence; RoPE rotates at global positions. Exact attention
        only: no ``need_weights``, ``kv_cache``, ``key_value``, approximation or dropout.
        """
        if setting is not None and not isinstance(setting, ContextParallel):
            raise TypeError(
                f"setting must be a qkv.parallel.ContextParallel or None; got {setting!r}"
            )
        self.context_parallel = setting

    def set_attention(self, attention: str | Callable[..., Tensor], **options: Any) -> None:
        """Use another attention function from now on (the projections are kept).

        ``"exact"`` is :func:`qkv.attention` with this module's ``backend`` (the default).
        Anything else is an approximation (:mod:`qkv.approx`, NOT exact) or a callable
        ``fn(q, k, v, *, mask, causal) -> (B, Hq, Nq, D)``; it receives ``mask`` as
        :func:`qkv.attention` would (a ``(B, 1, 1, Nk)`` key padding tensor when only
        ``key_padding_mask`` is given) and ignores ``dropout``; ``bias`` and ``need_weights``
        need exact attention. A method with parameters (linformer) or buffers (performer) is
        built on this module's device and dtype and becomes its submodule ``attention_impl``.

        Raises:
            ValueError: an unknown name or bad options; TypeError: not a str or callable.
        """
        if "attention_impl" in self._modules:
            del self._modules["attention_impl"]
        if isinstance(attention, str):
            if attention == "exact":
                if options:
                    raise ValueError(
                        f"attention='exact' takes no attention_options; got {sorted(options)}"
                    )
                self.attention_name, self.attention_impl = "exact", None
                return
            from qkv.approx.registry import make_attention

            impl = make_attention(attention, head_dim=self.head_dim, **options)
            name = attention
        elif callable(attention):
            if options:
                raise ValueError(
                    "attention_options go with an approximation's name; a callable takes none"
                )
            impl, name = attention, getattr(attention, "__name__", type(attention).__name__)
        else:
            raise TypeError(
                f"attention must be 'exact', an approximation's name or a callable; got "
                f"{type(attention).__name__}"
            )
        if isinstance(impl, nn.Module):
            impl.to(device=self.q_proj.weight.device, dtype=self.q_proj.weight.dtype)
        self.attention_name, self.attention_impl = name, impl

    # --- the call -----------------------------------------------------------------------------

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | MaskFunction | None = None,
        bias: BiasArg = None,
        causal: CausalArg = False,
        need_weights: bool = False,
        average_attn_weights: bool = True,
        kv_cache: KVCache | None = None,
        key_value: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query`` to the keys, as self-attention, cross-attention or a cached step.

        Masks follow the qkv convention, **True = attend**. This is the OPPOSITE of
        ``torch.nn.MultiheadAttention``, whose ``key_padding_mask`` and boolean ``attn_mask``
        mark with True the positions to *ignore*: pass ``~mask`` when porting such code.

        Args:
            query: ``(B, Nq, E)``.
            key: ``(B, Nk, Ek)`` for cross-attention; None for self-attention (keys and values
                projected from ``query``, which needs ``Ek == Ev == E``).
            value: ``(B, Nk, Ev)``; defaults to ``key``.
            key_padding_mask: bool ``(B, Nk)``, **True = real token (attend)**, False = padding.
                With a ``kv_cache``, ``Nk = L + Nq`` covers the cache after this step's tokens.
            attn_mask: bool ``(Nq, Nk)`` or ``(B | 1, Hq | 1, Nq, Nk)``, True = attend, or a
                mask function ``(b, h, q_idx, kv_idx) -> bool`` from :mod:`qkv.masks`. Combined
                with ``key_padding_mask`` and ``causal`` by logical and. Additive float masks go
                in ``bias``.
            bias: float tensor broadcastable to ``(B, Hq, Nq, Nk)`` added to the scaled scores,
                or a score function such as ``qkv.scores.alibi(num_heads)``; passed through.

                Mask and score functions see this call's indices: ``q_idx`` in ``0 .. Nq - 1``
                and ``kv_idx`` in ``0 .. Nk - 1``. With a ``kv_cache`` the keys are the whole
                cache but the queries sit at positions ``L .. L + Nq - 1``, so build a
                position-dependent function with ``offset=L`` (``len(cache)`` before the call,
                or ``Nk - Nq``), e.g. ``scores.alibi(Hq, offset=L)`` or
                ``masks.sliding_window(w, offset=L)``. The module does not shift them for you,
                as it cannot tell whether a function already carries an offset; ``causal``
                needs none.
            causal: False, True, ``"top_left"`` or ``"bottom_right"`` as in
                :func:`qkv.attention`. With a ``kv_cache``, True means ``"bottom_right"``: the
                new queries sit at the end of the cached sequence.
            need_weights: also return the attention probabilities, before dropout (PyTorch's
                module returns them after dropout in training mode). This needs a backend that
                forms them (the reference), so leave it False for speed.
            average_attn_weights: average the returned weights over heads.
            kv_cache: a :class:`~qkv.nn.kv_cache.KVCache` of this module's ``Hkv`` and ``D``
                (:meth:`make_kv_cache`), for self-attention only (``key`` None). This step's
                keys and values are appended to it and attention runs over all ``L + Nq``
                tokens; with RoPE, the new tokens sit at positions ``L .. L + Nq - 1``.
            key_value: ``(k (B, Hkv, Nk, D), v (B, Hkv, Nk, D))`` from :meth:`project_kv`,
                used instead of projecting ``key`` and ``value`` again: the cross-attention
                cache. Not together with ``key``, ``value`` or ``kv_cache``.

        Returns:
            ``out (B, Nq, E)``, and the weights ``(B, Nq, Nk)`` if averaged, ``(B, Hq, Nq, Nk)``
            per head, or None unless ``need_weights``. A query with no key to attend gets a
            zero attention output (``out_proj``'s bias only), never NaN.

        Raises:
            TypeError, ValueError: for inputs of the wrong type, rank, size or combination,
                naming the argument and the shapes or values involved.
        """
        if self.context_parallel is not None:
            if need_weights or kv_cache is not None or key_value is not None:
                raise ValueError(
                    "need_weights, kv_cache and key_value are not available with context "
                    "parallelism (set_context_parallel(None) to run on one process)"
                )
            return self._forward_parallel(
                query, key, value, key_padding_mask, attn_mask, bias, causal
            ), None
        # 1. Inputs: validated once, here; the keys' source decides the query positions.
        query = _check_input("query", query, self.embed_dim, "embed_dim")
        B, Nq, _ = query.shape
        start = self._check_sources(query, key, value, kv_cache, key_value)

        # 2. Queries, split into heads and rotated at their positions.
        q = self._split_heads(self.q_proj(query), self.num_heads)  # (B, Hq, Nq, D)
        if self.rope is not None:
            q = self.rope.rotate(q, start)

        # 3. Keys and values: given, projected from the memory, or projected and cached.
        if key_value is not None:
            k, v = key_value  # (B, Hkv, Nk, D)
        elif key is None:
            k, v = self.project_kv(query, offset=start)  # (B, Hkv, Nq, D)
            if kv_cache is not None:
                k, v = kv_cache.update(k, v)  # (B, Hkv, L + Nq, D)
        else:
            k, v = self.project_kv(key, value)  # (B, Hkv, Nk, D)

        # 4. Masks, and the causal alignment a cache implies.
        mask = self._combine_masks(key_padding_mask, attn_mask, (B, self.num_heads, Nq, k.shape[2]))
        if causal is True and kv_cache is not None:
            causal = "bottom_right"

        # 5. Attention, then heads merged and projected back.
        if self.attention_impl is not None:
            out = self._approximate(q, k, v, mask, bias, causal, need_weights)
            out = out.transpose(1, 2).reshape(B, Nq, self.embed_dim)  # (B, Nq, E)
            return self.out_proj(out), None
        opts: dict[str, Any] = {
            "mask": mask,
            "bias": bias,
            "causal": causal,
            "dropout_p": self.dropout if self.training else 0.0,
            "backend": self.backend,
        }
        weights: Tensor | None = None
        if need_weights:
            out, weights = attention(q, k, v, return_weights=True, **opts)
            if average_attn_weights:
                weights = weights.mean(dim=1)  # (B, Nq, Nk)
        else:
            out = attention(q, k, v, **opts)  # (B, Hq, Nq, D)
        out = out.transpose(1, 2).reshape(B, Nq, self.embed_dim)  # (B, Nq, E)
        return self.out_proj(out), weights

    # --- pieces, public for caching -------------------------------------------------------------

    def project_kv(
        self,
        key: Tensor,
        value: Tensor | None = None,
        *,
        offset: int = 0,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Project keys and values into heads, as :meth:`forward` does.

        For cross-attention decoding, project the encoder memory once and pass the result to
        every step as ``forward(x, key_value=kv)``; that equals ``forward(x, memory)`` without
        re-projecting the memory each step. With RoPE the keys are rotated at positions
        ``offset .. offset + Nk - 1`` (the self-attention path).

        Args:
            key: ``(B, Nk, Ek)``.
            value: ``(B, Nk, Ev)``; defaults to ``key`` (then ``Ev`` must equal ``Ek``).
            offset: position of ``key[:, 0]``, for RoPE.
            positions: ``(Nk,)`` explicit positions for RoPE instead of ``offset`` (a shard of
                a longer sequence).

        Returns:
            ``k (B, Hkv, Nk, D)`` and ``v (B, Hkv, Nk, D)``.
        """
        key = _check_input("key", key, self.kdim, "kdim")
        if value is None:
            if self.vdim != self.kdim:
                raise ValueError(
                    f"value is required when vdim ({self.vdim}) differs from kdim ({self.kdim})"
                )
            value = key
        value = _check_input("value", value, self.vdim, "vdim")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(
                f"key and value must share B and Nk (dims 0, 1); "
                f"got key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        k = self._split_heads(self.k_proj(key), self.num_kv_heads)  # (B, Hkv, Nk, D)
        v = self._split_heads(self.v_proj(value), self.num_kv_heads)  # (B, Hkv, Nk, D)
        if self.rope is not None:
            k = self.rope.rotate(k, offset, positions)
        return k, v

    def make_kv_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty :class:`~qkv.nn.kv_cache.KVCache` for this module's self-attention:
        ``(batch_size, Hkv, max_len, D)`` buffers, in the parameters' dtype and device unless
        given."""
        weight = self.k_proj.weight
        return KVCache(
            batch_size,
            self.num_kv_heads,
            max_len,
            self.head_dim,
            dtype=dtype or weight.dtype,
            device=device or weight.device,
        )

    # --- conversion ---------------------------------------------------------------------------

    @classmethod
    def from_torch(cls, m: nn.MultiheadAttention) -> MultiHeadAttention:
        """A module computing what ``m`` computes, with copies of its weights.

        Both of PyTorch's layouts are read: the packed ``in_proj_weight (3E, E)`` (when
        ``kdim == vdim == E``) and the separate ``q_proj_weight``, ``k_proj_weight``,
        ``v_proj_weight``; with or without biases. The result is in ``m``'s dtype, device and
        training mode.

        Two conventions differ from ``m``, whatever it was built with:

        - qkv modules are always batch-first: give ``(B, N, E)`` inputs even if
          ``m.batch_first`` is False (transpose its ``(N, B, E)`` inputs with
          ``x.transpose(0, 1)``);
        - boolean masks mean True = attend: pass ``~key_padding_mask`` and ``~attn_mask`` where
          ``m`` took True = ignore.

        Raises:
            TypeError: if ``m`` is not a ``torch.nn.MultiheadAttention``.
            ValueError: if ``m`` uses ``add_bias_kv`` or ``add_zero_attn``, which append a learned
                or a zero key/value to every sequence and have no qkv equivalent.
        """
        if not isinstance(m, nn.MultiheadAttention):
            raise TypeError(f"m must be a torch.nn.MultiheadAttention; got {type(m).__name__}")
        if m.bias_k is not None or m.bias_v is not None:
            raise ValueError(
                "cannot convert a MultiheadAttention built with add_bias_kv=True: the learned "
                "key/value appended to every sequence has no qkv equivalent"
            )
        if m.add_zero_attn:
            raise ValueError(
                "cannot convert a MultiheadAttention built with add_zero_attn=True: the zero "
                "key/value appended to every sequence has no qkv equivalent"
            )
        has_bias = m.in_proj_bias is not None
        new = cls(
            m.embed_dim, m.num_heads, kdim=m.kdim, vdim=m.vdim, bias=has_bias, dropout=m.dropout
        )
        new.to(device=m.out_proj.weight.device, dtype=m.out_proj.weight.dtype)
        if m.in_proj_weight is not None:
            w_q, w_k, w_v = m.in_proj_weight.chunk(3)  # each (E, E)
        else:
            w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
        with torch.no_grad():
            for proj, w in ((new.q_proj, w_q), (new.k_proj, w_k), (new.v_proj, w_v)):
                proj.weight.copy_(w)
            new.out_proj.weight.copy_(m.out_proj.weight)
            if has_bias:
                b_q, b_k, b_v = m.in_proj_bias.chunk(3)  # each (E,)
                for proj, b in ((new.q_proj, b_q), (new.k_proj, b_k), (new.v_proj, b_v)):
                    proj.bias.copy_(b)
                new.out_proj.bias.copy_(m.out_proj.bias)
        new.train(m.training)
        return new

    # --- helpers ------------------------------------------------------------------------------

    def _forward_parallel(
        self,
        query: Tensor,
        key: Tensor | None,
        value: Tensor | None,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | MaskFunction | None,
        bias: BiasArg,
        causal: CausalArg,
    ) -> Tensor:
        """:meth:`forward` on this rank's shard under context parallelism: ``(B, n, E)``."""
        setting = self.context_parallel
        assert setting is not None
        if self.attention_impl is not None:
            raise ValueError(
                f"context parallelism runs exact attention; this module uses "
                f"attention={self.attention_name!r}"
            )
        if self.training and self.dropout > 0:
            raise ValueError(
                f"dropout ({self.dropout}) is not available with context parallelism; build "
                "the module with dropout=0 or call eval()"
            )
        query = _check_input("query", query, self.embed_dim, "embed_dim")
        self._check_sources(query, key, value, None, None)
        memory = query if key is None else key
        B, n, _ = query.shape
        lengths = global_lengths(n, memory.shape[1], setting.group, query.device)
        # RoPE (self-attention only) rotates every token at its place in the whole sequence.
        layout = SequenceLayout(lengths[0], setting.world_size(), setting.layout)
        positions = layout.positions(setting.rank(), query.device)
        q = self._split_heads(self.q_proj(query), self.num_heads)  # (B, Hq, n, D)
        if self.rope is not None:
            q = self.rope.rotate(q, positions=positions)
        k, v = self.project_kv(memory, value, positions=positions if key is None else None)
        mask = self._combine_masks(key_padding_mask, attn_mask, (B, self.num_heads, *lengths))
        out = context_parallel_attention(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            causal=causal,
            group=setting.group,
            layout=setting.layout,
            method=setting.method,
            lengths=lengths,
            backend=self.backend,
        )  # (B, Hq, n, D)
        return self.out_proj(out.transpose(1, 2).reshape(B, n, self.embed_dim))

    def _approximate(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: MaskArg,
        bias: BiasArg,
        causal: CausalArg,
        need_weights: bool,
    ) -> Tensor:
        """The configured approximation on ``q (B, Hq, Nq, D)``, ``k, v (B, Hkv, Nk, D)``."""
        assert self.attention_impl is not None
        if need_weights:
            raise ValueError(
                f"need_weights=True needs exact attention; this module uses "
                f"attention={self.attention_name!r} (set_attention('exact') to get weights)"
            )
        if bias is not None:
            raise ValueError(
                f"bias needs exact attention; this module uses attention={self.attention_name!r}"
            )
        return self.attention_impl(q, k, v, mask=mask, causal=causal)  # (B, Hq, Nq, D)

    @staticmethod
    def _split_heads(x: Tensor, heads: int) -> Tensor:
        """``(B, N, heads * D) -> (B, heads, N, D)``."""
        return x.unflatten(-1, (heads, -1)).transpose(1, 2)

    def _check_sources(
        self,
        query: Tensor,
        key: Tensor | None,
        value: Tensor | None,
        kv_cache: KVCache | None,
        key_value: tuple[Tensor, Tensor] | None,
    ) -> int:
        """Check that the keys' source is unambiguous; return the position of ``query[:, 0]``."""
        if value is not None and key is None:
            raise ValueError("value was given without key; pass key too (or neither)")
        cross = key is not None or key_value is not None
        if key is not None and key_value is not None:
            raise ValueError("give key/value or key_value (from project_kv), not both")
        if kv_cache is not None and cross:
            raise ValueError(
                "kv_cache caches self-attention (key=None); for cross-attention project the "
                "memory once with project_kv(memory) and pass it as key_value="
            )
        if cross and self.rope is not None:
            raise ValueError(
                "rope rotates queries and keys by their positions in one sequence, so it serves "
                "self-attention only; call forward(query) with key=None and key_value=None"
            )
        if not cross and (self.kdim != self.embed_dim or self.vdim != self.embed_dim):
            raise ValueError(
                f"self-attention (key=None) projects keys and values from query, which needs "
                f"kdim == vdim == embed_dim; got embed_dim={self.embed_dim}, kdim={self.kdim}, "
                f"vdim={self.vdim}: pass key and value"
            )
        if key_value is not None:
            self._check_key_value(key_value, query.shape[0])
        return len(kv_cache) if kv_cache is not None else 0

    def _check_key_value(self, key_value: object, batch: int) -> None:
        if not (isinstance(key_value, tuple | list) and len(key_value) == 2):
            raise TypeError(
                f"key_value must be the (k, v) pair from project_kv; got {type(key_value).__name__}"
            )
        k, v = key_value
        expected = f"(B, Hkv, Nk, D) = ({batch}, {self.num_kv_heads}, Nk, {self.head_dim})"
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"key_value's {name} must be a torch.Tensor; got {type(t).__name__}"
                )
            if t.ndim != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (
                batch,
                self.num_kv_heads,
                self.head_dim,
            ):
                raise ValueError(
                    f"key_value's {name} must have shape {expected}; got {tuple(t.shape)}"
                )

    def _combine_masks(
        self,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | MaskFunction | None,
        target: tuple[int, int, int, int],
    ) -> MaskArg:
        """``key_padding_mask & attn_mask`` as one mask for :func:`qkv.attention`; ``target``
        is ``(B, Hq, Nq, Nk)``."""
        B, _, Nq, Nk = target
        padding: Tensor | None = None
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
                kind = getattr(key_padding_mask, "dtype", type(key_padding_mask).__name__)
                raise TypeError(
                    f"key_padding_mask must be a bool tensor (True = attend); got {kind}"
                )
            if tuple(key_padding_mask.shape) != (B, Nk):
                raise ValueError(
                    f"key_padding_mask must have shape (B, Nk) = ({B}, {Nk}); "
                    f"got {tuple(key_padding_mask.shape)}"
                )
            padding = key_padding_mask[:, None, None, :]  # (B, 1, 1, Nk)
        if attn_mask is None:
            return padding
        if isinstance(attn_mask, Tensor):
            if attn_mask.dtype != torch.bool:
                raise TypeError(
                    f"attn_mask must be a bool tensor (True = attend) or a mask function; got "
                    f"dtype {attn_mask.dtype}. Pass an additive float mask as bias= instead."
                )
            if attn_mask.ndim not in (2, 4) or not broadcasts_to(tuple(attn_mask.shape), target):
                raise ValueError(
                    f"attn_mask must have shape (Nq, Nk) = ({Nq}, {Nk}) or broadcast to "
                    f"(B, Hq, Nq, Nk) = {target}; got {tuple(attn_mask.shape)} (reshape a "
                    f"PyTorch-style (B * Hq, Nq, Nk) mask to (B, Hq, Nq, Nk))"
                )
            return attn_mask if padding is None else attn_mask & padding
        if callable(attn_mask):
            if padding is None:
                return attn_mask
            return masks.dense(padding, "key_padding_mask") & attn_mask
        raise TypeError(
            f"attn_mask must be a bool tensor, a mask function or None; "
            f"got {type(attn_mask).__name__}"
        )

    def extra_repr(self) -> str:
        parts = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}"]
        if self.num_kv_heads != self.num_heads:
            parts.append(f"num_kv_heads={self.num_kv_heads}")
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            parts.append(f"kdim={self.kdim}, vdim={self.vdim}")
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        if self.attention_name != "exact":
            parts.append(f"attention={self.attention_name!r}")
        if self.context_parallel is not None:
            parts.append(f"context_parallel={self.context_parallel.method!r}")
        return ", ".join(parts)
