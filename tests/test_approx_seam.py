"""The seam: MultiHeadAttention, the model configs and swap_attention take an approximation."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv import approx
from qkv.models import Seq2SeqTransformer, TransformerConfig
from qkv.models.classifier import AttentionClassifier, ClassifierConfig
from qkv.nn import MultiHeadAttention, swap_attention

F64 = torch.float64


def _x(B=2, N=9, E=16, seed=0):
    return torch.randn(B, N, E, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _padding(B=2, N=9):
    return torch.arange(N)[None, :] < torch.tensor([N, N - 4])[:B, None]


def _pair(**kw):
    torch.manual_seed(0)
    exact = MultiHeadAttention(16, 4, num_kv_heads=2, **kw).double()
    return exact


def test_default_is_exact_and_a_callable_sees_what_qkv_attention_sees():
    mha = _pair()
    assert mha.attention_name == "exact" and mha.attention_impl is None
    x, keep = _x(), _padding()
    gold, _ = mha(x, key_padding_mask=keep, causal=True)
    calls = []

    def spy(q, k, v, *, mask, causal):
        calls.append((tuple(q.shape), tuple(k.shape), mask.shape, causal))
        return qkv.attention(q, k, v, mask=mask, causal=causal)

    mha.set_attention(spy)
    out, _ = mha(x, key_padding_mask=keep, causal=True)
    torch.testing.assert_close(out, gold, rtol=0, atol=0)
    assert calls == [((2, 4, 9, 4), (2, 2, 9, 4), torch.Size([2, 1, 1, 9]), True)]
    mha.set_attention("exact")
    again, _ = mha(x, key_padding_mask=keep, causal=True)
    assert torch.equal(again, gold)


@pytest.mark.parametrize(
    "name,options,fn",
    [
        ("linear", {}, lambda q, k, v, m, mask: approx.linear_attention(q, k, v, mask=mask)),
        (
            "nystrom",
            {"num_landmarks": 3},
            lambda q, k, v, m, mask: approx.nystrom_attention(q, k, v, mask=mask, num_landmarks=3),
        ),
        (
            "performer",
            {"num_features": 8},
            lambda q, k, v, m, mask: approx.performer_attention(
                q, k, v, projection=m.attention_impl.projection, mask=mask
            ),
        ),
        (
            "linformer",
            {"max_len": 12, "rank": 4},
            lambda q, k, v, m, mask: m.attention_impl(q, k, v, mask=mask),
        ),
    ],
)
def test_named_approximation_runs_between_the_projections(name, options, fn):
    mha = _pair(attention=name, attention_options=options)
    assert mha.attention_name == name and f"attention={name!r}" in repr(mha)
    x, keep = _x(), _padding()
    out, weights = mha(x, key_padding_mask=keep)
    assert weights is None
    q = mha._split_heads(mha.q_proj(x), 4)
    k, v = mha.project_kv(x)
    inner = fn(q, k, v, mha, keep[:, None, None, :])
    gold = mha.out_proj(inner.transpose(1, 2).reshape(2, 9, 16))
    torch.testing.assert_close(out, gold, rtol=1e-12, atol=1e-12)


def test_stateful_approximations_are_submodules_on_the_module_dtype():
    mha = _pair(attention="linformer", attention_options={"max_len": 12, "rank": 4})
    names = {n for n, _ in mha.named_parameters()}
    assert "attention_impl.key_projection" in names
    assert mha.attention_impl.key_projection.dtype == F64
    mha.set_attention("performer", num_features=8)
    assert "attention_impl.projection" in mha.state_dict()
    assert not any(n.startswith("attention_impl") for n, _ in mha.named_parameters())
    mha.set_attention("exact")
    assert not any(k.startswith("attention_impl") for k in mha.state_dict())


def test_approximation_refuses_what_it_cannot_do():
    mha = _pair(attention="linear")
    with pytest.raises(ValueError, match="need_weights=True needs exact attention"):
        mha(_x(), need_weights=True)
    with pytest.raises(ValueError, match="bias needs exact attention"):
        mha(_x(), bias=torch.zeros(1, 4, 9, 9, dtype=F64))
    with pytest.raises(ValueError, match="unknown attention='fast'"):
        MultiHeadAttention(16, 4, attention="fast")
    with pytest.raises(ValueError, match="attention='exact' takes no attention_options"):
        MultiHeadAttention(16, 4, attention_options={"rank": 2})
    with pytest.raises(TypeError, match="attention must be"):
        MultiHeadAttention(16, 4, attention=3)  # type: ignore[arg-type]


def test_cached_decoding_with_a_causal_approximation_matches_the_full_pass():
    mha = _pair(attention="linear")
    x = _x(B=1, N=6)
    with torch.no_grad():
        full, _ = mha(x, causal=True)
        cache = mha.make_kv_cache(1, 6, dtype=F64)
        steps = [mha(x[:, i : i + 1], causal=True, kv_cache=cache)[0] for i in range(6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-12, atol=1e-12)


# --- configs and swapping ------------------------------------------------------------------


def _classifier(**kw) -> AttentionClassifier:
    torch.manual_seed(0)
    config = ClassifierConfig(
        50, 2, "transformer", embed_dim=16, hidden_dim=32, num_layers=2, num_heads=4, **kw
    )
    return AttentionClassifier(config)


def _ids():
    ids = torch.randint(1, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    ids[1, 8:] = 0
    return ids


def test_classifier_config_names_the_attention():
    model = _classifier(attention="performer", attention_options={"num_features": 8})
    kinds = {m.attention_name for m in model.modules() if isinstance(m, MultiHeadAttention)}
    assert kinds == {"performer"}
    config = model.config
    assert ClassifierConfig.from_dict(config.to_dict()) == config
    assert torch.isfinite(model(_ids()).logits).all()
    with pytest.raises(ValueError, match="attention must be one of"):
        ClassifierConfig(50, 2, "transformer", attention="fast")
    with pytest.raises(ValueError, match="needs encoder='transformer'"):
        ClassifierConfig(50, 2, "bigru", attention="linear")


def test_transformer_config_uses_the_approximation_in_the_encoder():
    config = TransformerConfig.from_name(
        "tiny", src_vocab_size=30, tgt_vocab_size=20, attention="linear", dropout=0.0
    )
    assert TransformerConfig.from_dict(config.to_dict()) == config
    model = Seq2SeqTransformer(config)
    enc = {
        m.attention_name
        for m in model.encoder_layers.modules()
        if isinstance(m, MultiHeadAttention)
    }
    dec = {
        m.attention_name
        for m in model.decoder_layers.modules()
        if isinstance(m, MultiHeadAttention)
    }
    assert enc == {"linear"} and dec == {"exact"}
    src = torch.randint(3, 30, (2, 7))
    assert model(src, torch.randint(3, 20, (2, 5))).shape == (2, 5, 20)
    with pytest.raises(ValueError, match="attention must be one of"):
        TransformerConfig(30, 20, attention="fast")


def _train_a_few_steps(model: AttentionClassifier, steps: int = 5) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids, labels = _ids(), torch.tensor([0, 1, 1])
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(ids).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize(
    "name,options",
    [
        ("linear", {}),
        ("performer", {"num_features": 16}),
        ("nystrom", {"num_landmarks": 4}),
        ("linformer", {"max_len": 32, "rank": 8}),
        ("bigbird", {"block_size": 2, "window_blocks": 1, "random_blocks": 1}),
        ("local", {"window": 3}),
    ],
)
def test_trained_exact_model_evaluates_with_a_swapped_approximation(name, options):
    model = _classifier(dropout=0.0)
    _train_a_few_steps(model)
    model.eval()
    with torch.no_grad():
        exact = model(_ids()).logits
        assert swap_attention(model, name, **options) == 2
        swapped = model(_ids()).logits
        assert torch.isfinite(swapped).all()
        assert not torch.equal(swapped, exact)
        swap_attention(model, "exact")
        torch.testing.assert_close(model(_ids()).logits, exact, rtol=0, atol=0)


def test_swap_attention_selects_modules_and_refuses_models_without_attention():
    config = TransformerConfig.from_name("tiny", src_vocab_size=30, tgt_vocab_size=20)
    model = Seq2SeqTransformer(config)
    changed = swap_attention(model, "nystrom", where=lambda n, m: "encoder" in n)
    assert changed == 2
    assert model.decoder_layers[0].self_attn.attention_name == "exact"
    model.eval()
    assert torch.isfinite(model(torch.randint(3, 30, (2, 7)), torch.randint(3, 20, (2, 5)))).all()
    with pytest.raises(ValueError, match="holds no qkv MultiHeadAttention"):
        swap_attention(torch.nn.Linear(2, 2), "linear")
