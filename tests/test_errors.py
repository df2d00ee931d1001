"""Every bad input raises TypeError or ValueError naming the argument and what was wrong."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv import masks, scores


def qkv_tensors(B=2, Hq=4, Hkv=2, Nq=5, Nk=7, D=8, Dv=6):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(B, Hq, Nq, D, generator=g),
        torch.randn(B, Hkv, Nk, D, generator=g),
        torch.randn(B, Hkv, Nk, Dv, generator=g),
    )


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            lambda q, k, v: (q[0], k, v),
            ValueError,
            r"q must have shape \(B, Hq, Nq, D\); got a 3-d tensor of shape \(4, 5, 8\)",
        ),
        (lambda q, k, v: (q, k.unsqueeze(0), v), ValueError, r"k must have shape .* 5-d"),
        (lambda q, k, v: (q, k, v.numpy()), TypeError, r"v must be a torch.Tensor; got ndarray"),
        (
            lambda q, k, v: (q.long(), k, v),
            TypeError,
            r"q must be float16, bfloat16, float32 or float64; got torch.int64",
        ),
        (
            lambda q, k, v: (q, k.double(), v),
            TypeError,
            r"share a dtype; got q torch.float32, k torch.float64",
        ),
        (
            lambda q, k, v: (q[:1], k, v),
            ValueError,
            r"batch size B .* q \(1, 4, 5, 8\), k \(2, 2, 7, 8\)",
        ),
        (lambda q, k, v: (q, k, v[:, :1]), ValueError, r"same number of heads Hkv"),
        (
            lambda q, k, v: (q[:, :3], k, v),
            ValueError,
            r"query heads Hq \(3\) must be a multiple of key/value heads Hkv \(2\)",
        ),
        (lambda q, k, v: (q, k, v[:, :, :6]), ValueError, r"same length Nk"),
        (lambda q, k, v: (q[..., :4], k, v), ValueError, r"same head dim D .* q \(2, 4, 5, 4\)"),
    ],
)
def test_bad_tensors(change, error, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        qkv.attention(*change(*qkv_tensors()))


def test_mask_wrong_dtype_and_shape() -> None:
    q, k, v = qkv_tensors()
    with pytest.raises(
        TypeError, match=r"mask must be a bool tensor \(True = attend\); got dtype torch.float32"
    ):
        qkv.attention(q, k, v, mask=torch.ones(5, 7))
    with pytest.raises(
        ValueError,
        match=r"mask of shape \(5, 6\) does not broadcast to \(B, Hq, Nq, Nk\) = \(2, 4, 5, 7\)",
    ):
        qkv.attention(q, k, v, mask=torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 1, 5, 7\)"):
        qkv.attention(q, k, v, mask=torch.ones(3, 1, 5, 7, dtype=torch.bool))
    with pytest.raises(
        TypeError, match=r"mask must be a bool tensor, a mask function or None; got str"
    ):
        qkv.attention(q, k, v, mask="causal")  # type: ignore[arg-type]


def test_bias_wrong_dtype_and_shape() -> None:
    q, k, v = qkv_tensors()
    with pytest.raises(
        TypeError, match=r"bias must be a floating-point tensor; got dtype torch.bool"
    ):
        qkv.attention(q, k, v, bias=torch.ones(5, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bias of shape \(4, 7, 5\) does not broadcast"):
        qkv.attention(q, k, v, bias=torch.ones(4, 7, 5))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_out_of_range(p: float) -> None:
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\); got"):
        qkv.attention(*qkv_tensors(), dropout_p=p)


def test_bad_causal_and_scale() -> None:
    with pytest.raises(
        ValueError, match=r'causal must be False, True, "top_left" or "bottom_right"; got \'lower\''
    ):
        qkv.attention(*qkv_tensors(), causal="lower")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"scale must be a finite Python number or None; got inf"):
        qkv.attention(*qkv_tensors(), scale=float("inf"))


def test_unknown_backend_lists_known_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown backend 'flash'; known backends: auto, .*reference"
    ):
        qkv.attention(*qkv_tensors(), backend="flash")


def test_named_backend_that_cannot_serve_raises_its_reason() -> None:
    with pytest.raises(
        ValueError,
        match=r"backend 'sdpa' cannot serve this call: SDPA does not return the attention probabilities",
    ):
        qkv.attention(*qkv_tensors(), return_weights=True, backend="sdpa")
    with pytest.raises(
        ValueError,
        match=r"backend 'sdpa' cannot serve this call: score function softcap\(3.0\) is not an additive",
    ):
        qkv.attention(*qkv_tensors(), bias=scores.softcap(3.0), backend="sdpa")


def test_mask_factory_arguments() -> None:
    with pytest.raises(
        ValueError, match=r"sliding_window needs left >= 0 and right >= 0; got left=-1, right=0"
    ):
        masks.sliding_window(-1)
    with pytest.raises(
        ValueError, match=r"lengths must be a 1-d integer tensor of shape \(B,\); got \(2, 2\)"
    ):
        masks.key_padding(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(
        ValueError,
        match=r"query_ids must be an integer tensor of shape \(B, N\) or \(N,\); got \(4,\) torch.float32",
    ):
        masks.document(torch.ones(4))
    with pytest.raises(ValueError, match=r"softcap needs cap > 0; got 0"):
        scores.softcap(0)
    with pytest.raises(ValueError, match=r"num_heads must be >= 1; got 0"):
        scores.alibi_slopes(0)
