"""Greedy and beam search over the models' incremental API."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from qkv.decode import (
    PrefixRecompute,
    beam_search,
    beam_search_hypotheses,
    greedy_decode,
    length_penalty,
)
from qkv.models import RNNConfig, TransformerConfig, build_model
from toys import OVERFIT
from toys import reversal_id_pairs as reversal_pairs

SRC_V, TGT_V = 19, 11  # a small target vocabulary, so that eos comes up now and then

CONFIGS = {
    "transformer": TransformerConfig.from_name("tiny", src_vocab_size=SRC_V, tgt_vocab_size=TGT_V),
    "rnn-bahdanau": RNNConfig.from_name("tiny", src_vocab_size=SRC_V, tgt_vocab_size=TGT_V),
    "rnn-luong-feeding-lstm": RNNConfig.from_name(
        "tiny",
        src_vocab_size=SRC_V,
        tgt_vocab_size=TGT_V,
        attention="luong",
        input_feeding=True,
        cell="lstm",
    ),
    "rnn-none": RNNConfig.from_name(
        "tiny", src_vocab_size=SRC_V, tgt_vocab_size=TGT_V, attention="none"
    ),
}
NAMES = sorted(CONFIGS)
# Initial weights under which each untrained model stops (eos) at varied steps, found by trying
# seeds 0..3: decoders must then handle rows that finish early next to rows that run on.
SEEDS = {"transformer": 3, "rnn-bahdanau": 0, "rnn-luong-feeding-lstm": 0, "rnn-none": 2}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def make_model(name: str, seed: int | None = None) -> Any:
    torch.manual_seed(SEEDS[name] if seed is None else seed)
    model = build_model(CONFIGS[name].to_dict())
    # Sharpen the output a little so that untrained models emit eos at varied steps.
    with torch.no_grad():
        model.output.weight.mul_(3.0)
    return model


def sources(seed: int, B: int = 5) -> torch.Tensor:
    """(B, 8) random real ids, rows right-padded to varied lengths (3 .. 8)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, SRC_V, (B, 8), generator=g)
    for row, length in enumerate(torch.randint(3, 9, (B,), generator=g).tolist()):
        ids[row, length:] = 0
    return ids


def sequence_log_prob(model: Any, source: torch.Tensor, tokens: list[int], ended: bool) -> float:
    """log P(tokens [+ eos] | source) by teacher forcing, with <pad> and <bos> banned as the
    decoders ban them."""
    target = [1, *tokens, 2] if ended else [1, *tokens]
    ids = torch.tensor([target])
    with torch.no_grad():
        logits = model.eval()(source, ids[:, :-1])[0]  # (Nt, V)
    logits[:, [0, 1]] = float("-inf")
    return float(logits.log_softmax(-1).gather(1, ids[0, 1:, None]).sum())


@pytest.mark.parametrize("name", NAMES)
def test_beam_size_one_equals_greedy(name: str) -> None:
    model = make_model(name)
    source = sources(1)
    greedy = greedy_decode(model, source, max_len=12)
    assert greedy == beam_search(model, source, beam_size=1, length_penalty=0.0, max_len=12)
    lengths = {len(row) for row in greedy}
    assert len(lengths) > 1, "the check needs rows that stop at different steps"


@pytest.mark.parametrize("name", NAMES)
def test_cached_beam_search_equals_prefix_recompute(name: str) -> None:
    model = make_model(name)
    source = sources(2)
    cached = beam_search_hypotheses(model, source, beam_size=3, max_len=10)
    recomputed = beam_search_hypotheses(PrefixRecompute(model), source, beam_size=3, max_len=10)
    assert [[h.tokens for h in row] for row in cached] == [
        [h.tokens for h in row] for row in recomputed
    ]
    for row_cached, row_recomputed in zip(cached, recomputed, strict=True):
        for a, b in zip(row_cached, row_recomputed, strict=True):
            assert a.log_prob == pytest.approx(b.log_prob, abs=1e-4)


@pytest.mark.parametrize("name", ["transformer", "rnn-bahdanau"])
def test_batched_beam_search_equals_one_source_at_a_time(name: str) -> None:
    model = make_model(name)
    source = sources(3)
    batched = beam_search(model, source, beam_size=4, length_penalty=0.8, max_len=10)
    for row, expected in zip(source, batched, strict=True):
        alone = row[row != 0][None]  # (1, Ns) without padding
        assert beam_search(model, alone, beam_size=4, length_penalty=0.8, max_len=10) == [expected]


