r"""An encoder-decoder Transformer over :class:`qkv.nn.MultiHeadAttention`.

Vaswani et al. "Attention Is All You Need" (2017), with the pre-norm residual blocks of Xiong et
al. "On Layer Normalization in the Transformer Architecture" (2020), which train without a
warmup-sensitive post-norm stack::

    encoder layer:  x = x + Drop(SelfAttn(LN(x)))                 (source padding masked)
                    x = x + Drop(FFN(LN(x)))
    decoder layer:  y = y + Drop(CausalSelfAttn(LN(y)))           (KV-cached when decoding)
                    y = y + Drop(CrossAttn(LN(y), memory))        (memory K/V projected once)
                    y = y + Drop(FFN(LN(y)))
    both stacks end with a final LN; logits = LN(y) W_out^T

Notation used for tensor shapes: ``B`` batch, ``Ns`` source length, ``Nt`` target length,
``E`` d_model, ``H`` heads, ``Hkv`` key/value heads, ``D = E / H``, ``V`` target vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar, Literal, cast

import torch
from torch import Tensor, nn

from qkv.approx.registry import check_attention_config
from qkv.models.base import (
    EncoderOutput,
    check_choice,
    check_positive_int,
    check_probability,
    check_step_tokens,
    check_token_ids,
    config_from_dict,
    stays_in_groups,
)
from qkv.nn import KVCache, MultiHeadAttention, SinusoidalPositionalEncoding

__all__ = ["Seq2SeqTransformer", "TransformerConfig", "TransformerDecoderState"]

Positional = Literal["sinusoidal", "rope"]
TieEmbeddings = Literal["none", "decoder", "all"]


@dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of :class:`Seq2SeqTransformer`, validated on construction.

    Args:
        src_vocab_size: source vocabulary size.
        tgt_vocab_size: ``V``, target vocabulary size.
        d_model: ``E``.
        num_heads: ``H``; divides ``d_model``.
        num_kv_heads: ``Hkv`` for grouped-query attention (divides ``num_heads``); None = ``H``.
        num_encoder_layers, num_decoder_layers: stack depths.
        ffn_dim: hidden size of the feed-forward blocks; None = ``4 * d_model``.
        dropout: on embeddings, residual branches and attention weights, in ``[0, 1)``.
        positional: ``"sinusoidal"`` (added to the embeddings) or ``"rope"`` (rotary, in every
            self-attention; cross-attention has no positions to rotate).
        tie_embeddings: ``"none"``; ``"decoder"`` shares the decoder's input embedding with the
            output projection (Press & Wolf 2017); ``"all"`` also shares it with the source
            embedding, which needs one vocabulary (``src_vocab_size == tgt_vocab_size``).
        pad_id: the padding id, masked on both sides.
        attention: the encoder self-attention's function: ``"exact"`` (:func:`qkv.attention`)
            or an approximation of :mod:`qkv.approx` by name (NOT exact). The decoder keeps
            exact attention (its cached steps and cross-attention); to change any module of a
            built model, use :func:`qkv.nn.swap_attention`.
        attention_options: the approximation's keyword options, e.g. ``{"num_features": 64}``.

    Use :meth:`from_name` for the presets ``tiny``, ``small`` and ``base``.
    """

    kind: ClassVar[str] = "transformer"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # A few seconds per epoch on a laptop CPU: for tests and the dates demo.
        "tiny": {"d_model": 64, "num_heads": 4, "num_encoder_layers": 2, "num_decoder_layers": 2},
        "small": {
            "d_model": 256,
            "num_heads": 4,
            "num_encoder_layers": 3,
            "num_decoder_layers": 3,
        },
        # The paper's base model.
        "base": {
            "d_model": 512,
            "num_heads": 8,
            "num_encoder_layers": 6,
            "num_decoder_layers": 6,
        },
    }

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int | None = None
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    ffn_dim: int | None = None
    dropout: float = 0.1
    positional: Positional = "sinusoidal"
    tie_embeddings: TieEmbeddings = "none"
    pad_id: int = 0
    attention: str = "exact"
    attention_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("src_vocab_size", "tgt_vocab_size", "d_model", "num_heads"):
            check_positive_int(name, getattr(self, name))
        for name in ("num_encoder_layers", "num_decoder_layers"):
            check_positive_int(name, getattr(self, name))
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_kv_heads is not None:
            check_positive_int("num_kv_heads", self.num_kv_heads)
            if self.num_heads % self.num_kv_heads:
                raise ValueError(
                    f"num_heads ({self.num_heads}) must be divisible by "
                    f"num_kv_heads ({self.num_kv_heads})"
                )
        if self.ffn_dim is not None:
            check_positive_int("ffn_dim", self.ffn_dim)
        check_probability("dropout", self.dropout)
        check_choice("positional", self.positional, ("sinusoidal", "rope"))
        if self.positional == "rope" and self.head_dim % 2:
            raise ValueError(
                f'positional="rope" needs an even head dim d_model / num_heads; got {self.head_dim}'
            )
        check_choice("tie_embeddings", self.tie_embeddings, ("none", "decoder", "all"))
        if self.tie_embeddings == "all" and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(
                f'tie_embeddings="all" needs src_vocab_size == tgt_vocab_size; got '
                f"{self.src_vocab_size} and {self.tgt_vocab_size}"
            )
        if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, int) or self.pad_id < 0:
            raise ValueError(f"pad_id must be an int >= 0; got pad_id={self.pad_id!r}")
        check_attention_config(self.attention, self.attention_options)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def hidden_dim(self) -> int:
        """The feed-forward hidden size, ``ffn_dim`` or ``4 * d_model``."""
        return self.ffn_dim if self.ffn_dim is not None else 4 * self.d_model

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> TransformerConfig:
        """A preset (``tiny``, ``small``, ``base``) with ``overrides``; the vocabulary sizes
        must be among them, e.g. ``from_name("tiny", src_vocab_size=80, tgt_vocab_size=40)``."""
        if name not in cls.presets:
            raise ValueError(f"unknown preset name={name!r}; choose from {sorted(cls.presets)}")
        return cls(**{**cls.presets[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerConfig:
        """The inverse of :meth:`to_dict`."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus ``"kind": "transformer"``."""
        return {"kind": self.kind, **asdict(self)}

    def replace(self, **changes: Any) -> TransformerConfig:
        """A copy with ``changes`` applied (and validated)."""
        return replace(self, **changes)


# --- building blocks ------------------------------------------------------------------------------


class FeedForward(nn.Sequential):
    """``Linear(E, F) -> GELU -> Dropout -> Linear(F, E)``, position-wise."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )


class EncoderLayer(nn.Module):
    """Pre-norm self-attention and feed-forward block."""

    def __init__(self, attn: MultiHeadAttention, ffn: nn.Module, dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn, self.ffn = attn, ffn
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, source_mask: Tensor | None) -> Tensor:
        """``x (B, Ns, E)``, ``source_mask (B, Ns)`` bool (None: no padding) -> ``(B, Ns, E)``."""
        attended, _ = self.self_attn(self.norm1(x), key_padding_mask=source_mask)
        x = x + self.drop(attended)
        return x + self.drop(self.ffn(self.norm2(x)))


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention, cross-attention and feed-forward block."""

    def __init__(
        self,
        self_attn: MultiHeadAttention,
        cross_attn: MultiHeadAttention,
        ffn: nn.Module,
        dim: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.self_attn, self.cross_attn, self.ffn = self_attn, cross_attn, ffn
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        y: Tensor,
        memory_kv: tuple[Tensor, Tensor],
        source_mask: Tensor,
        *,
        target_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """One layer over ``y (B, Nt, E)`` (``Nt = 1`` per cached step).

        Args:
            memory_kv: the cross-attention ``(k, v)``, each ``(B, Hkv, Ns, D)``, from
                ``cross_attn.project_kv(memory)``.
            source_mask: bool ``(B, Ns)``, True at real source tokens.
            target_mask: bool ``(B, Nt)``, True at real target tokens (teacher forcing only).
            kv_cache: this layer's self-attention cache (incremental decoding only).
            need_weights: also return the cross-attention weights ``(B, H, Nt, Ns)``.
        """
        attended, _ = self.self_attn(
            self.norm1(y), key_padding_mask=target_mask, causal=True, kv_cache=kv_cache
        )
        y = y + self.drop(attended)
        crossed, weights = self.cross_attn(
            self.norm2(y),
            key_value=memory_kv,
            key_padding_mask=source_mask,
            need_weights=need_weights,
            average_attn_weights=False,
        )
        y = y + self.drop(crossed)
        return y + self.drop(self.ffn(self.norm3(y))), weights


# --- decoding state -------------------------------------------------------------------------------


class TransformerDecoderState:
    """Per-layer self-attention KV caches plus the per-layer cross-attention K/V of the memory.

    Attributes:
        caches: one :class:`~qkv.nn.KVCache` per decoder layer, ``(B, Hkv, max_len, D)``.
        memory_kv: per layer ``(k, v)``, each ``(B, Hkv, Ns, D)``, projected once.
        source_mask: bool ``(B, Ns)``.
        group_size: rows per source (the beam size) while every reorder stays within a
            source's rows, which then share the memory and need not move it; 1 otherwise.
    """

    def __init__(
        self,
        caches: list[KVCache],
        memory_kv: list[tuple[Tensor, Tensor]],
        source_mask: Tensor,
        *,
        group_size: int = 1,
    ) -> None:
        self.caches = caches
        self.memory_kv = memory_kv
        self.source_mask = source_mask
        self.group_size = group_size

    @property
    def batch_size(self) -> int:
        return int(self.source_mask.shape[0])

    @property
    def length(self) -> int:
        return len(self.caches[0])

    def select(self, indices: Tensor) -> None:
        """Reorder rows in place (see :class:`~qkv.models.base.DecoderState`)."""
        filled = self.length
        for cache in self.caches:
            # Only the filled prefix is meaningful; copying it back keeps the cache's buffers.
            cache.k[:, :, :filled] = cache.k[:, :, :filled].index_select(0, indices)
            cache.v[:, :, :filled] = cache.v[:, :, :filled].index_select(0, indices)
        if self.group_size > 1 and stays_in_groups(indices, self.group_size):
            return  # a beam search reorder: each source's rows share one memory
        self.group_size = 1
        self.memory_kv = [
            (k.index_select(0, indices), v.index_select(0, indices)) for k, v in self.memory_kv
        ]
        self.source_mask = self.source_mask.index_select(0, indices)


# --- the model ------------------------------------------------------------------------------------


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer implementing :class:`~qkv.models.base.Seq2SeqModel`.

    Args:
        config: a :class:`TransformerConfig`.

    Example::

        config = TransformerConfig.from_name("tiny", src_vocab_size=60, tgt_vocab_size=40)
        model = Seq2SeqTransformer(config)
        logits = model(source, target_in)          # (B, Ns), (B, Nt) -> (B, Nt, 40)
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig; got {type(config).__name__}")
        self.config = c = config
        E = c.d_model
        self.tgt_embed = nn.Embedding(c.tgt_vocab_size, E, padding_idx=c.pad_id)
        self.src_embed = (
            self.tgt_embed
            if c.tie_embeddings == "all"
            else nn.Embedding(c.src_vocab_size, E, padding_idx=c.pad_id)
        )
        self.positions = SinusoidalPositionalEncoding(E) if c.positional == "sinusoidal" else None
        self.embed_drop = nn.Dropout(c.dropout)
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(
                self._attention(self_attention=True, encoder=True), self._ffn(), E, c.dropout
            )
            for _ in range(c.num_encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(
                self._attention(self_attention=True),
                self._attention(self_attention=False),
                self._ffn(),
                E,
                c.dropout,
            )
            for _ in range(c.num_decoder_layers)
        )
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(E), nn.LayerNorm(E)
        self.output = nn.Linear(E, c.tgt_vocab_size, bias=False)
        self._init_embeddings()

    def _attention(self, *, self_attention: bool, encoder: bool = False) -> MultiHeadAttention:
        c = self.config
        return MultiHeadAttention(
            c.d_model,
            c.num_heads,
            num_kv_heads=c.num_kv_heads,
            dropout=c.dropout,
            rope=self_attention and c.positional == "rope",
            attention=c.attention if encoder else "exact",
            attention_options=c.attention_options if encoder else None,
        )

    def _ffn(self) -> nn.Module:
        return FeedForward(self.config.d_model, self.config.hidden_dim, self.config.dropout)

    def _init_embeddings(self) -> None:
        # std E^-1/2 with a sqrt(E) scale on lookup (as in the paper): embeddings of unit size
        # at the input, and logits of unit size when the output shares the table.
        std = self.config.d_model**-0.5
        for table in (self.src_embed, self.tgt_embed):
            nn.init.normal_(table.weight, std=std)
            with torch.no_grad():
                table.weight[self.config.pad_id].zero_()
        if self.config.tie_embeddings == "none":
            nn.init.normal_(self.output.weight, std=std)
        else:
            self.output.weight = self.tgt_embed.weight

    # --- the Seq2SeqModel interface ------------------------------------------------------------

    def forward(self, source: Tensor, target_in: Tensor) -> Tensor:
        """Teacher forcing: ``source (B, Ns)``, ``target_in (B, Nt)`` int64 ->
        ``logits (B, Nt, V)``."""
        return self.decode(self.encode(source), target_in)

    def encode(self, source: Tensor) -> EncoderOutput:
        """``source (B, Ns)`` int64 -> memory ``(B, Ns, E)`` and its padding mask."""
        source = check_token_ids("source", source, self.config.src_vocab_size)
        source_mask = source != self.config.pad_id  # (B, Ns)
        x = self._embed(self.src_embed, source, offset=0)  # (B, Ns, E)
        for layer in self.encoder_layers:
            x = layer(x, source_mask)
        return EncoderOutput(self.encoder_norm(x), source_mask)

    def decode(self, encoded: EncoderOutput, target_in: Tensor) -> Tensor:
        """The decoder over a whole prefix: ``target_in (B, Nt)`` -> ``logits (B, Nt, V)``."""
        y, _ = self._decode(encoded, target_in, need_weights=False)
        return self.output(y)  # (B, Nt, V)

    def start_decoding(
        self, encoded: EncoderOutput, *, beam_size: int = 1, max_len: int
    ) -> TransformerDecoderState:
        """KV caches for ``max_len`` tokens and the memory's cross-attention K/V, with each
        source repeated ``beam_size`` times (row ``b * beam_size + k``)."""
        check_positive_int("max_len", max_len)
        encoded = encoded.repeat_rows(beam_size)
        layers = self._decoder_layers()
        memory_kv = [layer.cross_attn.project_kv(encoded.memory) for layer in layers]
        # The caches take the dtype the projections produce here, which under autocast is the
        # autocast dtype rather than the parameters' (the steps must run in the same context).
        dtype = memory_kv[0][0].dtype
        caches = [
            layer.self_attn.make_kv_cache(encoded.batch_size, max_len, dtype=dtype)
            for layer in layers
        ]
        return TransformerDecoderState(caches, memory_kv, encoded.source_mask, group_size=beam_size)

    def decode_step(self, state: TransformerDecoderState, tokens: Tensor) -> Tensor:
        """``tokens (B,)`` int64 -> ``logits (B, V)``; appends to the KV caches."""
        tokens = check_step_tokens(tokens, state.batch_size)  # (B, 1)
        y = self._embed(self.tgt_embed, tokens, offset=state.length)  # (B, 1, E)
        for layer, cache, kv in zip(
            self.decoder_layers, state.caches, state.memory_kv, strict=True
        ):
            y, _ = layer(y, kv, state.source_mask, kv_cache=cache)
        return self.output(self.decoder_norm(y)).squeeze(1)  # (B, V)

    def cross_attention(
        self,
        source: Tensor,
        target_in: Tensor,
        *,
        layer: int | None = -1,
        per_head: bool = False,
    ) -> Tensor:
        """Cross-attention weights of one sentence pair (see
        :meth:`~qkv.models.base.Seq2SeqModel.cross_attention`): ``(Nt, Ns)`` by default,
        ``(H, Nt, Ns)`` with ``per_head``, a leading ``(L, ...)`` with ``layer=None``."""
        for name, ids in (("source", source), ("target_in", target_in)):
            if isinstance(ids, Tensor) and ids.ndim == 2 and ids.shape[0] != 1:
                raise ValueError(f"{name} must have shape (1, N); got {tuple(ids.shape)}")
        with torch.no_grad():
            _, weights = self._decode(self.encode(source), target_in, need_weights=True)
        stacked = torch.stack(weights)[:, 0]  # (L, H, Nt, Ns)
        if not per_head:
            stacked = stacked.mean(dim=1)  # (L, Nt, Ns)
        if layer is None:
            return stacked
        num_layers = len(self.decoder_layers)
        if (
            isinstance(layer, bool)
            or not isinstance(layer, int)
            or not -num_layers <= layer < num_layers
        ):
            raise ValueError(
                f"layer must be an int in [-{num_layers}, {num_layers}) or None; got layer={layer!r}"
            )
        return stacked[layer]

    # --- pieces ----------------------------------------------------------------------------------

    def _decoder_layers(self) -> list[DecoderLayer]:
        return [cast(DecoderLayer, layer) for layer in self.decoder_layers]

    def _embed(self, table: nn.Embedding, ids: Tensor, offset: int) -> Tensor:
        """``ids (B, N)`` -> ``(B, N, E)``: scaled lookup, positions at ``offset ..``, dropout."""
        x = table(ids) * math.sqrt(self.config.d_model)  # (B, N, E)
        if self.positions is not None:
            x = self.positions(x, offset)
        return self.embed_drop(x)

    def _decode(
        self, encoded: EncoderOutput, target_in: Tensor, *, need_weights: bool
    ) -> tuple[Tensor, list[Tensor]]:
        """Normalized decoder states ``(B, Nt, E)`` and, if asked, the per-layer
        cross-attention weights ``(B, H, Nt, Ns)``."""
        target_in = check_token_ids("target_in", target_in, self.config.tgt_vocab_size)
        if target_in.shape[0] != encoded.batch_size:
            raise ValueError(
                f"target_in has batch size {target_in.shape[0]} but the source has "
                f"{encoded.batch_size}; got target_in {tuple(target_in.shape)}"
            )
        target_mask = target_in != self.config.pad_id  # (B, Nt)
        y = self._embed(self.tgt_embed, target_in, offset=0)  # (B, Nt, E)
        weights: list[Tensor] = []
        for layer in self._decoder_layers():
            kv = layer.cross_attn.project_kv(encoded.memory)  # (B, Hkv, Ns, D) each
            y, w = layer(
                y, kv, encoded.source_mask, target_mask=target_mask, need_weights=need_weights
            )
            if w is not None:
                weights.append(w)
        return self.decoder_norm(y), weights
