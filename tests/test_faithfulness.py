"""qkv.interpret.faithfulness on tiny classifiers: the metrics do what they claim."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from qkv.interpret import faithfulness as fa
from qkv.models.classifier import AttentionClassifier, ClassifierConfig


def tiny(encoder: str = "bigru", seed: int = 0, queries: int = 1) -> AttentionClassifier:
    torch.manual_seed(seed)
    config = ClassifierConfig(
        vocab_size=40,
        num_classes=2,
        encoder=encoder,  # type: ignore[arg-type]
        embed_dim=16,
        hidden_dim=16,
        num_layers=2,
        num_heads=2,
        pool_queries=queries,
        pool_dim=16,
        dropout=0.0,
    )
    return AttentionClassifier(config).eval()


def text(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 40, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("encoder", "queries"), [("bigru", 1), ("bigru", 3), ("transformer", 2)])
def test_the_pieces_reproduce_the_model(encoder: str, queries: int) -> None:
    model = tiny(encoder, queries=queries)
    ids = text(9, seed=1)
    mask = torch.ones(1, 9, dtype=torch.bool)
    out = model(ids[None])
    with torch.no_grad():
        states = fa.encode(model, model.embed(ids[None]), mask)
        weights = fa.pooling_weights(model, states, mask)
        logits = fa.pooled_logits(model, states, weights)
    torch.testing.assert_close(weights, out.weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fa.attention_importance(model, ids), out.weights[0].mean(0))


def test_rollout_importance_is_a_distribution_and_needs_a_transformer() -> None:
    model = tiny("transformer")
    ids = text(7, seed=2)
    layers = fa.self_attention(model, ids)
    assert len(layers) == 2 and layers[0].shape == (1, 2, 7, 7)
    rollout = fa.rollout_importance(model, ids)
    assert rollout.shape == (7,) and float(rollout.sum()) == pytest.approx(1.0, abs=1e-5)
    # Not the pooling weights themselves: the encoder's mixing moved them.
    assert not torch.allclose(rollout, fa.attention_importance(model, ids), atol=1e-3)
    with pytest.raises(ValueError, match="Transformer encoder"):
        fa.rollout_importance(tiny("bigru"), ids)


def test_kendall_tau_matches_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        a = torch.randint(0, 5, (30,), generator=generator).float()  # many ties
        b = a + torch.randn(30, generator=generator) * 2
        assert fa.kendall_tau(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-9)
    x = torch.randn(10, generator=generator)
    assert fa.kendall_tau(x, 2 * x + 1) == pytest.approx(1.0)
    assert fa.kendall_tau(x, -x) == pytest.approx(-1.0)
    assert fa.kendall_tau(torch.ones(10), x) == 0.0  # constant: no order, no agreement
    with pytest.raises(ValueError, match="one length"):
        fa.kendall_tau(x, x[:5])


def test_integrated_gradients_are_complete() -> None:
    model = tiny("bigru", seed=4)
    ids = text(8, seed=4)
    attribution = fa.integrated_gradients(model, ids, steps=256, signed=True)
    y = int(fa.predict(model, [ids])[0].argmax())
    mask = torch.ones(1, 8, dtype=torch.bool)
    with torch.no_grad():
        full = fa._logits(model, model.embed(ids[None]), mask)[0, y]
        zero = fa._logits(model, torch.zeros(1, 8, 16), mask)[0, y]
    assert float(attribution.sum()) == pytest.approx(float(full - zero), rel=1e-2, abs=1e-3)
    assert torch.equal(fa.integrated_gradients(model, ids, steps=256), attribution.abs())


def test_leave_one_out_and_gradient_agree_with_direct_computation() -> None:
    model = tiny("transformer", seed=5)
    ids = text(6, seed=5)
    loo = fa.leave_one_out(model, ids)
    probs = fa.predict(model, [ids])[0]
    y = int(probs.argmax())
    without_2 = fa.predict(model, [torch.cat([ids[:2], ids[3:]])])[0]
    assert float(loo[2]) == pytest.approx(float(probs[y] - without_2[y]), abs=1e-6)
    # The gradient norm, by finite differences along the gradient's own direction.
    saliency = fa.gradient_importance(model, ids)
    assert saliency.shape == (6,) and bool((saliency > 0).all())


def test_erasing_every_token_changes_the_prediction() -> None:
    model = tiny("bigru", seed=6)
    with torch.no_grad():
        model.head.weight.mul_(200.0)  # the text decides...
        model.head.bias.copy_(torch.tensor([4.0, 0.0]))  # ...and an empty text reads class 0
    empty = torch.tensor([4.0, 0.0]).softmax(0)
    texts = [text(6, seed=s) for s in range(40)]
    positive = [t for t in texts if int(fa.predict(model, [t])[0].argmax()) == 1]
    assert positive, "no text of the tiny model reads class 1"
    ids = positive[0]
    result = fa.erasure_test(model, ids, torch.arange(6))
    p = fa.predict(model, [ids])[0]
    assert result.flipped == 1.0
    assert result.drop == pytest.approx(float(p[1] - empty[1]), abs=1e-6)
    assert fa.erasure_test(model, ids, []).drop == 0.0  # erasing nothing changes nothing


def test_uniform_attention_does_not_correlate_with_erasure() -> None:
    model = tiny("bigru", seed=7)
    with torch.no_grad():
        model.pool.queries.zero_()  # every score 0: the pooling weights are uniform
    ids = text(10, seed=7)
    attention = fa.attention_importance(model, ids)
    torch.testing.assert_close(attention, torch.full((10,), 0.1))
    loo = fa.leave_one_out(model, ids)
    assert float(loo.std()) > 0  # erasure does rank the tokens...
    assert fa.kendall_tau(attention, loo) == 0.0  # ...and the uniform attention says nothing
    assert fa.permutation_test(model, ids) == pytest.approx(0.0, abs=1e-7)


def test_adversarial_attention_stays_within_the_output_budget() -> None:
    model = tiny("bigru", seed=8)
    ids = text(12, seed=8)
    jsd, weights = fa.adversarial_attention(model, ids, epsilon=0.01, steps=60, restarts=2)
    assert weights.shape == (1, 12) and float(weights.sum()) == pytest.approx(1.0, abs=1e-5)
    mask = torch.ones(1, 12, dtype=torch.bool)
    with torch.no_grad():
        states = fa.encode(model, model.embed(ids[None]), mask)
        own = fa.pooling_weights(model, states, mask)
        base = fa.pooled_logits(model, states, own).softmax(-1)
        moved = fa.pooled_logits(model, states, weights[None]).softmax(-1)
    assert float(fa._tvd(moved, base)) <= 0.01 + 1e-6
    assert jsd == pytest.approx(float(fa._jsd(weights[None], own)), abs=1e-5)
    assert 0.0 <= jsd <= math.log(2) + 1e-6


def test_a_model_that_ignores_its_attention_lets_the_adversary_go_anywhere() -> None:
    model = tiny("bigru", seed=9)
    with torch.no_grad():
        model.head.weight.zero_()  # the output no longer depends on the pooled vector
    ids = text(12, seed=9)
    jsd, _ = fa.adversarial_attention(model, ids, steps=80, restarts=2)
    # Unconstrained, the farthest weights put all their mass on one token: the best such JSD.
    _, own = fa._states_and_weights(model, ids)
    farthest = max(float(fa._jsd(torch.eye(12)[j].view(1, 1, 12), own)) for j in range(12))
    assert jsd == pytest.approx(farthest, rel=1e-2) and jsd > 0.5
    assert fa.permutation_test(model, ids) == 0.0


def test_report_on_tiny_models(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    texts = [text(n, seed=n) for n in (5, 8, 3)]
    for encoder in ("bigru", "transformer"):
        report = fa.faithfulness_report(
            tiny(encoder, seed=10), texts, [0, 1, 1], ks=(1, 4), adversary_steps=10
        )
        assert report.examples == 3 and report.mean_tokens == pytest.approx(16 / 3)
        assert ("rollout" in report.tau) == (encoder == "transformer")
        assert report.erasure[4]["random"]["texts"] == 2.0  # the 3-token text is too short
        for row in report.tau.values():
            for mean, std in row.values():
                assert -1.0 <= mean <= 1.0 and std >= 0.0
        table = report.table("tiny")
        assert "| attention |" in table and "k random" in table and "Adversarial" in table
        json.dumps(report.to_dict())
        from qkv.viz import save_figure

        path = save_figure(report.figure("tiny"), tmp_path / f"{encoder}.png")
        assert path.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        (torch.tensor([[1, 2]]), ValueError, r"\(n,\)"),
        (torch.tensor([1, 0, 2]), ValueError, "padding id 0"),
        (torch.tensor([1.0, 2.0]), TypeError, "int64"),
    ],
)
def test_bad_ids_are_rejected(ids: torch.Tensor, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        fa.leave_one_out(tiny(), ids)


def test_report_rejects_a_non_classifier() -> None:
    with pytest.raises(TypeError, match="AttentionClassifier"):
        fa.faithfulness_report(torch.nn.Linear(2, 2), [text(3)])  # type: ignore[arg-type]


@pytest.mark.slow
def test_cli_report_of_a_trained_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    pytest.importorskip("matplotlib")
    from qkv.cli.main import main

    good, bad = (
        ["wonderful", "brilliant", "moving", "gorgeous"],
        ["dull", "boring", "awful", "flat"],
    )
    rows = [
        (f"a {a} and {b} film number {i}", label)
        for i in range(5)
        for words, label in ((good, "pos"), (bad, "neg"))
        for a in words
        for b in words
    ]  # 160 distinct texts: the file's carved test split is not empty
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    out = tmp_path / "model"
    code = main(
        ["train", "sentiment", "--data", str(data), "--preset", "tiny", "--vocab-size", "200",
         "--out", str(out), "--steps", "10", "--warmup", "0", "--eval-every", "10",
         "--device", "cpu", "--quiet"]
    )  # fmt: skip
    assert code == 0
    capsys.readouterr()
    report = tmp_path / "report"
    code = main(["faithfulness", "--model", str(out), "--examples", "3", "--out", str(report)])
    printed = capsys.readouterr().out
    assert code == 0 and "| attention |" in printed and "Adversarial" in printed
    saved = json.loads((report / "faithfulness.json").read_text())
    assert saved["examples"] >= 1 and "leave_one_out" in saved["methods"]
    assert (report / "faithfulness.png").read_bytes().startswith(b"\x89PNG")
    assert (report / "faithfulness.md").read_text() in printed
    # Not a classifier: one line, non-zero exit.
    (tmp_path / "other").mkdir()
    assert main(["faithfulness", "--model", str(tmp_path / "other")]) != 0
