"""qkv.viz without matplotlib: rollout, per-head statistics, token shading, the attention page."""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.viz import (
    HeadStats,
    attention_page,
    attention_rollout,
    head_stats,
    html_document,
    shade_tokens_ansi,
    shade_tokens_html,
    weights_from_qk,
    write_page,
)


def random_weights(*shape: int, seed: int = 0) -> torch.Tensor:
    """Fresh attention probabilities: softmax of random scores, rows sum to one."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).mul(2).softmax(dim=-1)


# --- rollout ---------------------------------------------------------------------------------


def test_rollout_hand_checked_two_tokens() -> None:
    # Every query attends only to token 0. With the residual: (A + I) / 2 = [[1, 0], [.5, .5]];
    # two such layers: [[1, 0], [.75, .25]].
    layer = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    one = attention_rollout([layer])
    two = attention_rollout([layer, layer])
    torch.testing.assert_close(one[0], torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    torch.testing.assert_close(two[0], torch.tensor([[1.0, 0.0], [0.75, 0.25]]))


def test_rollout_is_the_product_of_normalised_layers() -> None:
    layers = [random_weights(2, 3, 5, 5, seed=s) for s in range(3)]
    expected = torch.stack([torch.eye(5, dtype=torch.float64)] * 2)
    for weights in layers:
        step = 0.5 * weights.mean(dim=1) + 0.5 * torch.eye(5, dtype=torch.float64)
        expected = step @ expected
    got = attention_rollout(layers)
    assert got.shape == (2, 5, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)


def test_rollout_without_residual_is_the_plain_product_of_head_means() -> None:
    a, b = random_weights(1, 4, 6, 6, seed=1), random_weights(1, 2, 6, 6, seed=2)
    expected = b.mean(dim=1) @ a.mean(dim=1)
    torch.testing.assert_close(
        attention_rollout([a, b], residual=False), expected.float(), rtol=1e-5, atol=1e-6
    )


@settings(max_examples=25, deadline=None)
@given(
    layers=st.integers(1, 4),
    heads=st.integers(1, 3),
    n=st.integers(1, 7),
    reduce=st.sampled_from(["mean", "max", "min"]),
    residual=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rollout_rows_sum_to_one(
    layers: int, heads: int, n: int, reduce: str, residual: bool, seed: int
) -> None:
    stack = [random_weights(2, heads, n, n, seed=seed + i) for i in range(layers)]
    got = attention_rollout(stack, residual=residual, head_reduce=reduce)  # type: ignore[arg-type]
    assert bool((got >= 0).all())
    torch.testing.assert_close(got.sum(dim=-1), torch.ones(2, n), rtol=0, atol=1e-5)


def test_rollout_max_reduce_renormalises_the_head_maximum() -> None:
    weights = random_weights(1, 3, 4, 4, seed=3)
    merged = weights.amax(dim=1)
    expected = merged / merged.sum(dim=-1, keepdim=True)
    got = attention_rollout([weights], residual=False, head_reduce="max")
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)


def test_rollout_keeps_a_fully_masked_row_zero_without_residual() -> None:
    weights = random_weights(1, 2, 3, 3, seed=4)
    weights[:, :, 1] = 0.0
    got = attention_rollout([weights], residual=False)
    assert bool((got[0, 1] == 0).all()) and not bool(torch.isnan(got).any())


@pytest.mark.parametrize(
    ("layers", "kwargs", "message"),
    [
        ([], {}, "at least one"),
        ([torch.rand(2, 3, 4)], {}, r"\(B, H, N, N\)"),
        ([torch.rand(1, 2, 3, 4)], {}, "Nq == Nk"),
        ([random_weights(1, 2, 3, 3), random_weights(1, 2, 4, 4)], {}, "same B and N"),
        ([random_weights(1, 2, 3, 3) - 0.5], {}, "non-negative"),
        ([random_weights(1, 2, 3, 3)], {"head_reduce": "median"}, "head_reduce"),
    ],
)
def test_rollout_rejects_bad_input(layers: list[torch.Tensor], kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        attention_rollout(layers, **kwargs)


# --- per-head statistics ---------------------------------------------------------------------


def loop_stats(weights: torch.Tensor, offset: int) -> dict[str, torch.Tensor]:
    """The definitions written as plain loops over (b, h, i, j), skipping all-zero rows."""
    B, H, nq, nk = weights.shape
    out = {name: torch.zeros(B, H, dtype=torch.float64) for name in HeadStats.__annotations__}
    for b in range(B):
        for h in range(H):
            rows = [i for i in range(nq) if float(weights[b, h, i].sum()) > 0]
            for i in rows:
                p = [float(x) for x in weights[b, h, i]]
                out["entropy"][b, h] -= sum(x * math.log(x) for x in p if x > 0)
                out["max_weight"][b, h] += max(p)
                out["mean_distance"][b, h] += sum(x * abs(i + offset - j) for j, x in enumerate(p))
                out["diagonal_distance"][b, h] += sum(
                    x * abs(j / max(nk - 1, 1) - i / max(nq - 1, 1)) for j, x in enumerate(p)
                )
                out["first_token_weight"][b, h] += p[0]
            for name in out:
                out[name][b, h] /= max(len(rows), 1)
    return out


@pytest.mark.parametrize(("nq", "nk"), [(5, 5), (3, 7), (6, 2)])
def test_head_stats_match_loops(nq: int, nk: int) -> None:
    weights = random_weights(2, 3, nq, nk, seed=nq * 10 + nk)
    weights[1, 2, 0] = 0.0  # a fully masked query row, left out of the means
    stats = head_stats(weights)
    expected = loop_stats(weights, offset=nk - nq)
    for name, value in stats.as_dict().items():
        assert value.shape == (2, 3)
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-5, atol=1e-6)


def test_head_stats_three_d_input_and_offset() -> None:
    weights = random_weights(4, 6, 6, seed=7)
    stats = head_stats(weights, query_offset=2)
    expected = loop_stats(weights.unsqueeze(0), offset=2)
    assert stats.entropy.shape == (4,) and stats.num_heads == 4
    torch.testing.assert_close(
        stats.mean_distance.double(), expected["mean_distance"][0], rtol=1e-5, atol=1e-6
    )


def test_head_stats_extremes() -> None:
    n = 5
    uniform = torch.full((1, n, n), 1.0 / n)
    identity = torch.eye(n).unsqueeze(0)
    sink = torch.zeros(1, n, n)
    sink[..., 0] = 1.0
    stats = head_stats(torch.cat([uniform, identity, sink]))
    torch.testing.assert_close(
        stats.entropy, torch.tensor([math.log(n), 0.0, 0.0]), rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(stats.max_weight, torch.tensor([1.0 / n, 1.0, 1.0]))
    assert float(stats.mean_distance[1]) == 0.0 and float(stats.diagonal_distance[1]) == 0.0
    torch.testing.assert_close(stats.first_token_weight, torch.tensor([1.0 / n, 1.0 / n, 1.0]))


def test_head_stats_batch_mean_and_validation() -> None:
    stats = head_stats(random_weights(3, 2, 4, 4, seed=8))
    mean = stats.batch_mean()
    torch.testing.assert_close(mean.max_weight, stats.max_weight.mean(dim=0))
    with pytest.raises(ValueError, match="shape of entropy"):
        HeadStats(*([torch.zeros(3)] * 4), torch.zeros(4))
    with pytest.raises(ValueError, match=r"\(B, H, Nq, Nk\)"):
        head_stats(torch.rand(4, 4))
    with pytest.raises(ValueError, match="non-negative"):
        head_stats(torch.randn(2, 4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        head_stats(torch.ones(2, 4, 4, dtype=torch.long))


# --- token shading ---------------------------------------------------------------------------

ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")


def test_ansi_truecolor_shades_the_heaviest_token_fully() -> None:
    tokens = ["a", "great", "film", "!"]
    weights = torch.rand(4, generator=torch.Generator().manual_seed(9)) + 0.05
    text = shade_tokens_ansi(tokens, weights)
    assert ANSI_CODE.sub("", text) == "a great film !"
    assert text.count("\x1b[0m") == 4
    heaviest = tokens[int(weights.argmax())]
    assert f"\x1b[48;2;230;85;13m\x1b[38;2;0;0;0m{heaviest}\x1b[0m" in text


def test_ansi_256_colours_stay_in_the_colour_cube() -> None:
    text = shade_tokens_ansi(["x", "y", "z"], torch.tensor([0.0, 0.3, 0.9]), truecolor=False)
    codes = [int(c) for c in re.findall(r"\x1b\[48;5;(\d+)m", text)]
    assert len(codes) == 3 and all(16 <= c <= 231 for c in codes)
    assert codes[0] == 231  # weight 0 is white


def test_ansi_neutralises_control_characters_in_tokens() -> None:
    text = shade_tokens_ansi(["ok", "\x1b[2J", "new\nline"], torch.tensor([0.2, 0.5, 0.3]))
    assert "\x1b[2J" not in text and "\n" not in text
    assert "\\x1b[2J" in ANSI_CODE.sub("", text) and "new\\nline" in text


def test_html_escapes_tokens_and_label() -> None:
    tokens = ["<script>alert(1)</script>", "a & b", '"quoted"']
    page = shade_tokens_html(tokens, torch.tensor([0.7, 0.2, 0.1]), label="<b>positive</b> 0.93")
    assert "<script>" not in page and "</script>" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a &amp; b" in page and "&quot;quoted&quot;" in page
    assert page.startswith("<!DOCTYPE html>") and page.count('class="tok"') == 3
    assert not re.search(r"https?://|src=|<link", page)
    assert 'title="0.7000"' in page and "background:rgb(230,85,13)" in page


def test_html_fragments_combine_into_one_document() -> None:
    parts = [
        shade_tokens_html(["a", "b"], torch.tensor([0.4, 0.6]), document=False, label=f"#{i}")
        for i in range(3)
    ]
    assert all(p.startswith('<div class="shaded">') for p in parts)
    page = html_document(parts, title="reviews <1>")
    assert page.count('class="shaded"') == 3 and "<title>reviews &lt;1&gt;</title>" in page


@pytest.mark.parametrize(
    ("tokens", "weights", "error", "message"),
    [
        (["a", "b"], torch.tensor([0.5, 0.3, 0.2]), ValueError, "2 tokens"),
        (["a", "b"], torch.tensor([0.5, -0.1]), ValueError, "non-negative"),
        (["a", "b"], torch.tensor([[0.5, 0.5]]), ValueError, r"\(N,\)"),
        (["a", 3], torch.tensor([0.5, 0.5]), TypeError, r"tokens\[1\]"),
        ("ab", torch.tensor([0.5, 0.5]), TypeError, "one string"),
        (["a", "b"], torch.tensor([0.5, float("nan")]), ValueError, "finite"),
    ],
)
def test_shading_rejects_bad_input(
    tokens: list, weights: torch.Tensor, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        shade_tokens_ansi(tokens, weights)
    with pytest.raises(error, match=message):
        shade_tokens_html(tokens, weights)


# --- the interactive page --------------------------------------------------------------------


def page_data(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="qkv-data">(.*?)</script>', page, re.S)
    assert match is not None
    return json.loads(match.group(1))


def decode_map(data: dict, layer: int, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The page's ``(overview, top-k index, top-k weight)`` of one map, as the page reads them."""
    entry = data["layers"][layer]["maps"][m]
    bq, bk = data["bins"]
    levels = torch.tensor(list(base64.b64decode(entry["map"])), dtype=torch.float64)
    overview = levels.view(bq, bk) / 255 * entry["scale"]
    width = "<u4" if data["indexBytes"] == 4 else "<u2"
    index = torch.tensor(np.frombuffer(base64.b64decode(entry["index"]), width).astype(np.int64))
    value = torch.tensor(np.frombuffer(base64.b64decode(entry["value"]), "<f2").astype(np.float64))
    return overview, index.view(data["nq"], -1), value.view(data["nq"], -1)


