"""Seq2seq models: shapes, masking, incremental decoding, round-trips, config validation,
and each model overfitting a small reversal task."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from qkv.models import (
    EncoderOutput,
    RNNConfig,
    RNNSeq2Seq,
    Seq2SeqModel,
    Seq2SeqTransformer,
    TransformerConfig,
    build_model,
)
from toys import OVERFIT
from toys import reversal_id_pairs as reversal_pairs

SRC_V, TGT_V = 23, 17

CONFIGS: dict[str, TransformerConfig | RNNConfig] = {
    "transformer": TransformerConfig.from_name("tiny", src_vocab_size=SRC_V, tgt_vocab_size=TGT_V),
    "transformer-rope-gqa-tied": TransformerConfig.from_name(
        "tiny",
        src_vocab_size=TGT_V,
        tgt_vocab_size=TGT_V,
        positional="rope",
        num_kv_heads=2,
        tie_embeddings="all",
    ),
    "rnn-bahdanau-gru": RNNConfig.from_name("tiny", src_vocab_size=SRC_V, tgt_vocab_size=TGT_V),
    "rnn-luong-dot-lstm-2layers": RNNConfig.from_name(
        "tiny",
        src_vocab_size=SRC_V,
        tgt_vocab_size=TGT_V,
        cell="lstm",
        attention="luong",
        luong_score="dot",
        num_layers=2,
    ),
    "rnn-luong-concat-feeding": RNNConfig.from_name(
        "tiny",
        src_vocab_size=SRC_V,
        tgt_vocab_size=TGT_V,
        attention="luong",
        luong_score="concat",
        input_feeding=True,
    ),
    "rnn-none": RNNConfig.from_name(
        "tiny", src_vocab_size=SRC_V, tgt_vocab_size=TGT_V, attention="none"
    ),
    "rnn-none-feeding-lstm": RNNConfig.from_name(
        "tiny",
        src_vocab_size=SRC_V,
        tgt_vocab_size=TGT_V,
        attention="none",
        input_feeding=True,
        cell="lstm",
    ),
}
NAMES = sorted(CONFIGS)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


WITH_ATTENTION = [n for n in NAMES if getattr(CONFIGS[n], "attention", "mha") != "none"]


def make_model(name: str, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return build_model(CONFIGS[name].to_dict()).eval()


def random_batch(name: str, seed: int, B: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """source (B, 9) and target_in (B, 6) of real ids (>= 3), <bos> first, no padding."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(3, CONFIGS[name].src_vocab_size, (B, 9), generator=g)
    target_in = torch.randint(3, TGT_V, (B, 6), generator=g)
    target_in[:, 0] = 1
    return source, target_in


def pad_right(ids: torch.Tensor, extra: int) -> torch.Tensor:
    return torch.cat([ids, ids.new_zeros(ids.shape[0], extra)], dim=1)


# --- shapes, masking ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_and_protocol(name: str) -> None:
    model = make_model(name)
    assert isinstance(model, Seq2SeqModel)
    source, target_in = random_batch(name, 1)
    logits = model(source, target_in)
    assert logits.shape == (3, 6, TGT_V)
    assert torch.isfinite(logits).all()
    encoded = model.encode(source)
    assert isinstance(encoded, EncoderOutput)
    assert encoded.memory.shape[:2] == (3, 9) and encoded.source_mask.all()
    torch.testing.assert_close(model.decode(encoded, target_in), logits)


@pytest.mark.parametrize("name", NAMES)
def test_padding_does_not_change_real_tokens(name: str) -> None:
    model = make_model(name)
    source, target_in = random_batch(name, 2)
    source[1, 6:] = 0  # a shorter source in the batch
    with torch.no_grad():
        reference = model(source, target_in)
        padded = model(pad_right(source, 4), pad_right(target_in, 3))
        alone = model(source[1:2, :6], target_in[1:2])
    torch.testing.assert_close(padded[:, :6], reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, reference[1:2], atol=1e-5, rtol=1e-5)


