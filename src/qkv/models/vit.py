r"""A small Vision Transformer over qkv's encoder blocks: :class:`VisionTransformer`.

Dosovitskiy et al. "An Image is Worth 16x16 Words" (ICLR 2021): cut the image into patches,
embed each patch linearly, add learned positions, run Transformer encoder layers, classify::

    images (B, C, H, W) --patches p x p, linear--> (B, Np, E)   Np = (H / p) * (W / p)
        (+ class token) + learned positions --> (B, Np [+1], E)
        --encoder: L x pre-norm EncoderLayer (qkv.nn.MultiHeadAttention)--> LN --> (B, N, E)
        --pooling--> (B, r * E) or (B, E) --linear--> logits (B, C)

Pooling is ``"attention"`` (``r`` learned queries over the patch states,
:class:`~qkv.models.classifier.AttentionPooling`, the same module the text classifier uses) or
``"cls"`` (the class token's final state, as in the paper). Either way the model can say which
patches its decision read: :meth:`VisionTransformer.explain` returns the pooling weights (or
the class token's last-layer attention) over the patches and every layer's self-attention, for
:func:`qkv.viz.attention_rollout`.

The encoder layers are :class:`qkv.models.transformer.EncoderLayer` and
:class:`~qkv.models.transformer.FeedForward`, the translation model's, so there is one
attention code path in the library (:func:`qkv.attention` behind ``MultiHeadAttention``).

Notation used for tensor shapes: ``B`` images, ``C`` channels, ``H``/``W`` image height and
width (``S`` when square), ``p`` patch size, ``Np`` patches, ``N`` tokens (``Np``, or ``Np + 1``
with a class token), ``E`` d_model, ``Hd`` heads, ``L`` layers, ``r`` pooling queries,
``K`` classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar, Literal, cast

import torch
from torch import Tensor, nn

from qkv.models.base import check_choice, check_positive_int, check_probability, config_from_dict
from qkv.models.classifier import AttentionPooling
from qkv.models.transformer import EncoderLayer, FeedForward
from qkv.nn import MultiHeadAttention

__all__ = ["PatchAttention", "Pooling", "ViTConfig", "ViTOutput", "VisionTransformer"]

Pooling = Literal["attention", "cls"]


@dataclass(frozen=True)
class ViTConfig:
    """Hyperparameters of a :class:`VisionTransformer`, validated on construction.

    Args:
        num_classes: ``K``, at least 2.
        image_size: ``S``, the side of the square images the model reads.
        channels: ``C``, 1 (grayscale) or 3 (RGB).
        patch_size: ``p``, the side of each square patch; divides ``image_size``.
        d_model: ``E``.
        num_heads: ``Hd``; divides ``d_model``.
        num_layers: ``L`` encoder layers.
        ffn_dim: feed-forward hidden size; None = ``4 * d_model``.
        dropout: on the embeddings, residual branches, attention weights and the pooled vector.
        pooling: ``"attention"`` (learned queries over the patches) or ``"cls"`` (a class token).
        pool_queries: ``r``, the pooling queries (``"attention"`` only).

    Use :meth:`from_name` for the presets ``tiny``, ``small`` and ``base``.
    """

    kind: ClassVar[str] = "vit"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # Seconds on a CPU: for tests.
        "tiny": {"d_model": 32, "num_heads": 2, "num_layers": 2, "dropout": 0.0},
        # The digits model: 16 patches of 2x2 pixels, ~0.2 M parameters.
        "small": {"d_model": 64, "num_heads": 4, "num_layers": 4},
        # DeiT-Ti's width (Touvron et al. 2021) at half its depth, for larger images.
        "base": {"d_model": 192, "num_heads": 3, "num_layers": 6},
    }

    num_classes: int
    image_size: int = 8
    channels: int = 1
    patch_size: int = 2
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 4
    ffn_dim: int | None = None
    dropout: float = 0.1
    pooling: Pooling = "attention"
    pool_queries: int = 1

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "d_model", "num_heads", "num_layers"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("pool_queries", self.pool_queries)
        check_positive_int("num_classes", self.num_classes)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2; got num_classes={self.num_classes}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3; got channels={self.channels!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size ({self.patch_size}) must divide image_size ({self.image_size})"
            )
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.ffn_dim is not None:
            check_positive_int("ffn_dim", self.ffn_dim)
        check_probability("dropout", self.dropout)
        check_choice("pooling", self.pooling, ("attention", "cls"))

    @property
    def grid_size(self) -> int:
        """Patches along each side, ``S / p``."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """``Np = (S / p) ** 2``."""
        return self.grid_size**2

    @property
    def hidden_dim(self) -> int:
        """The feed-forward hidden size, ``ffn_dim`` or ``4 * d_model``."""
        return self.ffn_dim if self.ffn_dim is not None else 4 * self.d_model

    @classmethod
    def from_name(cls, name: str, *, num_classes: int, **overrides: Any) -> ViTConfig:
        """A preset (``tiny``, ``small``, ``base``) with the data-dependent sizes and overrides,
        e.g. ``from_name("small", num_classes=10, image_size=8)``.

        Raises:
            ValueError: an unknown preset name, or an invalid field.
        """
        if name not in cls.presets:
            raise ValueError(f"unknown ViT preset name={name!r}; choose from {sorted(cls.presets)}")
        return cls(num_classes=num_classes, **{**cls.presets[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        """The inverse of :meth:`to_dict`; unknown fields are refused by name."""
        return cast(ViTConfig, config_from_dict(cls, data))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus ``"kind": "vit"``."""
        return {"kind": self.kind, **asdict(self)}

    def replace(self, **changes: Any) -> ViTConfig:
        """A copy with ``changes`` applied (and validated)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class ViTOutput:
    """What :meth:`VisionTransformer.forward` returns.

    Attributes:
        logits: ``(B, K)`` unnormalised class scores.
        pooling: ``(B, r, Np)`` the attention pooling's weights over the patches (rows sum to
            1), or None with a class token (its attention comes from :meth:`explain`).
    """

    logits: Tensor
    pooling: Tensor | None


@dataclass(frozen=True)
class PatchAttention:
    """Where a :class:`VisionTransformer` looked, from :meth:`VisionTransformer.explain`.

    Attributes:
        logits: ``(B, K)``, equal to ``forward``'s in eval mode.
        patches: ``(B, S/p, S/p)`` the decision's attention over the patch grid, summing to 1
            per image: the pooling weights averaged over the ``r`` queries, or the class token's
            last-layer attention to the patches (averaged over heads, renormalised without the
            class token itself).
        layers: ``L`` tensors ``(B, Hd, N, N)``, every layer's self-attention probabilities,
            first layer first (the input of :func:`qkv.viz.attention_rollout`).
    """

    logits: Tensor
    patches: Tensor
    layers: list[Tensor]


class PatchEmbedding(nn.Module):
    """Non-overlapping ``p x p`` patches, each projected linearly to ``E`` (a strided conv is
    exactly a linear map of each flattened patch)."""

    def __init__(self, channels: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        """``images (B, C, S, S)`` -> ``(B, Np, E)``, patches in row-major order."""
        grid = self.proj(images)  # (B, E, S/p, S/p)
        return grid.flatten(2).transpose(1, 2)  # (B, Np, E)


class VisionTransformer(nn.Module):
    """Patch embedding, learned positions, qkv encoder layers, pooling and a linear head.

    Args:
        config: a :class:`ViTConfig`.

    Example::

        config = ViTConfig.from_name("small", num_classes=10, image_size=8)
        model = VisionTransformer(config)
        out = model(images)                      # (B, 1, 8, 8) -> out.logits (B, 10)

    Raises:
        TypeError: ``config`` is not a :class:`ViTConfig`.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise TypeError(f"config must be a ViTConfig; got {type(config).__name__}")
        self.config = c = config
        E = c.d_model
        self.patch_embed = PatchEmbedding(c.channels, c.patch_size, E)
        num_tokens = c.num_patches + (1 if c.pooling == "cls" else 0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, E)) if c.pooling == "cls" else None
        self.positions = nn.Parameter(torch.zeros(1, num_tokens, E))
        self.embed_drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(
                MultiHeadAttention(E, c.num_heads, dropout=c.dropout),
                FeedForward(E, c.hidden_dim, c.dropout),
                E,
                c.dropout,
            )
            for _ in range(c.num_layers)
        )
        self.norm = nn.LayerNorm(E)
        self.pool = AttentionPooling(E, E, c.pool_queries) if c.pooling == "attention" else None
        self.head_drop = nn.Dropout(c.dropout)
        pooled = c.pool_queries * E if c.pooling == "attention" else E
        self.head = nn.Linear(pooled, c.num_classes)
        self._init_parameters()

    def _init_parameters(self) -> None:
        # ViT's initialisation: small truncated-normal positions and class token, so the
        # patches' content dominates the first layer; a zero head starts at uniform predictions.
        nn.init.trunc_normal_(self.positions, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    # --- the calls --------------------------------------------------------------------------

    def forward(self, images: Tensor) -> ViTOutput:
        """Classify ``images (B, C, S, S)`` (float, pixels in ``[0, 1]``).

        Returns:
            A :class:`ViTOutput`: ``logits (B, K)`` and the pooling weights ``(B, r, Np)``.

        Raises:
            TypeError, ValueError: ``images`` is not a float tensor of shape ``(B, C, S, S)``
                with this config's ``C`` and ``S``.
        """
        x = self._embed(images)  # (B, N, E)
        for layer in self.layers:
            x = layer(x, None)
        return self._classify(self.norm(x))

    def explain(self, images: Tensor) -> PatchAttention:
        """The logits with the attention behind them (call in eval mode, under ``no_grad``).

        Runs the same layers as :meth:`forward` but asks each self-attention for its weights,
        which needs a backend that forms them (slower; for explanations, not for serving).

        Returns:
            A :class:`PatchAttention`: ``logits (B, K)``, ``patches (B, S/p, S/p)`` and the
            per-layer weights ``(B, Hd, N, N)``.
        """
        x = self._embed(images)  # (B, N, E)
        layers: list[Tensor] = []
        for layer in self._encoder_layers():
            # EncoderLayer.forward, step by step, keeping the attention weights.
            attended, weights = layer.self_attn(
                layer.norm1(x), need_weights=True, average_attn_weights=False
            )  # (B, N, E), (B, Hd, N, N)
            x = x + layer.drop(attended)
            x = x + layer.drop(layer.ffn(layer.norm2(x)))
            layers.append(cast(Tensor, weights))
        out = self._classify(self.norm(x))
        g = self.config.grid_size
        if out.pooling is not None:
            patches = out.pooling.mean(dim=1)  # (B, Np)
        else:
            from_cls = layers[-1][:, :, 0, 1:].mean(dim=1)  # (B, Np)
            patches = from_cls / from_cls.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return PatchAttention(out.logits, patches.reshape(-1, g, g), layers)

    # --- pieces -----------------------------------------------------------------------------

    def _encoder_layers(self) -> list[EncoderLayer]:
        return [cast(EncoderLayer, layer) for layer in self.layers]

    def _embed(self, images: Tensor) -> Tensor:
        """``images (B, C, S, S)`` -> tokens ``(B, N, E)``: patches, class token, positions."""
        images = self._check_images(images)
        x = self.patch_embed(images)  # (B, Np, E)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N, E)
        return self.embed_drop(x + self.positions)

    def _classify(self, states: Tensor) -> ViTOutput:
        """Final states ``(B, N, E)`` -> logits ``(B, K)`` and pooling weights."""
        if self.pool is None:
            return ViTOutput(self.head(self.head_drop(states[:, 0])), None)  # class token
        everywhere = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        pooled, weights = self.pool(states, everywhere)  # (B, r, E), (B, r, Np)
        return ViTOutput(self.head(self.head_drop(pooled.flatten(1))), weights)

    def _check_images(self, images: object) -> Tensor:
        c = self.config
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor; got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(
                f"images must be a float tensor with pixels in [0, 1]; got dtype {images.dtype}"
            )
        expected = (c.channels, c.image_size, c.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must have shape (B, {c.channels}, {c.image_size}, {c.image_size}) "
                f"(B, C, S, S); got {tuple(images.shape)}"
            )
        return images
