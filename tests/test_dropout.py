"""Attention dropout: unbiased in expectation, reproducible from the global seed."""

from __future__ import annotations

import pytest
import torch

import qkv
from gold import random_inputs, skip_unless_served
from qkv.backends import available_backends


@pytest.mark.parametrize("backend", available_backends())
def test_dropout_is_unbiased(backend: str) -> None:
    x = random_inputs(1, 2, 2, 3, 6, 4, seed=4).to(torch.float64, requires_grad=False)
    skip_unless_served(backend, x.q, x.k, x.v, dropout_p=0.3)
    exact = qkv.attention(x.q, x.k, x.v, backend=backend)
    torch.manual_seed(0)
    q = x.q.expand(4000, -1, -1, -1)  # many independent draws in one call
    k, v = x.k.expand(4000, -1, -1, -1), x.v.expand(4000, -1, -1, -1)
    dropped = qkv.attention(q, k, v, dropout_p=0.3, backend=backend)
    assert not torch.allclose(dropped[0], exact[0])
    torch.testing.assert_close(dropped.mean(0, keepdim=True), exact, atol=0.05, rtol=0)


@pytest.mark.parametrize("backend", available_backends())
def test_dropout_reproducible_from_seed(backend: str) -> None:
    x = random_inputs(2, 2, 1, 5, 5, 4, seed=9).to(torch.float32, requires_grad=False)
    skip_unless_served(backend, x.q, x.k, x.v, dropout_p=0.5)
    torch.manual_seed(123)
    a = qkv.attention(x.q, x.k, x.v, dropout_p=0.5, backend=backend)
    torch.manual_seed(123)
    b = qkv.attention(x.q, x.k, x.v, dropout_p=0.5, backend=backend)
    c = qkv.attention(x.q, x.k, x.v, dropout_p=0.5, backend=backend)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_weights_are_returned_before_dropout() -> None:
    x = random_inputs(1, 1, 1, 4, 4, 4, seed=1).to(torch.float64, requires_grad=False)
    _, weights = qkv.attention(x.q, x.k, x.v, dropout_p=0.5, return_weights=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 1, 4, dtype=torch.float64))