def test_padding_changes_nothing_but_a_real_token_does() -> None:
    """Control for the masking test: the same comparison sees a changed real token."""
    model = make_model("transformer")
    source, target_in = random_batch("transformer", 3)
    changed = source.clone()
    changed[0, 4] = (changed[0, 4] - 2) % (SRC_V - 3) + 3
    with torch.no_grad():
        diff = (model(changed, target_in) - model(source, target_in)).abs()
    assert diff[0].max() > 1e-3 and diff[1:].max() == 0


# --- incremental decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_cached_steps_equal_full_recompute_with_reorder(name: str) -> None:
    """decode_step logits equal decode() over the whole prefix, also after a beam reorder."""
    model = make_model(name)
    source, target_in = random_batch(name, 4, B=2)
    source[1, 5:] = 0
    beam = 2
    # Reorders of the (B * beam) rows: within each source's beams (one copied twice), as beam
    # search does, then across sources, which must move the encoder side too.
    orders = {3: torch.tensor([1, 1, 3, 2]), 5: torch.tensor([3, 2, 1, 1])}
    with torch.no_grad():
        encoded = model.encode(source)
        state = model.start_decoding(encoded, beam_size=beam, max_len=8)
        prefix = target_in.repeat_interleave(beam, dim=0)  # (4, 6)
        prefix[1::2, 2:] = prefix.flip(0)[1::2, 2:]  # beams of a source diverge after step 2
        expanded = encoded.repeat_rows(beam)
        for t in range(prefix.shape[1]):
            if t in orders:
                state.select(orders[t])
                prefix = prefix.index_select(0, orders[t])
                expanded = expanded.select(orders[t])
            step = model.decode_step(state, prefix[:, t])  # (4, V)
            full = model.decode(expanded, prefix[:, : t + 1])[:, -1]
            torch.testing.assert_close(step, full, atol=2e-5, rtol=1e-5)
        assert state.length == prefix.shape[1] and state.batch_size == 4


# --- round trip, configs ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_and_config_round_trip(name: str) -> None:
    model = make_model(name, seed=5)
    config = json.loads(json.dumps(model.config.to_dict()))
    rebuilt = build_model(config).eval()
    assert rebuilt.config == model.config
    assert type(rebuilt) is type(model)
    rebuilt.load_state_dict(model.state_dict())
    source, target_in = random_batch(name, 6)
    with torch.no_grad():
        assert torch.equal(rebuilt(source, target_in), model(source, target_in))


def test_tied_embeddings_share_one_table() -> None:
    model = make_model("transformer-rope-gqa-tied")
    assert model.output.weight is model.tgt_embed.weight is model.src_embed.weight
    untied = make_model("transformer")
    assert untied.output.weight is not untied.tgt_embed.weight


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (TransformerConfig, {"d_model": 30, "num_heads": 4}, r"d_model \(30\).*num_heads \(4\)"),
        (TransformerConfig, {"num_kv_heads": 3}, r"num_kv_heads \(3\)"),
        (TransformerConfig, {"dropout": 1.5}, r"dropout=1\.5"),
        (TransformerConfig, {"positional": "alibi"}, r"positional='alibi'"),
        (TransformerConfig, {"tie_embeddings": "all"}, r"tie_embeddings=\"all\".*23 and 17"),
        (TransformerConfig, {"num_encoder_layers": 0}, r"num_encoder_layers=0"),
        (TransformerConfig, {"src_vocab_size": -2}, r"src_vocab_size=-2"),
        (RNNConfig, {"cell": "rnn"}, r"cell='rnn'"),
        (RNNConfig, {"attention": "dot"}, r"attention='dot'"),
        (RNNConfig, {"luong_score": "cosine"}, r"luong_score='cosine'"),
        (RNNConfig, {"hidden_dim": 0}, r"hidden_dim=0"),
        (RNNConfig, {"input_feeding": True}, r"input_feeding=True.*bahdanau"),
        (RNNConfig, {"input_feeding": 1}, r"input_feeding=1"),
    ],
)
def test_config_validation_names_field_and_value(
    cls: Any, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**{"src_vocab_size": SRC_V, "tgt_vocab_size": TGT_V, **kwargs})


