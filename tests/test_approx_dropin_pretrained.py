"""Drop-in approximations on a pretrained-layout classifier (tiny, random weights), without
retraining: the swap reaches every encoder layer, limits that make a method exact leave the
predictions alone, and the model is exact again afterwards."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from helpers import load_benchmark
from qkv.data.labeled import LabeledText, LabelSet
from qkv.models.pretrained import (
    PretrainedClassifier,
    PretrainedClassifierConfig,
    encode,
    load_pretrained,
)
from qkv.nn.multihead import MultiHeadAttention
from qkv.tasks.pretrained_sentiment import PretrainedTextClassifier
from toys import random_hf_folder as _random_hf_folder

lab = load_benchmark("approx_lab")
LabSizes, dropin_accuracy, format_tables, pretrained_dropin, run_lab = (
    lab.LabSizes,
    lab.dropin_accuracy,
    lab.format_tables,
    lab.pretrained_dropin,
    lab.run_lab,
)


@pytest.fixture()
def tiny(tmp_path):
    """A random 2-layer classifier, and 24 texts labelled with its own exact predictions (so
    exact attention scores 1.0 and any change of prediction shows)."""
    folder, _ = _random_hf_folder(tmp_path / "encoder")
    encoder, tokenizer = load_pretrained(folder)
    with torch.no_grad():  # sharper attention than the random init's near-uniform rows
        for module in encoder.modules():
            if isinstance(module, MultiHeadAttention):
                module.q_proj.weight.mul_(8.0)
    config = PretrainedClassifierConfig(
        encoder=encoder.config.to_dict(), num_classes=2, dropout=0.0
    )
    torch.manual_seed(3)
    model = PretrainedClassifier(config, encoder).eval()
    classifier = PretrainedTextClassifier(model, tokenizer, LabelSet(["neg", "pos"]), 24)
    pick = random.Random(0)
    texts = [
        " ".join(f"w{pick.randrange(38)}" for _ in range(pick.randint(3, 12))) for _ in range(24)
    ]
    predictions = classifier.classify(texts)
    examples = [LabeledText(t, p.label) for t, p in zip(texts, predictions, strict=True)]
    return classifier, examples


def _logits(classifier, texts):
    ids, mask = encode(classifier.tokenizer, texts, max_length=24)
    with torch.no_grad():
        return classifier.model(ids, mask).logits


def test_the_encoder_attention_is_swappable(tiny):
    classifier, _ = tiny
    layers = [m for m in classifier.model.modules() if isinstance(m, MultiHeadAttention)]
    assert len(layers) == classifier.model.encoder.config.num_hidden_layers == 2


def test_dropin_changes_the_logits_only_where_the_method_is_inexact(tiny):
    classifier, examples = tiny
    texts = [e.text for e in examples]
    exact = _logits(classifier, texts)

    def distance(model):  # the score: how far the logits moved from exact, relative
        return float((_logits(classifier, texts) - exact).norm() / exact.norm())

    methods = [("local", {"window": 64}), ("linear", {}), ("local", {"window": 1})]
    rows = dropin_accuracy(classifier.model, distance, methods)
    assert [(r["method"], r["options"]) for r in rows] == [("exact", {}), *methods]
    assert rows[0]["score"] == 0
    assert rows[1]["score"] < 1e-5  # a window covering every key is exact attention
    # post-LayerNorm and mean pooling damp what reaches the logits; still 100x above exact
    assert rows[2]["score"] > 1e-3 and rows[3]["score"] > 1e-3, rows
    torch.testing.assert_close(_logits(classifier, texts), exact, rtol=0, atol=0)  # restored


def test_pretrained_dropin_reports_accuracy_and_change(tiny):
    classifier, examples = tiny
    methods = [("local", {"window": 64}), ("performer", {"num_features": 4}), ("linear", {})]
    rows = pretrained_dropin(classifier, examples, methods)
    assert rows[0] == {"method": "exact", "options": {}, "score": 1.0, "change": 0.0}
    assert rows[1]["score"] == 1.0
    for r in rows:
        assert 0.0 <= r["score"] <= 1.0
        assert r["change"] == pytest.approx(r["score"] - 1.0)
    # a dict of settings (one per method) is accepted as before
    assert [r["method"] for r in pretrained_dropin(classifier, examples, {"linear": {}})] == [
        "exact",
        "linear",
    ]


def test_lab_table_of_a_pretrained_model_folder(tiny, tmp_path, monkeypatch):
    """``run_lab(model_folder=FOLDER)`` reads the folder and Rotten Tomatoes test; both replaced here by
    the tiny classifier and its texts, so what is checked is the plumbing and the table."""
    classifier, examples = tiny

    def rows(folder, limit, say):
        assert folder == tmp_path and limit == 7
        return pretrained_dropin(classifier, examples[:limit], [("linear", {})])

    monkeypatch.setattr(lab, "_pretrained_rows", rows)
    sizes = LabSizes(test_limit=7)
    result = run_lab(sizes, ["dropin"], model_folder=tmp_path)
    assert result.task == [] and result.dropin == []  # nothing trained
    table = format_tables(result)
    assert "Drop-in on the fine-tuned pretrained encoder" in table
    assert "7 sentences" in table and "| linear | - |" in table and "| exact | - | 1.000 |" in table


def test_command_line_refuses_a_missing_model_folder(tmp_path, capsys):
    code = lab.main(["--parts", "dropin", "--model", str(tmp_path / "nope")])
    assert code != 0
    err = capsys.readouterr().err
    assert "--model" in err and "is not a folder" in err and "Traceback" not in err
    assert lab.main(["--parts", "dropin", "--limit", "0"]) != 0
    assert "--limit must be >= 1" in capsys.readouterr().err
