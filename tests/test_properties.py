"""Property-based tests (hypothesis): random shapes, masks and biases, every backend."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.backends import available_backends, get_backend
from qkv.request import build_request


@st.composite
def attention_calls(draw: st.DrawFn) -> dict:  # type: ignore[type-arg]
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.integers(1, 3))
    Nq, Nk = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    D, Dv = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    call = {
        "q": torch.randn(B, Hq, Nq, D, generator=g, dtype=torch.float64),
        "k": torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64),
        "v": torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=torch.float64),
        "causal": draw(st.sampled_from([False, "top_left", "bottom_right"])),
    }
    if draw(st.booleans()):
        shape = draw(st.sampled_from([(Nq, Nk), (B, 1, Nq, Nk), (1, Hq, 1, Nk), (B, Hq, Nq, Nk)]))
        call["mask"] = torch.rand(shape, generator=g) < draw(st.floats(0.0, 1.0))
    if draw(st.booleans()):
        shape = draw(st.sampled_from([(Nq, Nk), (1, Hq, Nq, Nk), (B, 1, 1, Nk)]))
        call["bias"] = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    call["scale"] = draw(st.one_of(st.none(), st.floats(0.01, 2.0)))
    return call


@settings(max_examples=150, deadline=None)
@given(attention_calls())
def test_backends_agree_and_weights_are_distributions(call: dict) -> None:  # type: ignore[type-arg]
    out, weights = qkv.attention(**call, return_weights=True, backend="reference")
    sums = weights.sum(-1)
    attended = weights.gt(0).any(-1)
    # Each row is a probability distribution, or all zeros (with a zero output) if fully masked.
    torch.testing.assert_close(sums[attended], torch.ones_like(sums[attended]))
    assert torch.equal(out[~attended], torch.zeros_like(out[~attended]))
    # Masked keys get exactly zero weight.
    request = build_request(**call)
    mask = request.mask_tile(request.full_q, request.full_kv)
    if mask is not None:
        assert torch.equal(
            weights[~mask.expand_as(weights)], torch.zeros_like(weights[~mask.expand_as(weights)])
        )
    for name in available_backends():
        if get_backend(name).supports(request) is None:
            torch.testing.assert_close(
                qkv.attention(**call, backend=name), out, rtol=1e-10, atol=1e-10
            )


@settings(max_examples=60, deadline=None)
@given(attention_calls())
def test_output_is_convex_combination_of_values(call: dict) -> None:  # type: ignore[type-arg]
    # Every output row lies within the per-column range of the values its head can see.
    out = qkv.attention(**call)
    G = call["q"].shape[1] // call["k"].shape[1]
    v = call["v"].repeat_interleave(G, dim=1)  # (B, Hq, Nk, Dv)
    lo = v.amin(dim=2, keepdim=True).clamp(max=0)
    hi = v.amax(dim=2, keepdim=True).clamp(min=0)
    assert (out >= lo - 1e-9).all() and (out <= hi + 1e-9).all()