def test_presets_and_build_errors() -> None:
    small = TransformerConfig.from_name("base", src_vocab_size=9, tgt_vocab_size=9)
    assert (small.d_model, small.num_heads, small.num_encoder_layers) == (512, 8, 6)
    assert RNNConfig.from_name("small", src_vocab_size=9, tgt_vocab_size=9).hidden_dim == 256
    with pytest.raises(ValueError, match=r"name='huge'"):
        TransformerConfig.from_name("huge", src_vocab_size=9, tgt_vocab_size=9)
    with pytest.raises(ValueError, match=r"kind='lstm'"):
        build_model({"kind": "lstm", "src_vocab_size": 9, "tgt_vocab_size": 9})
    with pytest.raises(ValueError, match=r"unknown RNNConfig fields: heads"):
        build_model({"kind": "rnn", "src_vocab_size": 9, "tgt_vocab_size": 9, "heads": 2})
    with pytest.raises(TypeError, match="config must be a TransformerConfig"):
        Seq2SeqTransformer(CONFIGS["rnn-none"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config must be an RNNConfig"):
        RNNSeq2Seq(CONFIGS["transformer"])  # type: ignore[arg-type]


def test_input_errors_name_the_argument() -> None:
    model = make_model("transformer")
    source, target_in = random_batch("transformer", 7)
    with pytest.raises(TypeError, match="source must be int64"):
        model(source.int(), target_in)
    with pytest.raises(ValueError, match=r"target_in holds ids outside \[0, 17\)"):
        model(source, target_in + 20)
    with pytest.raises(ValueError, match=r"target_in has batch size 2 but the source has 3"):
        model(source, target_in[:2])
    with pytest.raises(ValueError, match=r"max_len must be a positive int; got max_len=0"):
        model.start_decoding(model.encode(source), max_len=0)


# --- cross-attention for heat maps ---------------------------------------------------------------


@pytest.mark.parametrize("name", WITH_ATTENTION)
def test_cross_attention_weights(name: str) -> None:
    model = make_model(name)
    source, target_in = random_batch(name, 8, B=1)
    source = pad_right(source, 2)  # (1, 11): two padding positions
    weights = model.cross_attention(source, target_in)
    assert weights.shape == (6, 11)
    torch.testing.assert_close(weights.sum(-1), torch.ones(6))
    assert (weights[:, 9:] == 0).all() and (weights[:, :9] > 0).all()
    heads = model.cross_attention(source, target_in, per_head=True)
    torch.testing.assert_close(heads.mean(0), weights)
    every_layer = model.cross_attention(source, target_in, layer=None)
    torch.testing.assert_close(every_layer[-1], weights)
    with pytest.raises(ValueError, match=r"source must have shape \(1, N\)"):
        model.cross_attention(source.repeat(2, 1), target_in)


def test_cross_attention_without_attention_raises() -> None:
    source, target_in = random_batch("rnn-none", 9, B=1)
    with pytest.raises(ValueError, match='attention="none"'):
        make_model("rnn-none").cross_attention(source, target_in)


# --- learning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OVERFIT))
def test_overfits_32_reversal_pairs(name: str) -> None:
    config, lr = OVERFIT[name]
    torch.manual_seed(0)
    model = build_model(config.replace(dropout=0.0))
    source, target_in, target_out = reversal_pairs()
    real = target_out != 0
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    accuracy = 0.0
    for _ in range(120):
        logits = model(source, target_in)
        loss = F.cross_entropy(logits.flatten(0, 1), target_out.flatten(), ignore_index=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        correct = (logits.detach().argmax(-1) == target_out) & real
        accuracy = float(correct.sum() / real.sum())
        if accuracy == 1.0:
            break
    assert accuracy == 1.0, f"{name}: token accuracy {accuracy:.3f} after 120 steps"


def test_decode_step_checks_its_tokens() -> None:
    model = make_model("transformer")
    source, _ = random_batch("transformer", 10)
    with torch.no_grad():
        state = model.start_decoding(model.encode(source), beam_size=2, max_len=4)
        with pytest.raises(ValueError, match=r"tokens must have shape \(B,\) = \(6,\)"):
            model.decode_step(state, torch.ones(3, dtype=torch.long))
        with pytest.raises(TypeError, match="tokens must be int64"):
            model.decode_step(state, torch.ones(6))
        assert model.decode_step(state, torch.ones(6, dtype=torch.long)).shape == (6, TGT_V)
