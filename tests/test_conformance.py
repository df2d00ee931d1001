"""Every backend against the float64 reference, output and gradients, over the feature matrix.

Axes: backend x dtype x causal alignment x mask kind x score modifier, each case with a shape,
GQA ratio and memory layout drawn from a fixed cycle (awkward lengths 1 and primes, Nq != Nk in
both directions, non-contiguous inputs), so every value of every axis is met many times without
the full cross product.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import qkv
from gold import (
    Inputs,
    assert_within_control,
    dense_mask_of,
    naive_attention,
    random_inputs,
    skip_unless_served,
)
from helpers import cast_bias, make_bias, make_mask
from qkv import masks, scores
from qkv.backends import available_backends, get_backend
from qkv.request import build_request

BACKENDS = [name for name in available_backends()]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
CAUSAL = [False, "top_left", "bottom_right"]
MASKS = [
    "none",
    "key_padding",
    "sliding_window",
    "document",
    "prefix_lm",
    "dense",
    "fully_masked_rows",
]
BIASES = ["none", "tensor", "alibi", "softcap", "relative"]
# (B, Hq, Hkv, Nq, Nk, D, Dv, non_contiguous)
SHAPES = [
    (2, 4, 4, 13, 13, 16, 16, False),
    (1, 4, 2, 1, 7, 8, 8, True),
    (2, 6, 2, 5, 17, 16, 8, False),
    (2, 4, 1, 17, 5, 8, 12, True),
    (1, 2, 2, 31, 29, 32, 32, False),
    (3, 3, 1, 7, 11, 4, 4, True),
]


def bias_grad(bias: object) -> Tensor | None:
    if isinstance(bias, Tensor):
        return bias.grad
    if isinstance(bias, scores.RelativePositionBias):
        return bias.table.grad
    return None


def run(
    fn: Callable[..., Tensor], x: Inputs, bias: object, grad_out: Tensor
) -> list[Tensor | None]:
    out = fn(x.q, x.k, x.v, bias)
    out.backward(grad_out.to(out.dtype))
    return [out.detach(), x.q.grad, x.k.grad, x.v.grad, bias_grad(bias)]


def readable(value: object) -> str:
    return str(value).removeprefix("torch.")


CASES = list(itertools.product(BACKENDS, DTYPES, CAUSAL, MASKS, BIASES))


def conformance_mask(
    kind: str, B: int, Hq: int, Nq: int, Nk: int, seed: int
) -> Tensor | masks.MaskFn | None:
    """This suite's masks: ``fully_masked_rows`` is a per-head dense mask with every third
    query row empty."""
    if kind == "fully_masked_rows":
        return make_mask("dense", B, Nq, Nk, seed + 1, heads=Hq, empty_every=3)
    return make_mask(kind, B, Nq, Nk, seed + 1)


@pytest.mark.parametrize(
    ("backend", "dtype", "causal", "mask_kind", "bias_kind"), CASES, ids=readable
)
def test_matches_float64_reference(
    backend: str, dtype: torch.dtype, causal: object, mask_kind: str, bias_kind: str
) -> None:
    case = CASES.index((backend, dtype, causal, mask_kind, bias_kind))
    B, Hq, Hkv, Nq, Nk, D, Dv, non_contiguous = SHAPES[case % len(SHAPES)]
    x = random_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, seed=case, non_contiguous=non_contiguous)
    mask = conformance_mask(mask_kind, B, Hq, Nq, Nk, case)
    bias0 = make_bias(bias_kind, Hq, Nq, Nk, case + 2, max_distance=4)
    kwargs = {"mask": mask, "causal": causal}

    request = build_request(
        x.q.to(dtype), x.k.to(dtype), x.v.to(dtype), bias=cast_bias(bias0, dtype), **kwargs
    )  # type: ignore[arg-type]
    reason = get_backend(backend).supports(request)
    if reason is not None:
        pytest.skip(f"{backend} does not serve this case: {reason}")

    grad_out = torch.randn(
        B, Hq, Nq, Dv, generator=torch.Generator().manual_seed(case), dtype=torch.float64
    )
    dense = dense_mask_of(x.q, x.k, **kwargs)

    def candidate(q: Tensor, k: Tensor, v: Tensor, bias: object) -> Tensor:
        return qkv.attention(q, k, v, bias=bias, backend=backend, **kwargs)  # type: ignore[arg-type]

    def gold(q: Tensor, k: Tensor, v: Tensor, bias: object) -> Tensor:
        return qkv.attention(q, k, v, bias=bias, backend="reference", **kwargs)  # type: ignore[arg-type]

    def control(q: Tensor, k: Tensor, v: Tensor, bias: object) -> Tensor:
        req = build_request(q, k, v, bias=bias)  # type: ignore[arg-type]
        modify = None if bias is None else (lambda s: req.modify_scores(s, req.full_q, req.full_kv))
        return naive_attention(q, k, v, dense, modify, req.scale)

    got = run(candidate, x.to(dtype), cast_bias(bias0, dtype), grad_out)
    want = run(gold, x.to(torch.float64), cast_bias(bias0, torch.float64), grad_out)
    ctrl = run(control, x.to(dtype), cast_bias(bias0, dtype), grad_out)
    for name, g, w, c in zip(("out", "dq", "dk", "dv", "dbias"), got, want, ctrl, strict=True):
        if w is None:
            continue
        assert g is not None, f"{name}: no gradient"
        assert_within_control(name, g, w, c, dtype)
    if mask_kind == "fully_masked_rows":
        empty = ~dense.any(-1)  # (B, Hq, Nq)
        assert torch.equal(got[0][empty], torch.zeros_like(got[0][empty]))
        assert got[1] is not None and torch.equal(got[1][empty], torch.zeros_like(got[1][empty]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=readable)
def test_output_dtype_shape_and_layout(backend: str, dtype: torch.dtype) -> None:
    x = random_inputs(2, 4, 2, 5, 9, 8, 6, seed=3, non_contiguous=True).to(
        dtype, requires_grad=False
    )
    skip_unless_served(backend, x.q, x.k, x.v)
    out = qkv.attention(x.q, x.k, x.v, backend=backend)
    assert out.dtype == dtype
    assert out.shape == (2, 4, 5, 6)
    assert torch.isfinite(out).all()


def test_half_types_keep_float32_softmax_statistics() -> None:
    # A long row of equal scores: every weight is 1/N. Summed in float16, the weights would drift
    # visibly; with float32 statistics the output equals the mean of V to float16 precision.
    N = 4096
    q = torch.zeros(1, 1, 1, 16, dtype=torch.float16)
    k = torch.randn(1, 1, N, 16).half()
    v = torch.randn(1, 1, N, 8).half()
    out, weights = qkv.attention(q + 1e-3, k * 0, v, return_weights=True, backend="reference")
    assert weights.float().sum().item() == pytest.approx(1.0, abs=2e-3)
    torch.testing.assert_close(out.float(), v.float().mean(dim=2, keepdim=True), atol=2e-3, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", CAUSAL, ids=readable)
def test_zero_keys_give_zeros_and_zero_gradients(backend: str, causal: object) -> None:
    # As torch's SDPA: with Nk = 0 every row has nothing to attend to, so out is zeros.
    x = random_inputs(2, 4, 2, 5, 0, 8, 6, seed=11).to(torch.float32)
    kwargs = {"causal": causal, "mask": masks.sliding_window(2)}
    skip_unless_served(backend, x.q, x.k, x.v, **kwargs)
    out = qkv.attention(x.q, x.k, x.v, backend=backend, **kwargs)  # type: ignore[arg-type]
    assert out.shape == (2, 4, 5, 6)
    assert torch.equal(out, torch.zeros_like(out))
    out.backward(torch.randn_like(out))
    assert x.q.grad is not None and torch.equal(x.q.grad, torch.zeros_like(x.q))
    if get_backend(backend).supports(build_request(x.q, x.k, x.v, return_weights=True)) is None:
        _, weights = qkv.attention(x.q, x.k, x.v, backend=backend, return_weights=True)
        assert weights.shape == (2, 4, 5, 0)


LOW_RANK = {
    "mask (Nk,)": lambda g, Nq, Nk: {"mask": torch.rand(Nk, generator=g) < 0.6},
    "mask (Nq, 1)": lambda g, Nq, Nk: {"mask": torch.rand(Nq, 1, generator=g) < 0.6},
    "mask (Nq, Nk)": lambda g, Nq, Nk: {"mask": torch.rand(Nq, Nk, generator=g) < 0.6},
    "bias (Nk,)": lambda g, Nq, Nk: {"bias": torch.randn(Nk, generator=g, dtype=torch.float64)},
    "bias (1, Nk)": lambda g, Nq, Nk: {
        "bias": torch.randn(1, Nk, generator=g, dtype=torch.float64)
    },
    "bias (Nq, Nk)": lambda g, Nq, Nk: {
        "bias": torch.randn(Nq, Nk, generator=g, dtype=torch.float64)
    },
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(LOW_RANK))
def test_masks_and_biases_of_rank_below_four(backend: str, kind: str) -> None:
    # Validation accepts any tensor that broadcasts to (B, Hq, Nq, Nk); every backend must too,
    # and a bias keeps its own shape for its gradient.
    x = random_inputs(2, 4, 2, 6, 9, 8, seed=12).to(torch.float64)
    kwargs = LOW_RANK[kind](torch.Generator().manual_seed(13), 6, 9)
    bias = kwargs.get("bias")
    skip_unless_served(backend, x.q, x.k, x.v, **kwargs)
    if bias is not None:
        bias.requires_grad_(True)
    grad_out = torch.randn(
        2, 4, 6, 8, generator=torch.Generator().manual_seed(14), dtype=torch.float64
    )
    out = qkv.attention(x.q, x.k, x.v, backend=backend, **kwargs)
    out.backward(grad_out)
    got = [out.detach(), x.q.grad, bias.grad if bias is not None else None]
    if bias is not None:
        bias.grad = None
    y = x.to(torch.float64)
    want_out = qkv.attention(y.q, y.k, y.v, backend="reference", **kwargs)
    want_out.backward(grad_out)
    want = [want_out.detach(), y.q.grad, bias.grad if bias is not None else None]
    for g, w in zip(got, want, strict=True):
        if w is None:
            continue
        assert g is not None and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
    if bias is not None:
        assert bias.grad is not None and bias.grad.shape == bias.shape
