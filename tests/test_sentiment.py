"""AttentionClassifier and the sentiment task: pooling through qkv.attention, overfitting a
tiny set, model-folder round trips, metrics and clear errors at inference."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from qkv.data.labeled import LabeledText, LabelSet
from qkv.models.classifier import (
    AttentionClassifier,
    AttentionPooling,
    ClassifierConfig,
    pooling_penalty,
)


def _random_ids(B: int, N: int, vocab: int, lengths: list[int]) -> torch.Tensor:
    ids = torch.randint(1, vocab, (B, N))
    for b, n in enumerate(lengths):
        ids[b, n:] = 0
    return ids


@pytest.mark.parametrize("encoder", ["bigru", "transformer"])
def test_pooling_weights_ignore_padding_and_sum_to_one(encoder: str) -> None:
    torch.manual_seed(0)
    config = ClassifierConfig.from_name(
        "tiny", vocab_size=50, num_classes=3, encoder=encoder, num_heads=2, pool_queries=2
    )
    model = AttentionClassifier(config).eval()
    ids = _random_ids(3, 9, 50, [9, 4, 1])
    out = model(ids)
    assert out.logits.shape == (3, 3) and out.weights.shape == (3, 2, 9)
    assert torch.allclose(out.weights.sum(-1), torch.ones(3, 2), atol=1e-5)
    assert out.weights[1, :, 4:].abs().max() == 0 and out.weights[2, :, 1:].abs().max() == 0
    # Padding is invisible: the same text padded further gives the same logits.
    longer = torch.cat([ids, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    assert torch.allclose(model(longer).logits, out.logits, atol=1e-5)


def test_pooling_equals_the_formula() -> None:
    torch.manual_seed(1)
    pool = AttentionPooling(input_dim=6, key_dim=4, num_queries=2)
    states = torch.randn(2, 5, 6)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    pooled, weights = pool(states, mask)
    scores = pool.queries @ torch.tanh(pool.key_proj(states)).transpose(1, 2)  # (2, r, N)
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    expected = torch.softmax(scores, -1)
    assert torch.allclose(weights, expected, atol=1e-6)
    assert torch.allclose(pooled, expected @ states, atol=1e-5)


def test_pooling_penalty_is_zero_for_disjoint_one_hot_rows() -> None:
    eye = torch.eye(3).unsqueeze(0)  # (1, r=3, N=3)
    assert float(pooling_penalty(eye)) == 0.0
    assert float(pooling_penalty(torch.full((1, 2, 4), 0.25))) > 0


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        ClassifierConfig(vocab_size=10, num_classes=1)
    with pytest.raises(ValueError, match=r"embed_dim \(30\) must be divisible by num_heads \(4\)"):
        ClassifierConfig(vocab_size=10, num_classes=2, encoder="transformer", embed_dim=30)
    with pytest.raises(ValueError, match="encoder must be"):
        ClassifierConfig(vocab_size=10, num_classes=2, encoder="lstm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown classifier preset"):
        ClassifierConfig.from_name("huge", vocab_size=10, num_classes=2)
    config = ClassifierConfig.from_name("bigru-small", vocab_size=99, num_classes=4)
    assert ClassifierConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    model = AttentionClassifier(config)
    with pytest.raises(ValueError, match=r"ids must be \(B, N\)"):
        model(torch.ones(3, dtype=torch.long))
    with pytest.raises(TypeError, match="ids must be an int64"):
        model(torch.ones(1, 3))


TINY = [
    LabeledText("a wonderful moving film", "pos"),
    LabeledText("brilliant and wonderful acting", "pos"),
    LabeledText("I loved it , superb", "pos"),
    LabeledText("a dull boring mess", "neg"),
    LabeledText("awful , boring and far too long", "neg"),
    LabeledText("I hated it , terrible", "neg"),
    LabeledText("an okay film , nothing more", "meh"),
    LabeledText("fine I guess , average", "meh"),
]


@pytest.mark.parametrize("encoder", ["bigru", "transformer"])
def test_tiny_set_overfits(encoder: str) -> None:
    pytest.importorskip("tokenizers")
    from qkv.data.tokenizer import TextTokenizer
    from qkv.tasks.sentiment import LabeledDataset, SentimentTask, collate_labeled

    torch.manual_seed(0)
    tokenizer = TextTokenizer.train([e.text for e in TINY], mode="bpe", vocab_size=300)
    labels = LabelSet.from_examples(TINY)
    data = LabeledDataset.from_examples(TINY, tokenizer, labels, max_length=None)
    config = ClassifierConfig.from_name(
        "tiny", vocab_size=tokenizer.vocab_size, num_classes=3, encoder=encoder, num_heads=2
    )
    model = AttentionClassifier(config)
    task = SentimentTask(data, labels, batch_size=8)
    batch = collate_labeled([data[i] for i in range(len(data))])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        out = task.loss(model, batch)
        optimizer.zero_grad()
        (out.total / out.count).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        metrics = task.validate(model)
    assert metrics["accuracy"] == 1.0 and metrics["macro_f1"] == 1.0


def test_head_tail_keeps_both_ends() -> None:
    from qkv.tasks.sentiment import head_tail

    assert head_tail(list(range(10)), 4) == [0, 1, 8, 9]
    assert head_tail(list(range(10)), 5) == [0, 1, 7, 8, 9]
    assert head_tail([1, 2], 4) == [1, 2]
    assert head_tail([1, 2], None) == [1, 2]


def test_metrics_match_hand_counts() -> None:
    pytest.importorskip("sklearn")
    from qkv.tasks.sentiment import classification_metrics

    labels = LabelSet(["a", "b", "c"])
    m = classification_metrics([0, 0, 1, 2], [0, 1, 1, 1], labels)
    assert m["accuracy"] == 0.5
    assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    # F1: a = 2/3, b = 2 * (1/3 * 1) / (1/3 + 1) = 0.5, c = 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)


@pytest.mark.slow
def test_train_save_load_classify_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    pytest.importorskip("sklearn")
    from qkv.tasks.sentiment import (
        SentimentSetup,
        TextClassifier,
        evaluate_classifier,
    )
    from qkv.train import TrainConfig

    data = tmp_path / "reviews.csv"
    rows = ["review,stars"] + [f'"{e.text}",{e.label}' for e in TINY * 4]
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "model"
    setup = SentimentSetup(
        preset="tiny",
        vocab_size=300,
        batch_size=8,
        data_options={
            "text_column": "review",
            "label_column": "stars",
            "validation": 0.0,
            "test": 0.0,
        },
    )
    train = TrainConfig(lr=1e-2, max_steps=30, eval_every=30, warmup_steps=0, device="cpu")
    from qkv.tasks import train_task

    result = train_task("sentiment", replace(setup, data=str(data)), train, out).result
    assert result.state.step == 30
    classifier = TextClassifier.load(out)
    again = TextClassifier.load(out)
    texts = ["a wonderful moving film", "I hated it , terrible"]
    first, second = classifier.classify(texts), again.classify(texts)
    assert [p.label for p in first] == ["pos", "neg"]
    assert first[0].probabilities == second[0].probabilities
    assert sum(first[0].probabilities.values()) == pytest.approx(1.0)
    assert len(first[0].tokens) == len(first[0].weights)
    assert sum(first[0].weights) == pytest.approx(1.0, abs=1e-5)
    metrics = evaluate_classifier(classifier, TINY)
    assert metrics["accuracy"] == 1.0 and metrics["confusion"][0][0] == 2  # two "meh" texts
    with pytest.raises(ValueError, match="text 1 is empty"):
        classifier.classify(["fine", "  "])
    with pytest.raises(
        ValueError, match=r"unknown label 'great'; this model knows 'meh', 'neg', 'pos'"
    ):
        evaluate_classifier(classifier, [LabeledText("good", "great")])


def test_padded_bigru_equals_a_packed_bidirectional_gru() -> None:
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from qkv.models.classifier import PaddedBiGRU

    torch.manual_seed(2)
    ours = PaddedBiGRU(5, 7)
    packed_gru = nn.GRU(5, 7, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(packed_gru, name).copy_(getattr(ours.forward_gru, name))
            getattr(packed_gru, name + "_reverse").copy_(getattr(ours.backward_gru, name))
    x = torch.randn(3, 6, 5)
    lengths = torch.tensor([6, 2, 4])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    states, final = ours(x, mask)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, h = packed_gru(packed)
    expected, _ = pad_packed_sequence(out, batch_first=True, total_length=6)
    assert torch.allclose(states, expected, atol=1e-6)
    assert torch.allclose(final, torch.cat([h[0], h[1]], dim=-1), atol=1e-6)
