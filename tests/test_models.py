"""Seq2seq models: shapes, masking, incremental decoding, round-trips, config validation."""

from __future__ import annotations

import pytest
import torch

from qkv.models import (
    RNNConfig,
    Seq2SeqModel,
    TransformerConfig,
    build_model,
)

SRC_V, TGT_V = 23, 17

CONFIGS = {
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


def make_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(CONFIGS[name].to_dict()).eval()


def random_batch(
    seed: int, vocab_src: int = SRC_V, vocab_tgt: int = TGT_V
) -> tuple[torch.Tensor, torch.Tensor]:
    """source (3, 9) and target_in (3, 6) of real ids (>= 3), <bos> first, no padding."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(3, vocab_src, (3, 9), generator=g)
    target_in = torch.randint(3, vocab_tgt, (3, 6), generator=g)
    target_in[:, 0] = 1
    return source, target_in


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_shape_and_protocol(name: str) -> None:
    model = make_model(name)
    assert isinstance(model, Seq2SeqModel)
    vocab = CONFIGS[name].src_vocab_size
    source, target_in = random_batch(1, vocab_src=vocab)
    logits = model(source, target_in)
    assert logits.shape == (3, 6, TGT_V)
    assert torch.isfinite(logits).all()
