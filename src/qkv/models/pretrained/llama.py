r"""A Llama-family decoder built from qkv's own modules: :class:`LlamaDecoder`.

::

    ids (B, N) --token embedding--> x (B, N, E)
    L times (pre-RMSNorm; Touvron et al. 2023, "LLaMA"):
        x = x + attention(RMSNorm(x))        qkv.nn.MultiHeadAttention: GQA, RoPE, causal
        x = x + W_down(silu(W_gate h) * W_up h),  h = RMSNorm(x)     (Shazeer 2020, SwiGLU)
    --> RMSNorm --> logits (B, N, V) = x W_emb^T      (tied embedding when there is no output head)

Every attention call goes through :func:`qkv.attention` on the model's ``backend``; a decoding
step runs against one :class:`~qkv.nn.kv_cache.KVCache` per layer (:meth:`LlamaDecoder.make_caches`).

Padding: a batch of prompts is *left*-padded (the newest token of every row is then the last
column). Padded keys are masked out; a row's real tokens sit at positions ``pad .. N - 1``
rather than ``0 .. N - pad - 1``, which RoPE makes harmless: a score depends on the two
positions only through their difference, so the real tokens' attention is that of the unpadded
prompt (up to rounding of the rotation angles).

Notation: ``B`` rows, ``N`` tokens, ``L`` layers (or tokens cached, by context), ``E`` hidden
size, ``Hq`` query heads, ``Hkv`` key/value heads, ``D`` head dim, ``F`` MLP size, ``V``
vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv.functional.weights import attention_weights
from qkv.nn.kv_cache import KVCache
from qkv.nn.multihead import MultiHeadAttention
from qkv.nn.positional import RotaryEmbedding

__all__ = [
    "GatedMLP",
    "LlamaConfig",
    "LlamaDecoder",
    "LlamaLayer",
    "key_mask",
    "unpermute_rope_rows",
]


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {name}={value!r}")


@dataclass(frozen=True)
class LlamaConfig:
    """The sizes and constants of a Llama-architecture decoder.

    Attributes:
        vocab_size: ``V``.
        hidden_size: ``E``.
        num_layers: ``L``.
        num_heads: ``Hq`` (divides ``E``).
        num_kv_heads: ``Hkv`` (divides ``Hq``).
        intermediate_size: ``F``.
        rope_base: RoPE's ``base`` (``theta_i = base^(-2i / D)``).
        rms_norm_eps: epsilon of every RMSNorm.
        max_positions: the context length the model was trained for.
        tie_embeddings: the output head is the token embedding (no ``lm_head`` weights).
        bos_id, eos_id, pad_id: the tokenizer's special ids (``eos`` ends a turn in chat models).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rope_base: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_positions: int = 2048
    tie_embeddings: bool = True
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 2

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "max_positions",
        ):
            _positive(name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"the head dim hidden_size / num_heads ({self.head_dim}) must be even")
        if not self.rope_base > 0 or not self.rms_norm_eps > 0:
            raise ValueError(
                f"rope_base and rms_norm_eps must be > 0; got rope_base={self.rope_base!r}, "
                f"rms_norm_eps={self.rms_norm_eps!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], *, has_output: bool = False) -> LlamaConfig:
        """From a GGUF file's metadata (``llama.*`` keys and the tokenizer's ids);
        ``has_output``: the file holds an ``output.weight`` head (else it is tied).

        Raises:
            ValueError: another architecture, a missing key, or RoPE scaling (not implemented).
        """
        arch = metadata.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"general.architecture is {arch!r}; this loader builds 'llama'")
        if metadata.get("llama.rope.scaling.type", "none") not in ("none", "linear") or (
            metadata.get("llama.rope.scaling.factor", 1.0) != 1.0
        ):
            raise ValueError("RoPE scaling (llama.rope.scaling.*) is not implemented")

        def need(key: str) -> Any:
            if key not in metadata:
                raise ValueError(f"missing metadata key {key!r}")
            return metadata[key]

        tokens = metadata.get("tokenizer.ggml.tokens")
        vocab = metadata.get("llama.vocab_size", len(tokens) if tokens else None)
        heads = int(need("llama.attention.head_count"))
        eos = int(metadata.get("tokenizer.ggml.eos_token_id", 2))
        return cls(
            vocab_size=int(vocab) if vocab is not None else need("llama.vocab_size"),
            hidden_size=int(need("llama.embedding_length")),
            num_layers=int(need("llama.block_count")),
            num_heads=heads,
            num_kv_heads=int(metadata.get("llama.attention.head_count_kv", heads)),
            intermediate_size=int(need("llama.feed_forward_length")),
            rope_base=float(metadata.get("llama.rope.freq_base", 10000.0)),
            rms_norm_eps=float(need("llama.attention.layer_norm_rms_epsilon")),
            max_positions=int(metadata.get("llama.context_length", 2048)),
            tie_embeddings=not has_output,
            bos_id=int(metadata.get("tokenizer.ggml.bos_token_id", 1)),
            eos_id=eos,
            pad_id=int(metadata.get("tokenizer.ggml.padding_token_id", eos)),
        )

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> LlamaConfig:
        """From a Hugging Face ``config.json`` of ``"model_type": "llama"``.

        Raises:
            ValueError: another model type, RoPE scaling, or biases (not implemented).
        """
        if raw.get("model_type") != "llama":
            raise ValueError(f"model_type is {raw.get('model_type')!r}; this loader builds 'llama'")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"RoPE scaling {rope} is not implemented")
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise ValueError("attention_bias / mlp_bias are not implemented")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {raw.get('hidden_act')!r} (only 'silu')")
        heads = int(raw["num_attention_heads"])
        if raw.get("head_dim", raw["hidden_size"] // heads) != raw["hidden_size"] // heads:
            raise ValueError("a head_dim other than hidden_size / num_attention_heads")
        eos = raw.get("eos_token_id", 2)
        eos = eos[0] if isinstance(eos, list) else eos
        pad = raw.get("pad_token_id")
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            intermediate_size=int(raw["intermediate_size"]),
            rope_base=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_positions=int(raw.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_id=int(raw.get("bos_token_id", 1)),
            eos_id=int(eos),
            pad_id=int(eos if pad is None else pad),
        )


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``, the SwiGLU feed-forward of Llama (no biases).

    Args:
        dim: ``E``.
        hidden: ``F``.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, E) -> (B, N, E)``."""
        return self.down(F.silu(self.gate(x)) * self.up(x))


def key_mask(mask: Tensor | None) -> Tensor | None:
    """The key mask ``(B, 1, 1, L + n)`` every layer of one forward passes to attention, from
    the model's ``mask (B, L + n)``; None where every token is real.

    One object for all the layers of a forward, and none at all without padding
    (:func:`qkv.decode.generate` passes an all-True mask): ``auto`` remembers its choice per
    call signature, the mask object's identity included, so the layers after the first reuse
    its choice instead of pricing the call again (0.3-0.6 ms each, more than the attention of
    a decoding step itself at short contexts), and a call without a mask stays plain for the
    backends."""
    if mask is None or bool(mask.all()):
        return None
    return mask[:, None, None, :]  # (B, 1, 1, L + n)


class LlamaLayer(nn.Module):
    """One pre-norm decoder layer: RMSNorm, causal GQA attention with RoPE, residual; RMSNorm,
    gated MLP, residual.

    Args:
        dim: ``E``.
        num_heads: ``Hq``.
        num_kv_heads: ``Hkv``.
        ffn_dim: ``F``.
        rope: the :class:`~qkv.nn.positional.RotaryEmbedding` (shared by all layers).
        eps: RMSNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        ffn_dim: int,
        *,
        rope: RotaryEmbedding,
        eps: float,
    ) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim, eps=eps)
        self.attention = MultiHeadAttention(
            dim, num_heads, num_kv_heads=num_kv_heads, bias=False, rope=rope
        )
        self.mlp_norm = nn.RMSNorm(dim, eps=eps)
        self.mlp = GatedMLP(dim, ffn_dim)

    def forward(self, x: Tensor, keys: Tensor | None, cache: KVCache | None = None) -> Tensor:
        """``x (B, n, E)``; ``keys`` bool ``(B, 1, 1, L + n)`` True at real tokens (None: all
        real; :func:`key_mask` makes it); ``cache`` holds the ``L`` earlier tokens and receives
        these ``n``."""
        attended, _ = self.attention(
            self.attention_norm(x), attn_mask=keys, causal=True, kv_cache=cache
        )
        x = x + attended  # (B, n, E)
        return x + self.mlp(self.mlp_norm(x))

    def attention_probabilities(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """This layer's causal attention probabilities ``(B, Hq, N, N)`` for its input
        ``x (B, N, E)``, from :func:`qkv.attention_weights` (the forward never forms them)."""
        attn = self.attention
        h = self.attention_norm(x)
        q = attn.q_proj(h).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)  # (B, Hq, N, D)
        if attn.rope is not None:  # always, as built here; rotated as the forward does
            q = attn.rope.rotate(q)
        k, v = attn.project_kv(h)  # (B, Hkv, N, D), rotated
        key_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N)
        return attention_weights(q, k, v, mask=key_mask, causal=True)