@pytest.mark.parametrize("name", ["transformer", "rnn-luong-feeding-lstm"])
def test_hypotheses_carry_their_true_log_prob_and_score(name: str) -> None:
    model = make_model(name)
    source = sources(4, B=3)
    alpha, max_len = 0.7, 9
    ranked = beam_search_hypotheses(
        model, source, beam_size=3, length_penalty=alpha, max_len=max_len
    )
    for b, hyps in enumerate(ranked):
        assert 1 <= len(hyps) <= 3
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            ended = len(h.tokens) < max_len
            expected = sequence_log_prob(model, source[b : b + 1], h.tokens, ended)
            assert h.log_prob == pytest.approx(expected, abs=1e-4)
            penalty = length_penalty(len(h.tokens) + ended, alpha)
            assert h.score == pytest.approx(h.log_prob / penalty)


def test_wider_beam_finds_at_least_as_likely_output() -> None:
    """With alpha = 0 the best of a wider beam is never less likely than greedy's here."""
    model = make_model("transformer", seed=3)
    source = sources(5, B=6)
    greedy = greedy_decode(model, source, max_len=8)
    wide = beam_search_hypotheses(model, source, beam_size=5, length_penalty=0.0, max_len=8)
    better = 0
    for b, tokens in enumerate(greedy):
        greedy_lp = sequence_log_prob(model, source[b : b + 1], tokens, len(tokens) < 8)
        assert wide[b][0].log_prob >= greedy_lp - 1e-4
        better += wide[b][0].log_prob > greedy_lp + 1e-4
    assert better >= 1, "the beam should beat greedy on some source of a random model"


def test_decoding_respects_max_len_and_restores_mode() -> None:
    model = make_model("rnn-bahdanau").train()
    source = sources(6)
    for output in (
        greedy_decode(model, source, max_len=3),
        beam_search(model, source, beam_size=2, max_len=3),
    ):
        assert len(output) == 5 and all(len(row) <= 3 for row in output)
        assert all(0 not in row and 1 not in row and 2 not in row for row in output)
    assert model.training


def test_argument_errors_name_the_argument() -> None:
    model = make_model("transformer")
    source = sources(7)
    with pytest.raises(ValueError, match="beam_size must be a positive int; got beam_size=0"):
        beam_search(model, source, beam_size=0, max_len=5)
    with pytest.raises(ValueError, match=r"length_penalty=-0\.5"):
        beam_search(model, source, beam_size=2, length_penalty=-0.5, max_len=5)
    with pytest.raises(ValueError, match="max_len=0"):
        greedy_decode(model, source, max_len=0)
    with pytest.raises(ValueError, match="eos=-1"):
        greedy_decode(model, source, max_len=4, eos=-1)
    with pytest.raises(TypeError, match=r"must implement qkv\.models\.Seq2SeqModel"):
        greedy_decode(torch.nn.Linear(2, 2), source, max_len=4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="source must be int64"):
        greedy_decode(model, source.float(), max_len=4)


@pytest.mark.parametrize("name", ["transformer", "rnn-bahdanau-gru"])
def test_trained_model_decodes_its_task(name: str) -> None:
    """Once teacher forcing is right at every position, greedy decoding must reproduce every
    target exactly, and a beam should find the same outputs."""
    config, lr = OVERFIT[name]
    torch.manual_seed(0)
    model = build_model(config.replace(dropout=0.0))
    source, target_in, target_out = reversal_pairs()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(150):
        logits = model(source, target_in)
        wrong = (logits.argmax(-1) != target_out) & (target_out != 0)
        if not wrong.any():
            break  # before another step could change the model
        loss = F.cross_entropy(logits.flatten(0, 1), target_out.flatten(), ignore_index=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not wrong.any(), f"{name} did not fit the 32 pairs in 150 steps"
    expected = [row[row != 0].flip(0).tolist() for row in source]
    assert greedy_decode(model, source, max_len=8) == expected
    assert beam_search(model, source, beam_size=4, max_len=8) == expected
