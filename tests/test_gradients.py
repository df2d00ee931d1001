"""torch.autograd.gradcheck in float64 on small shapes, every backend, learnable bias included."""

from __future__ import annotations

import pytest
import torch

import qkv
from gold import random_inputs, skip_unless_served
from qkv import masks, scores
from qkv.backends import available_backends, get_backend
from qkv.request import build_request


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"causal": "bottom_right"},
        {"mask": masks.sliding_window(1) | masks.prefix_lm(1)},
        {"mask": masks.key_padding([0, 3])},  # batch 0 is fully masked
    ],
    ids=["plain", "causal_bottom_right", "window_or_prefix", "fully_masked_batch"],
)
def test_gradcheck_qkv(backend: str, options: dict) -> None:  # type: ignore[type-arg]
    x = random_inputs(2, 4, 2, 3, 5, 4, 3, seed=11).to(torch.float64)
    skip_unless_served(backend, x.q, x.k, x.v, **options)
    assert torch.autograd.gradcheck(
        lambda q, k, v: qkv.attention(q, k, v, backend=backend, **options), (x.q, x.k, x.v)
    )


@pytest.mark.parametrize("backend", available_backends())
def test_gradcheck_learnable_relative_bias(backend: str) -> None:
    x = random_inputs(1, 2, 1, 4, 6, 4, seed=5).to(torch.float64)
    rel = scores.RelativePositionBias(2, max_distance=3).double()
    with torch.no_grad():
        rel.table.normal_(generator=torch.Generator().manual_seed(1))
    skip_unless_served(backend, x.q, x.k, x.v, bias=rel, causal=True)

    table = rel.table.detach().clone().requires_grad_(True)

    def functional(t: torch.Tensor) -> scores.ScoreMod:
        return scores.ScoreMod(
            lambda s, b, h, qi, ki: s + t[h, (ki - qi).clamp(-3, 3) + 3], "relative", additive=True
        )

    def with_table(q: torch.Tensor, t: torch.Tensor, on: str = backend) -> torch.Tensor:
        return qkv.attention(q, x.k, x.v, bias=functional(t), causal=True, backend=on)

    request = build_request(x.q, x.k, x.v, bias=functional(table), causal=True)
    if get_backend(backend).supports(request) is None:
        assert torch.autograd.gradcheck(with_table, (x.q, table))
    else:  # a backend that serves only the module (the compiled CPU kernel): q through it
        module_call = lambda q: qkv.attention(q, x.k, x.v, bias=rel, causal=True, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(module_call, (x.q,))
    # The module itself receives the same gradient as the functional form.
    out = qkv.attention(x.q, x.k, x.v, bias=rel, causal=True, backend=backend)
    out.square().sum().backward()
    ref = with_table(x.q.detach(), table, "reference")
    (t_grad,) = torch.autograd.grad(ref.square().sum(), table)
    torch.testing.assert_close(rel.table.grad, t_grad)


@pytest.mark.parametrize("backend", available_backends())
def test_gradcheck_bias_tensor(backend: str) -> None:
    x = random_inputs(1, 2, 2, 3, 4, 4, seed=2).to(torch.float64)
    bias = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    skip_unless_served(backend, x.q, x.k, x.v, bias=bias)
    assert torch.autograd.gradcheck(
        lambda q, k, b: qkv.attention(q, k, x.v, bias=b, backend=backend), (x.q, x.k, bias)
    )
