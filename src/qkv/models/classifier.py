r"""Text classification with attention pooling: :class:`AttentionClassifier`.

::

    ids (B, N) --embed--> (B, N, E) --encoder--> h (B, N, Dh)
         --attention pooling: r learned queries over the tokens--> (B, r, Dh)
         --flatten, dropout, linear--> logits (B, C)

The pooling is structured self-attention (Lin et al., "A Structured Self-Attentive Sentence
Embedding", ICLR 2017), of which Yang et al.'s word attention ("Hierarchical Attention Networks
for Document Classification", NAACL 2016) is the one-query case::

    keys = tanh(h W1)                  (B, N, Da)    shared by every query
    A    = softmax(u keys^T)           (B, r, N)     u: r learned queries (r, Da); pads masked
    M    = A h                         (B, r, Dh)

It runs through :func:`qkv.attention` with a key padding mask: the ``r`` queries are the heads
(``Hq = r``) and the keys and values a single shared head (``Hkv = 1``, multi-query attention),
so ``h`` is never copied per query. ``A`` is returned for explanations: which tokens the decision
rests on. With ``r > 1``, Lin et al.'s penalty ``||A A^T - I||_F^2`` (:func:`pooling_penalty`)
keeps the queries from all reading the same tokens.

Encoders: ``"bigru"`` (a bidirectional GRU that never reads padding, :class:`PaddedBiGRU`) or
``"transformer"`` (pre-norm blocks of :class:`qkv.nn.MultiHeadAttention` with RoPE).

Context parallelism (a transformer encoder without dropout):
``model.set_context_parallel(ContextParallel(group, "zigzag"))`` on every rank of ``group``,
then every rank calls the model on the **same** whole batch: it embeds and encodes only its
shard of the tokens (every attention layer context-parallel, RoPE at global positions), and
the pooling gathers the ``(B, r, N)`` scores (small) and sums ``A h`` over the ranks, so every
rank gets the same logits and weights as one process. Every rank's loss is then the whole
batch's; DDP's average of the ranks' gradients is the one-process gradient (each rank's share
of it, times ``P``, since every rank's loss reads every rank's tokens).

Notation used for tensor shapes: ``B`` texts, ``N`` tokens (longest in the batch), ``E`` embedding
size, ``Dh`` encoder output size, ``r`` pooling queries, ``C`` classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv.approx.registry import check_attention_config
from qkv.functional.attention import attention
from qkv.nn.multihead import MultiHeadAttention
from qkv.parallel import ContextParallel, gather_sequence, shard, sum_over_ranks

__all__ = [
    "PRESETS",
    "AttentionClassifier",
    "AttentionPooling",
    "ClassifierConfig",
    "ClassifierOutput",
    "EncoderKind",
    "PaddedBiGRU",
    "pooling_penalty",
    "reverse_padded",
]

EncoderKind = Literal["bigru", "transformer"]
PAD_ID = 0  # qkv.data's padding id; repeated so models do not import the data layer


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")


@dataclass(frozen=True)
class ClassifierConfig:
    """Hyperparameters of an :class:`AttentionClassifier`.

    Attributes:
        vocab_size: token ids ``0 .. vocab_size - 1`` (``0`` is padding).
        num_classes: ``C``, at least 2.
        encoder: ``"bigru"`` or ``"transformer"``.
        embed_dim: ``E``.
        hidden_dim: GRU state size per direction (``Dh = 2 * hidden_dim``), or the Transformer's
            feed-forward size (``Dh = E``).
        num_layers: encoder layers.
        num_heads: Transformer attention heads (divides ``embed_dim``).
        pool_queries: ``r``, learned pooling queries (Lin et al.'s hops).
        pool_dim: ``Da``, size of the pooling keys.
        dropout: on embeddings, encoder outputs and the pooled vector.
        attention: the Transformer encoder's attention function: ``"exact"``
            (:func:`qkv.attention`) or an approximation of :mod:`qkv.approx` by name (NOT
            exact); the pooling stays exact.
        attention_options: the approximation's keyword options, e.g. ``{"num_features": 64}``.
        kind: ``"classifier"``, for :func:`qkv.models.build_model`-style dispatch.
    """

    vocab_size: int
    num_classes: int
    encoder: EncoderKind = "bigru"
    embed_dim: int = 128
    hidden_dim: int = 128
    num_layers: int = 1
    num_heads: int = 4
    pool_queries: int = 1
    pool_dim: int = 128
    dropout: float = 0.2
    kind: str = "classifier"
    attention: str = "exact"
    attention_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "embed_dim", "hidden_dim", "num_layers", "num_heads"):
            _positive(name, getattr(self, name))
        for name in ("pool_queries", "pool_dim"):
            _positive(name, getattr(self, name))
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got vocab_size={self.vocab_size}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise ValueError(f"num_classes must be an int >= 2, got {self.num_classes!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got num_classes={self.num_classes}")
        if self.encoder not in ("bigru", "transformer"):
            raise ValueError(f"encoder must be 'bigru' or 'transformer', got {self.encoder!r}")
        if self.encoder == "transformer" and self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={self.dropout!r}")
        if self.kind != "classifier":
            raise ValueError(f"kind must be 'classifier', got {self.kind!r}")
        check_attention_config(self.attention, self.attention_options)
        if self.attention != "exact" and self.encoder != "transformer":
            raise ValueError(
                f"attention={self.attention!r} needs encoder='transformer'; got "
                f"encoder={self.encoder!r}"
            )

    @property
    def output_dim(self) -> int:
        """``Dh``, the size of each encoder state (and of each pooled vector)."""
        return 2 * self.hidden_dim if self.encoder == "bigru" else self.embed_dim

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable fields (``kind`` included)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ClassifierConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: an unknown key (a typo would otherwise be silently ignored).
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ClassifierConfig keys {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_name(
        cls, name: str, *, vocab_size: int, num_classes: int, **overrides: Any
    ) -> ClassifierConfig:
        """A named preset (:data:`PRESETS`) with the data-dependent sizes and any overrides.

        Raises:
            ValueError: an unknown preset name.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown classifier preset {name!r}; presets: {', '.join(PRESETS)}")
        return replace(PRESETS[name], vocab_size=vocab_size, num_classes=num_classes, **overrides)


#: Named presets; ``vocab_size`` and ``num_classes`` are placeholders that
#: :meth:`ClassifierConfig.from_name` replaces.
PRESETS: dict[str, ClassifierConfig] = {
    "tiny": ClassifierConfig(2, 2, "bigru", embed_dim=32, hidden_dim=32, pool_dim=32, dropout=0.0),
    "bigru-fast": ClassifierConfig(2, 2, "bigru", embed_dim=64, hidden_dim=64, pool_dim=64),
    "bigru-small": ClassifierConfig(2, 2, "bigru", embed_dim=128, hidden_dim=128, pool_dim=128),
    "bigru-base": ClassifierConfig(
        2, 2, "bigru", embed_dim=256, hidden_dim=256, pool_queries=4, pool_dim=256
    ),
    "transformer-small": ClassifierConfig(
        2, 2, "transformer", embed_dim=128, hidden_dim=256, num_layers=2, num_heads=4
    ),
}


@dataclass(frozen=True)
class ClassifierOutput:
    """What :meth:`AttentionClassifier.forward` returns.

    Attributes:
        logits: ``(B, C)`` unnormalised class scores.
        weights: ``(B, r, N)`` pooling weights, each row summing to 1 over the real tokens
            (0 at padding): the tokens each pooling query read.
    """

    logits: Tensor
    weights: Tensor


class AttentionPooling(nn.Module):
    """``r`` learned queries attending over the token states (Lin et al. 2017).

    Args:
        input_dim: ``Dh``, size of each token state.
        key_dim: ``Da``, size of the tanh keys.
        num_queries: ``r``.
    """

    def __init__(self, input_dim: int, key_dim: int, num_queries: int) -> None:
        super().__init__()
        self.key_proj = nn.Linear(input_dim, key_dim)
        self.queries = nn.Parameter(torch.randn(num_queries, key_dim) / key_dim**0.5)

    def forward(self, states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Pool ``states (B, N, Dh)`` under ``mask (B, N)`` bool (True = real token).

        Returns:
            ``pooled (B, r, Dh)`` and ``weights (B, r, N)``.
        """
        B = states.shape[0]
        keys = torch.tanh(self.key_proj(states)).unsqueeze(1)  # (B, 1, N, Da)
        values = states.unsqueeze(1)  # (B, 1, N, Dh)
        queries = self.queries[None, :, None, :].expand(B, -1, -1, -1)  # (B, r, 1, Da)
        # Scale 1: the queries are learned, so no 1/sqrt(Da) is needed to keep scores tame.
        pooled, weights = attention(
            queries, keys, values, mask=mask[:, None, None, :], scale=1.0, return_weights=True
        )  # (B, r, 1, Dh), (B, r, 1, N)
        return pooled.squeeze(2), weights.squeeze(2)

    def sharded(
        self, states: Tensor, mask: Tensor, setting: ContextParallel
    ) -> tuple[Tensor, Tensor]:
        """:meth:`forward` on this rank's shard ``states (B, n, Dh)`` of a sequence whose whole
        ``mask (B, N)`` every rank holds: the same ``pooled (B, r, Dh)`` and ``weights (B, r, N)``
        on every rank (scores gathered, ``A h`` summed over the ranks)."""
        world, rank, layout = setting.world_size(), setting.rank(), setting.layout
        keys = torch.tanh(self.key_proj(states))  # (B, n, Da)
        # (the matmul's gradient for the queries keeps their layout, as DDP's buckets expect)
        scores = torch.matmul(self.queries, keys.transpose(1, 2))  # (B, r, n)
        whole = gather_sequence(scores.float(), dim=2, layout=layout, group=setting.group)
        real = mask[:, None, :]  # (B, 1, N)
        lowest = torch.finfo(whole.dtype).min  # a text with no token pools zeros, not NaN
        weights = torch.softmax(whole.masked_fill(~real, lowest), dim=-1) * real  # (B, r, N)
        mine = shard(weights, world, rank, dim=2, layout=layout).to(states.dtype)  # (B, r, n)
        return sum_over_ranks(mine @ states, setting.group), weights  # (B, r, Dh), (B, r, N)


def pooling_penalty(weights: Tensor) -> Tensor:
    """Lin et al.'s redundancy penalty ``||A A^T - I||_F^2``, averaged over the batch.

    Args:
        weights: ``(B, r, N)`` pooling weights.

    Returns:
        A scalar; 0 when the ``r`` queries attend to disjoint single tokens.
    """
    gram = weights @ weights.transpose(1, 2)  # (B, r, r)
    eye = torch.eye(weights.shape[1], device=weights.device, dtype=weights.dtype)
    return ((gram - eye) ** 2).sum(dim=(1, 2)).mean()


def reverse_padded(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse the first ``lengths[b]`` positions of each row of ``x (B, N, D)``; padding stays
    at the end. Its own inverse."""
    positions = torch.arange(x.shape[1], device=x.device)[None, :]  # (1, N)
    last = lengths[:, None] - 1  # (B, 1)
    index = torch.where(positions <= last, last - positions, positions)  # (B, N)
    return x.gather(1, index.unsqueeze(-1).expand_as(x))


class PaddedBiGRU(nn.Module):
    """A bidirectional GRU over right-padded batches, without packing.

    The forward GRU reads each row left to right (padding comes after every real token, so it
    cannot reach a real token's state); the backward GRU reads each row with its real tokens
    reversed in place (:func:`reverse_padded`), so it too starts at a real token. On a CPU this
    is about three times faster than ``pack_padded_sequence``, whose backward pass slices the
    batch at every time step.

    Args:
        input_dim: size of each input vector.
        hidden_dim: ``H`` per direction.
    """

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.forward_gru = nn.GRU(input_dim, hidden_dim, batch_first=True)
        self.backward_gru = nn.GRU(input_dim, hidden_dim, batch_first=True)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``x (B, N, D)``, ``mask (B, N)`` (True = real token, a prefix of each row) ->
        states ``(B, N, 2H)`` (zeros at padding) and the final states ``(B, 2H)`` (the forward
        GRU after the last real token, the backward GRU after the first)."""
        lengths = mask.sum(dim=1).clamp(min=1)  # (B,); an empty row reads one pad token
        ahead, _ = self.forward_gru(x)  # (B, N, H)
        behind_reversed, _ = self.backward_gru(reverse_padded(x, lengths))  # (B, N, H)
        behind = reverse_padded(behind_reversed, lengths)  # (B, N, H)
        last = (lengths - 1)[:, None, None].expand(-1, 1, ahead.shape[-1])  # (B, 1, H)
        final = torch.cat([ahead.gather(1, last), behind_reversed.gather(1, last)], -1)
        states = torch.cat([ahead, behind], dim=-1) * mask.unsqueeze(-1)  # (B, N, 2H)
        return states, final.squeeze(1)  # (B, N, 2H), (B, 2H)


class _BiGRUEncoder(nn.Module):
    def __init__(self, embed_dim: int, hidden_dim: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        dims = [embed_dim] + [2 * hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(PaddedBiGRU(d, hidden_dim) for d in dims)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x (B, N, E)``, ``mask (B, N)`` -> ``(B, N, 2 * hidden)``, zeros at padding."""
        for i, layer in enumerate(self.layers):
            x, _ = layer(self.dropout(x) if i else x, mask)
        return x  # (B, N, 2 * hidden)


class _TransformerBlock(nn.Module):
    """Pre-norm block: ``x + MHA(LN(x))``, then ``x + FFN(LN(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        attention: str = "exact",
        attention_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(
            dim,
            num_heads,
            dropout=dropout,
            rope=True,
            attention=attention,
            attention_options=attention_options,
        )
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        attended, _ = self.attn(self.norm1(x), key_padding_mask=mask)  # (B, N, E)
        x = x + self.dropout(attended)
        return x + self.dropout(self.ffn(self.norm2(x)))


class _TransformerEncoder(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        num_layers: int,
        dropout: float,
        attention: str = "exact",
        attention_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            _TransformerBlock(dim, num_heads, ffn_dim, dropout, attention, attention_options)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)  # (B, N, E)


class AttentionClassifier(nn.Module):
    """Embeddings, an encoder, attention pooling and a linear head (see the module docstring).

    Args:
        config: a :class:`ClassifierConfig`.

    Raises:
        TypeError: ``config`` is not a :class:`ClassifierConfig`.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        if not isinstance(config, ClassifierConfig):
            raise TypeError(f"config must be a ClassifierConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=PAD_ID)
        self.encoder: nn.Module
        if c.encoder == "bigru":
            self.encoder = _BiGRUEncoder(c.embed_dim, c.hidden_dim, c.num_layers, c.dropout)
        else:
            self.encoder = _TransformerEncoder(
                c.embed_dim,
                c.num_heads,
                c.hidden_dim,
                c.num_layers,
                c.dropout,
                c.attention,
                c.attention_options,
            )
        self.pool = AttentionPooling(c.output_dim, c.pool_dim, c.pool_queries)
        self.dropout = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.pool_queries * c.output_dim, c.num_classes)
        self.context_parallel: ContextParallel | None = None

    def set_context_parallel(self, setting: ContextParallel | None) -> None:
        """Run on a sequence sharded across the ranks of ``setting.group`` (see the module
        docstring; ``None``: one process again). Every rank then passes the same whole batch.

        Raises:
            ValueError: the encoder is not an exact transformer without dropout.
        """
        if setting is not None:
            if not isinstance(setting, ContextParallel):
                raise TypeError(
                    f"setting must be a qkv.parallel.ContextParallel or None; got {setting!r}"
                )
            c = self.config
            if c.encoder != "transformer" or c.attention != "exact":
                raise ValueError(
                    "context parallelism needs the exact transformer encoder; this classifier "
                    f"has encoder={c.encoder!r}, attention={c.attention!r}"
                )
            if c.dropout > 0:
                raise ValueError(
                    f"context parallelism needs dropout=0 (every rank must compute what one "
                    f"process would); this classifier has dropout={c.dropout}"
                )
        for block in getattr(self.encoder, "blocks", []):
            block.attn.set_context_parallel(setting)
        self.context_parallel = setting

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> ClassifierOutput:
        """Classify a batch of token ids.

        Args:
            ids: ``(B, N)`` int64, right-padded with 0.
            mask: bool ``(B, N)``, True at real tokens; by default ``ids != 0``.

        Returns:
            A :class:`ClassifierOutput`: ``logits (B, C)``, ``weights (B, r, N)``.

        Raises:
            ValueError: ``ids`` is not 2-d, or ``mask`` has another shape.
            TypeError: ``ids`` is not an integer tensor or ``mask`` not bool.
        """
        mask = self._check_inputs(ids, mask)
        if self.context_parallel is not None:
            return self._forward_sharded(ids, mask, self.context_parallel)
        x = self.dropout(self.embed(ids))  # (B, N, E)
        states = self.dropout(self.encoder(x, mask))  # (B, N, Dh)
        pooled, weights = self.pool(states, mask)  # (B, r, Dh), (B, r, N)
        logits = self.head(self.dropout(pooled.flatten(1)))  # (B, C)
        return ClassifierOutput(logits, weights)

    def _forward_sharded(
        self, ids: Tensor, mask: Tensor, setting: ContextParallel
    ) -> ClassifierOutput:
        """:meth:`forward` under context parallelism (dropout is 0): this rank's tokens only,
        every attention layer reading the whole padding mask."""
        world, rank, layout = setting.world_size(), setting.rank(), setting.layout
        x = self.embed(shard(ids, world, rank, dim=1, layout=layout))  # (B, n, E)
        states = self.encoder(x, mask)  # (B, n, Dh)
        pooled, weights = self.pool.sharded(states, mask, setting)
        return ClassifierOutput(self.head(pooled.flatten(1)), weights)  # (B, C), (B, r, N)

    def predict_proba(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(B, C)`` class probabilities (call in eval mode)."""
        return F.softmax(self.forward(ids, mask).logits.float(), dim=-1)

    @staticmethod
    def _check_inputs(ids: Tensor, mask: Tensor | None) -> Tensor:
        if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids must be an int64 tensor, got {getattr(ids, 'dtype', type(ids))}")
        if ids.dim() != 2:
            raise ValueError(f"ids must be (B, N), got shape {tuple(ids.shape)}")
        if mask is None:
            return ids != PAD_ID
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool, got {mask.dtype}")
        if mask.shape != ids.shape:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} must equal ids shape {tuple(ids.shape)}"
            )
        return mask
