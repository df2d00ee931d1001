"""The backend registry, `auto` selection and `explain`."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import qkv
from qkv import backends, scores
from qkv.request import AttentionRequest


def inputs() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, 2, 4, 8, generator=g),
        torch.randn(1, 2, 6, 8, generator=g),
        torch.randn(1, 2, 6, 8, generator=g),
    )


def test_auto_prefers_sdpa_and_falls_back_to_reference() -> None:
    q, k, v = inputs()
    assert qkv.explain(q, k, v).chosen == "sdpa"
    explanation = qkv.explain(q, k, v, return_weights=True)
    assert explanation.chosen == "reference"
    assert "SDPA does not return the attention probabilities" in str(explanation)
    assert "sdpa" in explanation.reasons and explanation.reasons["sdpa"] is not None


def test_explain_names_the_call() -> None:
    q, k, v = inputs()
    text = str(
        qkv.explain(
            q,
            k,
            v,
            causal="bottom_right",
            mask=qkv.masks.sliding_window(2),
            bias=scores.softcap(4.0),
        )
    )
    assert "q (1, 2, 4, 8)" in text and "causal=bottom_right" in text
    assert "sliding_window(left=2, right=0)" in text and "softcap(4.0)" in text


class DoubledReference:
    """A user backend: the reference output times two, to prove it ran."""

    name = "doubled"

    def __init__(self) -> None:
        self.calls = 0

    def supports(self, request: AttentionRequest) -> str | None:
        return None if request.causal is None else "this toy backend knows no causal masks"

    def forward(self, request: AttentionRequest) -> tuple[Tensor, Tensor | None]:
        self.calls += 1
        out, weights = backends.get_backend("reference").forward(request)
        return out * 2, weights


def test_user_backend_registration_named_and_auto() -> None:
    q, k, v = inputs()
    toy = DoubledReference()
    qkv.register_backend(toy)
    try:
        want = qkv.attention(q, k, v, backend="reference")
        torch.testing.assert_close(qkv.attention(q, k, v, backend="doubled"), want * 2)
        assert qkv.explain(q, k, v).chosen == "sdpa"  # not in auto unless asked
        qkv.register_backend(toy, auto_priority=0, replace=True)
        assert qkv.explain(q, k, v).chosen == "doubled"
        assert qkv.explain(q, k, v, causal=True).chosen == "sdpa"
        assert (
            qkv.explain(q, k, v, causal=True).reasons["doubled"]
            == "this toy backend knows no causal masks"
        )
        with pytest.raises(ValueError, match="already registered"):
            qkv.register_backend(toy)
        with pytest.raises(ValueError, match="this toy backend knows no causal masks"):
            qkv.attention(q, k, v, causal=True, backend="doubled")
        assert toy.calls == 1
    finally:
        backends.unregister_backend("doubled")
    assert "doubled" not in qkv.available_backends() and "doubled" not in backends.AUTO_ORDER


def test_register_rejects_non_backends() -> None:
    with pytest.raises(
        TypeError, match=r"backend must have name, supports\(\) and forward\(\); got object"
    ):
        qkv.register_backend(object())  # type: ignore[arg-type]
