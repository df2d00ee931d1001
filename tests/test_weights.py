"""Weights on demand: selected heads and rows, entropy and top-k, against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import qkv
from gold import random_inputs
from qkv import masks, scores
from qkv.functional import weights as W


def options(kind: str, B: int, Hq: int, Nq: int, Nk: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(Nq * 7 + Nk)
    if kind == "none":
        return {}
    if kind == "causal_window_alibi":
        return {
            "causal": "bottom_right",
            "mask": masks.sliding_window(40),
            "bias": scores.alibi(Hq),
        }
    if kind == "padding_softcap":
        lengths = torch.randint(1, Nk + 1, (B,), generator=g)
        return {"mask": masks.key_padding(lengths), "bias": scores.softcap(3.0)}
    if kind == "tensors":
        dense = torch.rand(B, 1, Nq, Nk, generator=g) < 0.6
        dense[:, :, 3] = False  # a row with nothing to attend
        return {"mask": dense, "bias": torch.randn(Hq, 1, Nk, generator=g, dtype=torch.float64)}
    if kind == "relative_documents":
        rel = scores.RelativePositionBias(Hq, max_distance=8)
        with torch.no_grad():
            rel.table.copy_(torch.randn(rel.table.shape, generator=g))
        ids = torch.sort(torch.randint(0, 3, (B, Nk), generator=g), dim=-1).values
        return {"mask": masks.document(ids[:, :Nq], ids), "bias": rel, "causal": True}
    raise AssertionError(kind)


KINDS = ["none", "causal_window_alibi", "padding_softcap", "tensors", "relative_documents"]


def reference_weights(q: Tensor, k: Tensor, v: Tensor, **kw: object) -> Tensor:
    _, w = qkv.attention(q, k, v, return_weights=True, backend="reference", **kw)  # type: ignore[call-overload]
    return w


@pytest.mark.parametrize("kind", KINDS)
def test_selected_heads_and_rows_equal_the_reference(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(W, "KEY_TILE", 16)  # many key tiles, a short last one
    B, Hq, Hkv, Nq, Nk = 2, 6, 2, 23, 75
    x = random_inputs(B, Hq, Hkv, Nq, Nk, 8, seed=5, non_contiguous=True).to(torch.float64)
    kw = options(kind, B, Hq, Nq, Nk)
    want = reference_weights(x.q, x.k, x.v, **kw)
    heads, rows = [5, 0, 3], torch.tensor([0, 3, 22, 7, 7])
    got = W.attention_weights(x.q, x.k, x.v, heads=heads, rows=rows, **kw)  # type: ignore[arg-type]
    assert got.shape == (B, 3, 5, Nk)
    torch.testing.assert_close(got, want[:, heads][:, :, rows], rtol=1e-12, atol=1e-12)
    everything = W.attention_weights(x.q, x.k, x.v, **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(everything, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_entropy_and_top_k_equal_those_of_the_reference_weights(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(W, "KEY_TILE", 16)
    monkeypatch.setattr(W, "ROW_BLOCK", 5)  # several row blocks
    B, Hq, Hkv, Nq, Nk = 2, 4, 4, 17, 50
    x = random_inputs(B, Hq, Hkv, Nq, Nk, 8, seed=6).to(torch.float64)
    kw = options(kind, B, Hq, Nq, Nk)
    want = reference_weights(x.q, x.k, x.v, **kw)  # (B, Hq, Nq, Nk)
    summary = W.attention_summary(x.q, x.k, x.v, top_k=4, **kw)  # type: ignore[arg-type]
    logs = torch.where(want > 0, want.log(), 0.0)
    torch.testing.assert_close(summary.entropy, -(want * logs).sum(-1), rtol=1e-10, atol=1e-10)
    top = want.topk(4, dim=-1)
    torch.testing.assert_close(summary.top_weights, top.values, rtol=1e-12, atol=1e-12)
    # Indices agree wherever the weight is positive (random scores: no ties).
    positive = top.values > 0
    assert torch.equal(summary.top_indices[positive], top.indices[positive])
    assert (summary.top_indices[~positive] == -1).all()
    picked = W.attention_summary(x.q, x.k, x.v, top_k=2, heads=1, rows=[16, 0], **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(picked.entropy, summary.entropy[:, 1:2][:, :, [16, 0]])
    assert picked.top_indices.shape == (B, 1, 2, 2)


def test_half_precision_inputs_keep_float32_statistics() -> None:
    x = random_inputs(1, 2, 1, 9, 40, 16, seed=7)
    got = W.attention_weights(x.q.half(), x.k.half(), x.v.half(), rows=[4], causal=True)
    want = reference_weights(x.q, x.k, x.v, causal=True)[:, :, [4]]
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-3)
    summary = W.attention_summary(x.q.half(), x.k.half(), x.v.half(), top_k=3)
    assert summary.entropy.dtype == torch.float32


def test_selection_errors_name_the_argument() -> None:
    x = random_inputs(1, 2, 2, 4, 6, 8, seed=8)
    with pytest.raises(ValueError, match=r"heads must lie in \[0, 2\); got \[2\]"):
        W.attention_weights(x.q, x.k, x.v, heads=2)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 4\); got \[-1\]"):
        W.attention_weights(x.q, x.k, x.v, rows=[-1])
    with pytest.raises(TypeError, match="rows must be an int"):
        W.attention_weights(x.q, x.k, x.v, rows=[0.5])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, Nk = 6\]; got 7"):
        W.attention_summary(x.q, x.k, x.v, top_k=7)


@pytest.mark.parametrize(
    ("selection", "picked"),
    [
        (slice(0, 5), [0, 1, 2, 3, 4]),
        (slice(-3, None), [9, 10, 11]),
        (slice(None, None, 4), [0, 4, 8]),
        (slice(10, 99), [10, 11]),
        (range(2, 7, 2), [2, 4, 6]),
    ],
)
def test_rows_and_heads_accept_slices_and_ranges(
    selection: slice | range, picked: list[int]
) -> None:
    x = random_inputs(2, 4, 2, 12, 9, 8, seed=11)
    want = reference_weights(x.q, x.k, x.v, causal=True)
    got = W.attention_weights(x.q, x.k, x.v, rows=selection, causal=True)
    torch.testing.assert_close(got, want[:, :, picked], rtol=1e-12, atol=1e-12)
    heads = W.attention_weights(x.q, x.k, x.v, heads=slice(1, 3), rows=selection, causal=True)
    torch.testing.assert_close(heads, want[:, 1:3][:, :, picked], rtol=1e-12, atol=1e-12)


def test_a_selection_of_another_type_is_a_type_error_naming_it() -> None:
    x = random_inputs(1, 2, 2, 4, 6, 8, seed=8)
    with pytest.raises(TypeError, match=r"rows must be an int, a slice, a range.*got str"):
        W.attention_weights(x.q, x.k, x.v, rows="0:3")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"heads must be .*got dict"):
        W.attention_summary(x.q, x.k, x.v, heads={0: 1})  # type: ignore[arg-type]
