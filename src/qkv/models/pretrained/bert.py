r"""A BERT-family encoder built from qkv's own modules: :class:`BertEncoder`.

::

    ids (B, N) --word + position + segment embeddings, LayerNorm--> x (B, N, E)
    L times (post-LayerNorm, Devlin et al. 2019, "BERT"):
        x = LayerNorm(x + attention(x))              qkv.nn.MultiHeadAttention -> qkv.attention
        x = LayerNorm(x + W2 act(W1 x))
    --> hidden states (B, N, E)

Every attention call goes through :func:`qkv.attention`, so every backend, ``qkv.explain`` and the
weights on demand (:func:`qkv.attention_weights`) apply to a real pretrained model.
:meth:`BertEncoder.attention_maps` recomputes each layer's probabilities with
:func:`qkv.attention_weights` while the forward itself stays on the efficient path.

The weights come from a Hugging Face-layout folder (``config.json`` + ``model.safetensors``) with
the standard BERT tensor names (:func:`hf_tensor_names`); see :mod:`qkv.models.pretrained`.

Notation: ``B`` texts, ``N`` tokens of the longest, ``E`` hidden size, ``H`` heads, ``L`` layers,
``F`` feed-forward size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv.functional.weights import attention_weights
from qkv.nn.multihead import MultiHeadAttention

__all__ = ["ACTIVATIONS", "BertConfig", "BertEncoder", "BertLayer", "hf_tensor_names"]


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


#: ``hidden_act`` values of HF configs and the functions they name (``gelu`` is the exact erf
#: form; ``gelu_new`` / ``gelu_pytorch_tanh`` the tanh approximation).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
}


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {name}={value!r}")


@dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` that define the computation.

    Attributes:
        vocab_size: token ids ``0 .. vocab_size - 1``.
        hidden_size: ``E``.
        num_hidden_layers: ``L``.
        num_attention_heads: ``H`` (divides ``E``).
        intermediate_size: ``F``.
        hidden_act: a key of :data:`ACTIVATIONS`.
        max_position_embeddings: longest input, in tokens.
        type_vocab_size: segment ids (token types).
        layer_norm_eps: epsilon of every LayerNorm.
        hidden_dropout_prob: dropout on embeddings and sub-layer outputs (training only).
        attention_probs_dropout_prob: dropout on the attention weights (training only).
        pad_token_id: the padding id of the tokenizer.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            _positive(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act must be one of {sorted(ACTIVATIONS)}; got hidden_act={self.hidden_act!r}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {name}={getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BertConfig:
        """Only the known fields are read (an HF config carries many more); missing ones take
        BERT-base's defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class BertLayer(nn.Module):
    """One post-LayerNorm encoder layer: attention, add & norm, feed-forward, add & norm.

    Args:
        dim: ``E``.
        num_heads: ``H``.
        ffn_dim: ``F``.
        activation: a key of :data:`ACTIVATIONS`.
        eps: LayerNorm epsilon.
        dropout: on the sub-layer outputs (training only).
        attention_dropout: on the attention weights (training only).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        *,
        activation: str,
        eps: float,
        dropout: float,
        attention_dropout: float,
    ) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(dim, num_heads, dropout=attention_dropout)
        self.attention_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn_in = nn.Linear(dim, ffn_dim)
        self.ffn_out = nn.Linear(ffn_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.activation: Callable[[Tensor], Tensor] = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``x (B, N, E)``, ``mask`` bool ``(B, N)`` True at real tokens -> ``(B, N, E)``."""
        attended, _ = self.attention(x, key_padding_mask=mask)  # (B, N, E)
        x = self.attention_norm(x + self.dropout(attended))
        hidden = self.ffn_out(self.activation(self.ffn_in(x)))  # (B, N, E)
        return self.ffn_norm(x + self.dropout(hidden))

    def attention_probabilities(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """This layer's attention probabilities ``(B, H, N, N)`` for the input ``x (B, N, E)``,
        from :func:`qkv.attention_weights` (the forward never forms them)."""
        attn = self.attention
        q = attn.q_proj(x).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2)  # (B, H, N, D)
        k, v = attn.project_kv(x)  # (B, H, N, D)
        key_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N)
        return attention_weights(q, k, v, mask=key_mask)


