"""The Vision Transformer: config validation, shapes, explanations, numerics, bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch

from qkv.models.transformer import EncoderLayer
from qkv.models.vit import VisionTransformer, ViTConfig
from qkv.nn import MultiHeadAttention


def _model(pooling: str = "attention", **overrides: object) -> VisionTransformer:
    torch.manual_seed(0)
    config = ViTConfig.from_name("tiny", num_classes=5, pooling=pooling, **overrides)
    model = VisionTransformer(config).eval()
    torch.nn.init.normal_(model.head.weight)  # the zero-initialised head would hide the body
    return model


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"patch_size": 3}, r"patch_size \(3\) must divide image_size \(8\)"),
        ({"d_model": 30, "num_heads": 4}, r"d_model \(30\) must be divisible by num_heads \(4\)"),
        ({"channels": 2}, "channels must be 1 or 3; got channels=2"),
        ({"pooling": "mean"}, "pooling must be one of 'attention', 'cls'; got pooling='mean'"),
        ({"num_classes": 1}, "num_classes must be >= 2"),
        ({"dropout": 1.0}, "dropout must be a number in"),
        ({"num_layers": 0}, "num_layers must be a positive int"),
    ],
)
def test_config_refuses_bad_values(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ViTConfig(**{"num_classes": 10, **changes})  # type: ignore[arg-type]


def test_config_presets_and_round_trip() -> None:
    config = ViTConfig.from_name("small", num_classes=10, image_size=16, patch_size=4)
    assert (config.d_model, config.num_layers, config.num_patches, config.grid_size) == (
        64,
        4,
        16,
        4,
    )
    assert ViTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown ViT preset name='huge'"):
        ViTConfig.from_name("huge", num_classes=10)
    with pytest.raises(ValueError, match="unknown ViTConfig fields: depth"):
        ViTConfig.from_dict({**config.to_dict(), "depth": 3})
    with pytest.raises(TypeError, match="config must be a ViTConfig"):
        VisionTransformer({"num_classes": 3})  # type: ignore[arg-type]


def test_encoder_is_qkvs_own_layers() -> None:
    # One attention code path: the blocks are the translation model's EncoderLayer over
    # qkv's MultiHeadAttention, not a second attention implementation.
    model = _model()
    assert all(isinstance(layer, EncoderLayer) for layer in model.layers)
    assert all(isinstance(layer.self_attn, MultiHeadAttention) for layer in model.layers)


@pytest.mark.parametrize("pooling", ["attention", "cls"])
def test_shapes_and_explain_agree_with_forward(pooling: str) -> None:
    model = _model(pooling)
    images = torch.rand(3, 1, 8, 8)
    out = model(images)
    assert out.logits.shape == (3, 5)
    explained = model.explain(images)
    torch.testing.assert_close(explained.logits, out.logits, rtol=1e-5, atol=1e-5)
    assert explained.patches.shape == (3, 4, 4)
    torch.testing.assert_close(explained.patches.sum(dim=(1, 2)), torch.ones(3))
    tokens = 16 if pooling == "attention" else 17
    assert [w.shape for w in explained.layers] == [(3, 2, tokens, tokens)] * 2
    for weights in explained.layers:
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2, tokens))
    if pooling == "attention":
        assert out.pooling is not None and out.pooling.shape == (3, 1, 16)
        torch.testing.assert_close(explained.patches.reshape(3, 16), out.pooling[:, 0])
    else:
        assert out.pooling is None
        # The class token's last-layer row over the patches, renormalised without itself.
        row = explained.layers[-1][:, :, 0, 1:].mean(1)
        torch.testing.assert_close(explained.patches.reshape(3, 16), row / row.sum(-1, True))


def test_patches_follow_the_image_layout() -> None:
    # Changing one patch's pixels changes that patch's embedding only (row-major order).
    model = _model()
    images = torch.rand(1, 1, 8, 8)
    changed = images.clone()
    changed[0, 0, 2:4, 4:6] += 0.5  # patch row 1, column 2 -> index 1 * 4 + 2 = 6
    moved = (model.patch_embed(changed) - model.patch_embed(images)).abs().sum(-1)[0]
    assert moved.nonzero().flatten().tolist() == [6]


def test_float32_matches_a_float64_copy() -> None:
    model = _model("cls", num_layers=3)
    images = torch.rand(4, 1, 8, 8)
    gold = copy.deepcopy(model).double()(images.double()).logits
    error = (model(images).logits.double() - gold).abs().max().item()
    assert error < 1e-4, error


def test_gradients_reach_every_parameter() -> None:
    model = _model(dropout=0.1).train()
    images = torch.rand(6, 1, 8, 8)
    loss = torch.nn.functional.cross_entropy(model(images).logits, torch.arange(6) % 5)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_rgb_images_and_larger_patches() -> None:
    model = _model(channels=3, image_size=12, patch_size=4)
    out = model.explain(torch.rand(2, 3, 12, 12))
    assert out.logits.shape == (2, 5) and out.patches.shape == (2, 3, 3)


def test_bad_images_are_named() -> None:
    model = _model()
    with pytest.raises(TypeError, match="images must be a float tensor"):
        model(torch.zeros(1, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must have shape \(B, 1, 8, 8\).*got \(2, 8, 8\)"):
        model(torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match=r"got \(1, 3, 8, 8\)"):
        model(torch.rand(1, 3, 8, 8))
    with pytest.raises(TypeError, match=r"images must be a torch\.Tensor"):
        model([[0.0]])
