"""``--explain`` on a mean-pooling pretrained classifier shows its encoder's attention (rollout
to the pooled output), not the flat 1/n weights of the mean."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from qkv.data.labeled import LabelSet
from qkv.models import load_pretrained
from qkv.models.pretrained import PretrainedClassifier, PretrainedClassifierConfig, encode
from qkv.tasks.pretrained_sentiment import PretrainedTextClassifier
from test_pretrained import _random_hf_folder


def _classifier(tmp_path: Path, pooling: str) -> PretrainedTextClassifier:
    folder, _ = _random_hf_folder(tmp_path / "encoder", std=0.3)
    encoder, tokenizer = load_pretrained(str(folder))
    config = PretrainedClassifierConfig(
        encoder=encoder.config.to_dict(),
        num_classes=2,
        pooling=pooling,  # type: ignore[arg-type]
    )
    model = PretrainedClassifier(config, encoder=encoder)
    return PretrainedTextClassifier(model, tokenizer, LabelSet(["neg", "pos"]), max_length=32)


def _rollout64(maps: list[torch.Tensor], n: int) -> torch.Tensor:
    """Abnar and Zuidema's rollout of one text's real tokens, in float64, written out."""
    result = torch.eye(n, dtype=torch.float64)
    for layer in maps:
        a = layer[0, :, :n, :n].double().mean(dim=0)  # (N, N)
        a = 0.5 * a + 0.5 * torch.eye(n, dtype=torch.float64)
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result


def test_mean_pooling_explains_with_the_encoders_rollout(tmp_path: Path) -> None:
    clf = _classifier(tmp_path, "mean")
    texts = ["w2 w9 w17 w30", "w4 w5"]  # two lengths: the second is padded in the batch
    predictions = clf.classify(texts)
    for text, p in zip(texts, predictions, strict=True):
        n = len(p.tokens)
        assert p.weights_kind == "attention rollout to the mean-pooled output"
        weights = torch.tensor(p.weights, dtype=torch.float64)
        assert weights.sum().item() == pytest.approx(1.0, abs=1e-5)
        assert weights.max() - weights.min() > 1e-3, "flat weights: the mean, not attention"
        ids, mask = encode(clf.tokenizer, [text], max_length=32)
        with torch.no_grad():
            maps = clf.model.encoder.attention_maps(ids, mask)
        want = torch.full((n,), 1.0 / n, dtype=torch.float64) @ _rollout64(maps, n)
        torch.testing.assert_close(weights, want, rtol=1e-4, atol=1e-5)


def test_attention_pooling_keeps_its_pooling_weights(tmp_path: Path) -> None:
    clf = _classifier(tmp_path, "attention")
    (p,) = clf.classify(["w2 w9 w17"])
    assert p.weights_kind == "attention pooling"
    ids, mask = encode(clf.tokenizer, ["w2 w9 w17"], max_length=32)
    with torch.no_grad():
        pooling = clf.model(ids, mask).weights.mean(dim=1)[0]
    torch.testing.assert_close(torch.tensor(p.weights), pooling.float())


def test_classify_explain_names_the_rollout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from qkv.cli.main import main
    from test_pretrained_sentiment import _train_cli, _write_three_classes

    folder, _ = _random_hf_folder(tmp_path / "encoder", std=None)
    data = tmp_path / "three.csv"
    _write_three_classes(data, rows=12)
    out = tmp_path / "model"
    assert _train_cli(data, out, folder, "--steps", "2", "--pooling", "mean") == 0
    capsys.readouterr()
    page = tmp_path / "page.html"
    argv = ["classify", "--model", str(out), "w2 w9 w17", "--explain", "--html", str(page)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "  attention rollout to the mean-pooled output: " in printed
    assert "shaded by attention rollout to the mean-pooled output" in page.read_text()