class BertEncoder(nn.Module):
    """A BERT encoder over :class:`qkv.nn.MultiHeadAttention`.

    Args:
        config: the :class:`BertConfig`.
        backend: the :func:`qkv.attention` backend of every layer (``"auto"``).

    Attributes:
        word_embeddings: ``Embedding(vocab_size, E)``.
        position_embeddings: ``Embedding(max_position_embeddings, E)``.
        token_type_embeddings: ``Embedding(type_vocab_size, E)``.
        embedding_norm: ``LayerNorm(E)``.
        layers: the ``L`` :class:`BertLayer`.
    """

    def __init__(self, config: BertConfig, *, backend: str = "auto") -> None:
        super().__init__()
        c = config
        self.config = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embedding_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.layers = nn.ModuleList(
            BertLayer(
                c.hidden_size,
                c.num_attention_heads,
                c.intermediate_size,
                activation=c.hidden_act,
                eps=c.layer_norm_eps,
                dropout=c.hidden_dropout_prob,
                attention_dropout=c.attention_probs_dropout_prob,
            )
            for _ in range(c.num_hidden_layers)
        )
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

    def embed(self, ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Word + position + segment embeddings, normalised: ``(B, N)`` -> ``(B, N, E)``."""
        self._check_ids(ids, token_type_ids)
        positions = torch.arange(ids.shape[1], device=ids.device)  # (N,)
        types = torch.zeros_like(ids) if token_type_ids is None else token_type_ids
        x = self.word_embeddings(ids) + self.position_embeddings(positions)  # (B, N, E)
        x = x + self.token_type_embeddings(types)
        return self.dropout(self.embedding_norm(x))

    def forward(
        self, ids: Tensor, mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """The last layer's hidden states.

        Args:
            ids: ``(B, N)`` int64 token ids.
            mask: bool ``(B, N)``, True at real tokens (HF's ``attention_mask != 0``); None: all
                real. Padded positions get outputs too (they attend to the real tokens), as in
                the reference implementation.
            token_type_ids: ``(B, N)`` segment ids; None: all 0.

        Returns:
            ``(B, N, E)`` hidden states.
        """
        mask = self._check_mask(ids, mask)
        x = self.embed(ids, token_type_ids)
        for layer in self._layers():
            x = layer(x, mask)  # (B, N, E)
        return x

    @torch.no_grad()
    def attention_maps(
        self, ids: Tensor, mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> list[Tensor]:
        """Every layer's attention probabilities, for pictures: ``L`` tensors ``(B, H, N, N)``.

        The forward runs as usual (on the chosen backend); each layer's probabilities are
        recomputed from its input with :func:`qkv.attention_weights`, so no backend has to form
        them. Padded keys get weight 0. Call in eval mode (dropout is not applied to them).
        """
        mask = self._check_mask(ids, mask)
        x = self.embed(ids, token_type_ids)
        maps = []
        for layer in self._layers():
            maps.append(layer.attention_probabilities(x, mask))
            x = layer(x, mask)
        return maps

    def _layers(self) -> list[BertLayer]:
        return [cast(BertLayer, layer) for layer in self.layers]

    # --- checks -------------------------------------------------------------------------------

    def _check_ids(self, ids: Tensor, token_type_ids: Tensor | None) -> None:
        if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.dtype != torch.long:
            shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"ids must be an int64 tensor of shape (B, N); got {shape}")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"ids has {ids.shape[1]} tokens but the model has "
                f"{self.config.max_position_embeddings} positions; truncate the input"
            )
        if token_type_ids is not None and token_type_ids.shape != ids.shape:
            raise ValueError(
                f"token_type_ids must have the shape of ids {tuple(ids.shape)}; "
                f"got {tuple(token_type_ids.shape)}"
            )

    @staticmethod
    def _check_mask(ids: Tensor, mask: Tensor | None) -> Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, Tensor) or mask.shape != ids.shape:
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(
                f"mask must be a (B, N) tensor of the shape of ids {tuple(ids.shape)}; got {shape}"
            )
        return mask.bool()


def hf_tensor_names(config: BertConfig) -> dict[str, str]:
    """``{qkv parameter name: HF BERT tensor name}`` for every parameter of a
    :class:`BertEncoder` (HF names without the ``bert.`` prefix some checkpoints add)."""
    names = {
        "word_embeddings.weight": "embeddings.word_embeddings.weight",
        "position_embeddings.weight": "embeddings.position_embeddings.weight",
        "token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
        "embedding_norm.weight": "embeddings.LayerNorm.weight",
        "embedding_norm.bias": "embeddings.LayerNorm.bias",
    }
    per_layer = {
        "attention.q_proj": "attention.self.query",
        "attention.k_proj": "attention.self.key",
        "attention.v_proj": "attention.self.value",
        "attention.out_proj": "attention.output.dense",
        "attention_norm": "attention.output.LayerNorm",
        "ffn_in": "intermediate.dense",
        "ffn_out": "output.dense",
        "ffn_norm": "output.LayerNorm",
    }
    for i in range(config.num_hidden_layers):
        for ours, theirs in per_layer.items():
            for kind in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{kind}"] = f"encoder.layer.{i}.{theirs}.{kind}"
    return names