class LlamaDecoder(nn.Module):
    """A Llama-architecture causal language model over :class:`qkv.nn.MultiHeadAttention`.

    Args:
        config: the :class:`LlamaConfig`.
        backend: the :func:`qkv.attention` backend of every layer (``"auto"``).

    Attributes:
        embed: ``Embedding(V, E)``.
        layers: the ``L`` :class:`LlamaLayer`.
        norm: the final ``RMSNorm(E)``.
        lm_head: ``Linear(E, V)``, sharing ``embed.weight`` when ``config.tie_embeddings``.
        rope: the ``RotaryEmbedding`` all layers share.
    """

    def __init__(self, config: LlamaConfig, *, backend: str = "auto") -> None:
        super().__init__()
        c = config
        self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.rope = RotaryEmbedding(c.head_dim, base=c.rope_base, max_positions=c.max_positions)
        self.layers = nn.ModuleList(
            LlamaLayer(
                c.hidden_size,
                c.num_heads,
                c.num_kv_heads,
                c.intermediate_size,
                rope=self.rope,
                eps=c.rms_norm_eps,
            )
            for _ in range(c.num_layers)
        )
        self.norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.backend = backend

    @property
    def backend(self) -> str:
        """The :func:`qkv.attention` backend every layer calls; assign to switch all of them."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"backend must be a str; got {type(name).__name__}")
        self._backend = name
        for layer in self._layers():
            layer.attention.backend = name

    def set_attention(self, attention: str, **options: Any) -> None:
        """Swap every layer's attention function (see
        :meth:`qkv.nn.MultiHeadAttention.set_attention`): ``"exact"`` or an approximation of
        :mod:`qkv.approx`, NOT exact, used without retraining."""
        for layer in self._layers():
            layer.attention.set_attention(attention, **options)

    def make_caches(
        self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None
    ) -> list[KVCache]:
        """One empty :class:`KVCache` per layer, ``(batch_size, Hkv, max_len, D)`` each."""
        if max_len > self.config.max_positions:
            raise ValueError(
                f"max_len ({max_len}) exceeds the model's context of "
                f"{self.config.max_positions} positions"
            )
        return [
            layer.attention.make_kv_cache(batch_size, max_len, dtype=dtype)
            for layer in self._layers()
        ]

    def forward(
        self,
        ids: Tensor,
        mask: Tensor | None = None,
        caches: Sequence[KVCache] | None = None,
    ) -> Tensor:
        """Next-token logits at every input position.

        Args:
            ids: ``(B, n)`` int64 token ids, left-padded when rows differ in length.
            mask: bool ``(B, L + n)``, True at real tokens, covering the ``L`` cached tokens
                and these ``n``; None: all real.
            caches: one :class:`KVCache` per layer (:meth:`make_caches`) holding ``L`` tokens,
                or None (no cache, ``L = 0``). These tokens are appended to them.

        Returns:
            ``(B, n, V)`` float logits. A padded position's logits are meaningless.
        """
        self._check(ids, mask, caches)
        keys = key_mask(mask)  # (B, 1, 1, L + n) or None: the same object for every layer
        x = self.embed(ids)  # (B, n, E)
        for i, layer in enumerate(self._layers()):
            x = layer(x, keys, None if caches is None else caches[i])  # (B, n, E)
        return self.lm_head(self.norm(x))  # (B, n, V)

    @torch.no_grad()
    def attention_maps(self, ids: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        """Every layer's causal attention probabilities, for pictures and head statistics:
        ``L`` tensors ``(B, Hq, N, N)``. The forward runs on the chosen backend; each layer's
        probabilities are recomputed from its input with :func:`qkv.attention_weights`."""
        self._check(ids, mask, None)
        keys = key_mask(mask)
        x = self.embed(ids)
        maps = []
        for layer in self._layers():
            maps.append(layer.attention_probabilities(x, mask))
            x = layer(x, keys)
        return maps

    def _layers(self) -> list[LlamaLayer]:
        return [cast(LlamaLayer, layer) for layer in self.layers]

    def _check(self, ids: Tensor, mask: Tensor | None, caches: Sequence[KVCache] | None) -> None:
        if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.dtype != torch.long:
            shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"ids must be an int64 tensor of shape (B, n); got {shape}")
        cached = 0
        if caches is not None:
            if len(caches) != self.config.num_layers:
                raise ValueError(
                    f"caches must hold one KVCache per layer ({self.config.num_layers}); "
                    f"got {len(caches)}"
                )
            cached = len(caches[0])
        if cached + ids.shape[1] > self.config.max_positions:
            raise ValueError(
                f"{cached} cached + {ids.shape[1]} new tokens exceed the model's context of "
                f"{self.config.max_positions} positions"
            )
        if mask is not None:
            expected = (ids.shape[0], cached + ids.shape[1])
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError("mask must be a bool tensor, True at real tokens")
            if tuple(mask.shape) != expected:
                raise ValueError(
                    f"mask must have shape (B, L + n) = {expected} ({cached} cached tokens); "
                    f"got {tuple(mask.shape)}"
                )


def unpermute_rope_rows(weight: Tensor, num_heads: int) -> Tensor:
    """Undo the row order llama.cpp's converter gives ``W_q`` and ``W_k``.

    Hugging Face Llama rotates feature ``i`` with ``i + D/2`` (rotate-half); llama.cpp rotates
    neighbours ``(2i, 2i + 1)``, so its converter interleaves each head's two halves of rows:
    ``w.reshape(H, 2, D/2, E).swapaxes(1, 2)``. This is the inverse, giving the rotate-half
    layout that :mod:`qkv.functional.rotary` uses.

    Args:
        weight: ``(H * D, E)`` as stored in the GGUF file.
        num_heads: ``H`` (``Hq`` for ``W_q``, ``Hkv`` for ``W_k``).

    Returns:
        ``(H * D, E)``.
    """
    rows, cols = weight.shape
    if rows % (2 * num_heads):
        raise ValueError(f"weight rows ({rows}) must be a multiple of 2 * num_heads ({num_heads})")
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)
