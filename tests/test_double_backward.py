"""Second-order gradients (``create_graph=True``, e.g. a gradient penalty) on every backend:
right where the backend serves them, a clear error where it cannot, never a gradient that
silently lacks its graph."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import qkv
from qkv import masks, scores
from qkv.backends.cpu import kernel_status

TILED = ["chunked"] + (["cpu"] if kernel_status().ok else [])


def _penalised_grads(backend: str, options: dict[str, object], seed: int) -> list[Tensor]:
    """Gradients of ``loss + |d loss / d q|^2 + |d loss / d bias|^2`` for a loss linear in the
    output (the case where a gradient without a graph went unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 37, 8, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.randn(2, 2, 37, 8, generator=g, dtype=torch.float64).requires_grad_()
    v = torch.randn(2, 2, 37, 8, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(1, 4, 1, 37, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(2, 4, 37, 8, generator=g, dtype=torch.float64)
    out = qkv.attention(q, k, v, bias=bias, backend=backend, **options)  # type: ignore[arg-type]
    loss = (out * weight).sum()
    dq, dbias = torch.autograd.grad(loss, (q, bias), create_graph=True)
    assert dq.requires_grad and dbias.requires_grad, "the gradient lost its graph"
    total = loss + dq.pow(2).sum() + dbias.pow(2).sum()
    return list(torch.autograd.grad(total, (q, k, v, bias)))


@pytest.mark.parametrize(
    "options",
    [{}, {"causal": True}, {"mask": masks.sliding_window(5) & masks.key_padding([30, 37])}],
    ids=["plain", "causal", "window-padding"],
)
@pytest.mark.parametrize("backend", TILED)
def test_gradient_penalty_matches_the_reference(backend: str, options: dict[str, object]) -> None:
    expected = _penalised_grads("reference", options, seed=1)
    got = _penalised_grads(backend, options, seed=1)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", TILED)
def test_relative_table_gets_second_order_gradients(backend: str) -> None:
    grads = {}
    for name in ("reference", backend):
        torch.manual_seed(3)
        rel = scores.RelativePositionBias(2, 4).double()
        with torch.no_grad():
            rel.table.normal_()
        q, k, v = (torch.randn(1, 2, 20, 8, dtype=torch.float64, requires_grad=True) for _ in "qkv")
        out = qkv.attention(q, k, v, bias=rel, causal=True, backend=name)
        (dtable,) = torch.autograd.grad(out.pow(2).sum(), rel.table, create_graph=True)
        grads[name] = torch.autograd.grad(dtable.pow(2).sum(), (rel.table, q))
    for a, b in zip(grads[backend], grads["reference"], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", TILED)
def test_same_tensor_as_q_and_k_is_not_counted_twice(backend: str) -> None:
    found = []
    for name in ("reference", backend):
        x = torch.randn(1, 2, 9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        x.requires_grad_()
        out = qkv.attention(x, x, x, causal=True, backend=name)
        (dx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        found.append(torch.autograd.grad(dx.pow(2).sum(), x)[0])
    torch.testing.assert_close(found[1], found[0])


def test_double_backward_through_dropout_is_a_clear_error() -> None:
    # (the cpu kernel has no dropout)
    q, k, v = (torch.randn(1, 1, 6, 4, requires_grad=True) for _ in "qkv")
    out = qkv.attention(q, k, v, dropout_p=0.3, backend="chunked")
    with pytest.raises(RuntimeError, match=r"double backward .*dropout_p=0.3.*backend='reference'"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_first_order_gradients_still_come_from_the_tiled_backward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import qkv.backends.chunked
    import qkv.backends.cpu.backend

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the O(N^2) path ran without create_graph")

    for module in (qkv.backends.chunked, qkv.backends.cpu.backend):
        monkeypatch.setattr(module, "reference_gradients", refuse)
    for backend in TILED:
        q, k, v = (torch.randn(1, 1, 6, 4, requires_grad=True) for _ in "qkv")
        out = qkv.attention(q, k, v, backend=backend)
        torch.autograd.grad(out.sum(), (q, k, v))


def test_auto_never_returns_a_gradient_without_its_graph() -> None:
    # Whichever backend auto picks, the gradient carries a graph or the call raises.
    for n in (6, 300):
        q, k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for _ in "qkv")
        for options in ({}, {"causal": True}, {"mask": masks.sliding_window(16)}):
            out = qkv.attention(q, k, v, **options)  # type: ignore[arg-type]
            try:
                (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
            except RuntimeError as error:
                assert "not implemented" in str(error) or "not supported" in str(error)
                continue
            assert dq.requires_grad
