"""The head finder (qkv.interpret.heads) and the decoder pictures (qkv.viz.decoder)."""

from __future__ import annotations

import json

import pytest
import torch

from qkv.interpret.heads import (
    find_heads,
    induction_scores,
    previous_token_scores,
    repeated_random_tokens,
    sink_scores,
)
from qkv.models.pretrained import LlamaConfig, LlamaDecoder
from qkv.models.pretrained.decoder import hf_llama_tensor_names
from qkv.viz.decoder import decoder_pictures

N, T = 12, 5


def _pattern(n: int, key_of) -> torch.Tensor:
    """``(n, n)`` causal weights putting all of row ``i``'s weight on ``key_of(i)``."""
    a = torch.zeros(n, n)
    for i in range(n):
        a[i, key_of(i)] = 1.0
    return a


def _uniform_causal(n: int) -> torch.Tensor:
    return torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1).view(n, 1)


def _maps() -> list[torch.Tensor]:
    """Two layers, three heads: previous-token, sink, induction (period T) / uniform ..."""
    prev = _pattern(N, lambda i: max(i - 1, 0))
    sink = _pattern(N, lambda i: 0)
    induction = _pattern(N, lambda i: i - T + 1 if i >= T else 0)
    uniform = _uniform_causal(N)
    layer0 = torch.stack([prev, sink, induction])[None]  # (1, 3, N, N)
    layer1 = torch.stack([uniform, uniform, prev])[None]
    return [layer0, layer1]


def test_scores_of_known_patterns():
    maps = _maps()
    prev, sink, ind = previous_token_scores(maps), sink_scores(maps), induction_scores(maps, T)
    assert prev.shape == sink.shape == ind.shape == (2, 3)
    assert prev[0, 0] == 1 and sink[0, 1] == 1 and ind[0, 2] == 1
    # a uniform causal head: row i puts 1/(i+1) on each key
    expected = torch.tensor([1 / (i + 1) for i in range(1, N)]).mean()
    torch.testing.assert_close(prev[1, 0], expected)
    torch.testing.assert_close(sink[1, 1], expected)
    torch.testing.assert_close(ind[1, 0], torch.tensor([1 / (i + 1) for i in range(T, N)]).mean())
    assert sink[0, 0] == pytest.approx(1 / (N - 1))  # the prev head's query 1 looks at token 0
    assert ind[0, 0] == pytest.approx(0.0) and prev[0, 1] == pytest.approx(1 / (N - 1))


def test_score_errors_name_the_problem():
    with pytest.raises(ValueError, match="maps is empty"):
        sink_scores([])
    with pytest.raises(ValueError, match=r"maps\[1\] has shape"):
        sink_scores([torch.rand(1, 2, 4, 4), torch.rand(1, 3, 4, 4)])
    with pytest.raises(ValueError, match=r"period must be an int in \[1, N/2 = 6\]"):
        induction_scores(_maps(), 7)


def test_repeated_random_tokens():
    ids, offset = repeated_random_tokens(3, 20, low=100, high=200, seed=1, prefix=[7])
    assert ids.shape == (3, 41) and offset == 1 and bool((ids[:, 0] == 7).all())
    assert torch.equal(ids[:, 1:21], ids[:, 21:])
    assert all(len(set(row[1:21].tolist())) == 20 for row in ids)
    assert int(ids[:, 1:].min()) >= 100 and int(ids.max()) < 200


class _FakeModel:
    """Answers attention_maps with exact patterns: an induction head for any repeated input."""

    def attention_maps(self, ids: torch.Tensor) -> list[torch.Tensor]:
        b, n = ids.shape
        period = n // 2
        induction = _pattern(n, lambda i: i - period + 1 if i >= period else 0)
        prev = _pattern(n, lambda i: max(i - 1, 0))
        return [torch.stack([prev, induction])[None].expand(b, 2, n, n)]


def test_find_heads_runs_the_probes():
    scores = find_heads(_FakeModel(), torch.arange(10)[None], vocab_range=(50, 500), period=30)
    assert scores.top("induction", 1) == [(0, 1, 1.0)]
    assert scores.top("previous_token", 1) == [(0, 0, 1.0)]
    assert scores.count_above("induction", 0.5) == 1
    assert set(scores.to_dict()) == {"previous_token", "induction", "sink"}


def _tiny_decoder() -> LlamaDecoder:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=48,
        max_positions=256,
    )
    return LlamaDecoder(config).eval()


def test_find_heads_on_a_real_decoder_gives_scores_in_range():
    model = _tiny_decoder()
    scores = find_heads(model, torch.randint(3, 300, (1, 20)), vocab_range=(10, 300), period=16)
    for name in ("previous_token", "induction", "sink"):
        values = getattr(scores, name)
        assert values.shape == (2, 4) and bool(((values >= 0) & (values <= 1)).all())


def test_decoder_pictures_from_tensors(tmp_path):
    pytest.importorskip("matplotlib")
    maps = [m[0] for m in _maps()]  # (H, N, N) each
    tokens = [f"t{i}" for i in range(N)]
    scores = {"previous_token": [[1.0, 0.1, 0.0], [0.2, 0.2, 1.0]], "sink": [[0, 1, 0], [0, 0, 0]]}
    pictures = decoder_pictures(maps, tokens, tmp_path, layers=[1], head_scores=scores)
    names = {p.name for p in pictures.written}
    assert names == {
        "heads_layer1.png",
        "rollout.png",
        "head_stats.png",
        "heads.png",
        "heads.json",
        "attention.html",
        "summary.json",
    }
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["first_token_weight_per_layer"][0] == pytest.approx((1 + 11 + 4) / 33, abs=1e-3)
    assert json.loads((tmp_path / "heads.json").read_text()) == scores
    with pytest.raises(ValueError, match=r"layers \[2\] out of range"):
        decoder_pictures(maps, tokens, tmp_path, layers=[2], page_only=True)


def test_cli_viz_pretrained_on_a_decoder_folder(tmp_path, capsys):
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from qkv.cli.main import main

    model = _tiny_decoder()
    folder = tmp_path / "tiny"
    folder.mkdir()
    c = model.config
    params = dict(model.named_parameters())
    tensors = {
        hf: params[ours].detach().contiguous() for ours, hf in hf_llama_tensor_names(c).items()
    }
    save_file(tensors, str(folder / "model.safetensors"))
    config = {
        "model_type": "llama",
        "vocab_size": 300,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 48,
        "max_position_embeddings": 256,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_base,
        "tie_word_embeddings": True,
    }
    (folder / "config.json").write_text(json.dumps(config))
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.save(str(folder / "tokenizer.json"))
    out = tmp_path / "out"
    code = main(
        ["viz", "pretrained", str(folder), "attention", "--out", str(out), "--page-only", "--heads"]
    )
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, captured.err
    assert "9 tokens" in printed and "top induction heads: L" in printed
    assert {p.name for p in out.iterdir()} == {"attention.html", "summary.json", "heads.json"}