def block_means(weights: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(Nq, Nk)`` averaged over blocks of ``size`` rows and columns (short last blocks)."""
    rows = torch.stack([b.mean(dim=0) for b in weights.split(size[0], dim=0)])
    return torch.stack([b.mean(dim=1) for b in rows.split(size[1], dim=1)], dim=1)


def test_page_embeds_the_weights_and_tokens() -> None:
    layers = {"enc 0": random_weights(2, 3, 4, seed=10), "cross <0>": random_weights(4, 3, 4)}
    source, target = ["le", "chat", "</script><script>alert(1)", "."], ["the", "cat", "."]
    page = attention_page(layers, source, target, title="fr -> en", top_k=2)
    data = page_data(page)
    assert [layer["name"] for layer in data["layers"]] == ["enc 0", "cross <0>"]
    assert data["source"] == source and data["target"] == target
    for i, weights in enumerate(layers.values()):
        labels = [m["label"] for m in data["layers"][i]["maps"]]
        heads = weights.shape[0]
        # The head mean comes first: it is what the page opens on.
        assert labels == [f"mean of {heads} heads"] + [f"head {h}" for h in range(heads)]
        for m, expected in enumerate([weights.mean(dim=0), *weights]):
            overview, index, value = decode_map(data, i, m)
            # Small maps are stored whole, each cell to 1/255 of the largest.
            torch.testing.assert_close(overview, expected, rtol=0, atol=expected.max() / 510)
            top = expected.topk(2, dim=-1)
            assert torch.equal(index, top.indices)
            torch.testing.assert_close(value, top.values, rtol=1e-3, atol=1e-4)
    # Only the page's own three script elements close; the token cannot end one early.
    assert page.count("</script>") == 3 and page.count("<script") == 3
    assert "<title>fr -&gt; en</title>" in page


def test_page_downsamples_long_maps_to_block_means() -> None:
    weights = random_weights(3, 50, 70, seed=21)
    data = page_data(attention_page({"l": weights}, max_cells=16, top_k=5))
    assert data["bins"] == [13, 14] and data["blockSize"] == [4, 5]  # 50 rows: 12 x 4 + 2
    for m, expected in enumerate([weights.mean(dim=0), *weights]):
        overview, index, value = decode_map(data, 0, m)
        means = block_means(expected, (4, 5))
        torch.testing.assert_close(overview, means, rtol=0, atol=means.max() / 510)
        assert torch.equal(index, expected.topk(5, dim=-1).indices)
        torch.testing.assert_close(value, expected.topk(5).values, rtol=1e-3, atol=1e-5)


def test_a_single_head_layer_has_no_mean_entry() -> None:
    data = page_data(attention_page({"l": random_weights(1, 4, 6, seed=22)}))
    assert [m["label"] for m in data["layers"][0]["maps"]] == ["head 0"]


def test_weights_from_qk_match_attention_weights() -> None:
    generator = torch.Generator().manual_seed(23)
    q = torch.randn(1, 4, 37, 8, generator=generator)
    k = torch.randn(1, 2, 37, 8, generator=generator)  # grouped: 2 query heads per key head
    for causal in (False, True):
        lazy = weights_from_qk(q, k, causal=causal)
        expected = qkv.attention_weights(q, k, k, causal=causal)[0]  # (H, N, N)
        torch.testing.assert_close(lazy.rows(5, 20), expected[:, 5:20], rtol=1e-5, atol=1e-6)
        # The page built lazily, a block of rows at a time, holds the page of the tensor (float32
        # round-off may move a cell by one quantization level, so compare decoded values).
        a = page_data(attention_page({"l": lazy}, max_cells=8))
        b = page_data(attention_page({"l": expected}, max_cells=8))
        for m in range(5):
            for x, y in zip(decode_map(a, 0, m), decode_map(b, 0, m), strict=True):
                torch.testing.assert_close(x, y, rtol=1e-2, atol=float(y.abs().max()) / 200)


def test_weights_from_qk_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="one example"):
        weights_from_qk(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4))
    with pytest.raises(ValueError, match="same D"):
        weights_from_qk(torch.randn(3, 5, 4), torch.randn(2, 5, 4))
    with pytest.raises(TypeError, match="q must be"):
        weights_from_qk([1.0], torch.randn(1, 5, 4))  # type: ignore[arg-type]


def test_page_is_self_contained() -> None:
    page = attention_page({"layer": random_weights(1, 3, 3, seed=11)})
    assert not re.search(r"https?:|//cdn|src=|<link|@import|url\(", page)
    assert page_data(page)["source"] == ["0", "1", "2"]


def test_write_page_writes_atomically(tmp_path: Path) -> None:
    path = write_page(tmp_path / "sub" / "attention.html", {"l": random_weights(2, 2, 5, seed=12)})
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in path.parent.iterdir()] == ["attention.html"]
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
    path.chmod(0o640)
    write_page(path, {"l": random_weights(1, 2, 2, seed=13)})
    assert path.stat().st_mode & 0o777 == 0o640  # a replaced file keeps its mode


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ({}, "non-empty"),
        ({"a": random_weights(2, 3, 4), "b": random_weights(2, 4, 4)}, "same"),
        ({"a": random_weights(3, 4)}, r"\(H, Nq, Nk\)"),
        ({"a": -random_weights(1, 3, 4)}, "non-negative"),
    ],
)
def test_page_rejects_bad_layers(layers: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        attention_page(layers)


def test_page_rejects_bad_sizes_and_layer_types() -> None:
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        attention_page({"a": random_weights(1, 3, 4)}, top_k=0)
    with pytest.raises(TypeError, match=r"layers\['a'\] must be an \(H, Nq, Nk\) tensor"):
        attention_page({"a": [[0.5, 0.5]]})  # type: ignore[dict-item]


def test_page_rejects_token_count_mismatch() -> None:
    with pytest.raises(ValueError, match="source_tokens has 2 tokens"):
        attention_page({"a": random_weights(1, 3, 4)}, ["x", "y"], ["a", "b", "c"])


def test_import_does_not_load_matplotlib_and_functions_do_not_print(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = "import sys, qkv.viz; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    weights = random_weights(2, 4, 4, seed=15)
    head_stats(weights)
    attention_rollout([weights.unsqueeze(0)])
    shade_tokens_ansi(list("abcd"), weights[0, 0])
    attention_page({"l": weights})
    assert capsys.readouterr() == ("", "")
