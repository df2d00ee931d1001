"""Fuzz ``qkv.attention`` on every CPU backend against the independent float64 oracle of
``tests/fuzz_cases.py``.

The default run draws ``CASES`` cases per backend, and checks dQ, dK, dV on ``GRAD_CASES``
float32/float64 cases of ordinary magnitude against autograd through the oracle; ``-m slow``
draws ``SLOW_CASES`` more forward cases. Each backend's test prints its counts (run / not
served / failed); set ``QKV_FUZZ_REPORT`` to a file path to also get them as JSON lines.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import qkv
from fuzz_cases import (
    EPS,
    Case,
    Tally,
    compare,
    draw_case,
    fuzz,
    oracle,
    qkv_arguments,
    report,
    run_backend,
    skip_unavailable,
    tolerance,
)

CASES = 300
SLOW_CASES = 1200
BACKENDS = ["reference", "chunked", "chunked-tiles", "sdpa", "cpu", "auto", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_against_float64_oracle(backend: str) -> None:
    skip_unavailable(backend)
    tally = fuzz(backend, range(CASES))
    report(backend, "default", tally)
    assert tally.run > (CASES // 2 if backend != "cpu" else CASES // 5)
    assert not tally.failed, f"{len(tally.failed)} of {tally.run} failed:\n" + "\n".join(
        tally.failed[:10]
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_against_float64_oracle_slow(backend: str) -> None:
    skip_unavailable(backend)
    tally = fuzz(backend, range(CASES, CASES + SLOW_CASES))
    report(backend, "slow", tally)
    assert not tally.failed, f"{len(tally.failed)} of {tally.run} failed:\n" + "\n".join(
        tally.failed[:10]
    )


def test_oracle_is_independent_and_catches_a_wrong_mask() -> None:
    """The oracle disagrees with a backend handed a subtly different mask: the comparison can
    fail (here, key_padding one key short)."""
    for seed in range(200):
        case = draw_case(seed)
        if case.q.numel() and case.k.shape[2] >= 2 and not case.masks and case.score is None:
            break
    case.masks = [{"kind": "key_padding", "lengths": [case.Nk]}]
    assert compare(case, "reference") is None
    wrong = Case(**{**case.__dict__, "masks": [{"kind": "key_padding", "lengths": [case.Nk - 1]}]})
    expected, _ = oracle(case)
    out = qkv.attention(wrong.q, wrong.k, wrong.v, **qkv_arguments(wrong), backend="reference")
    out = out[0] if isinstance(out, tuple) else out
    assert float((out.double() - expected).abs().max()) > tolerance(case)


# --- gradients on a subset: float32/float64 cases at ordinary magnitudes ---------------------------

GRAD_CASES = 150


def _amax(t: Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


def _grad_case(seed: int) -> Case | None:
    case = draw_case(seed)
    ordinary = _amax(case.q.double()) < 8 and _amax(case.k.double()) < 8
    if case.dtype not in (torch.float32, torch.float64) or not ordinary or case.q.numel() == 0:
        return None
    if case.score is not None and case.score["kind"] == "relative":
        return None  # its table's gradient is covered by test_gradients
    return case


def compare_gradients(case: Case, name: str) -> str | None:
    """dQ, dK, dV of the backend against autograd through the float64 oracle."""
    g = torch.Generator().manual_seed(case.seed)
    grad_out = torch.randn(case.B, case.Hq, case.Nq, case.Dv, generator=g, dtype=torch.float64)
    leaves = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
    run = Case(**{**case.__dict__, "q": leaves[0], "k": leaves[1], "v": leaves[2]})
    result = run_backend(run, name)
    if isinstance(result, str):
        return "not served"
    got = torch.autograd.grad(result[0], leaves, grad_out.to(case.dtype), allow_unused=True)
    ref_leaves = [t.detach().double().requires_grad_() for t in (case.q, case.k, case.v)]
    expected_out, _ = oracle(
        Case(**{**case.__dict__, "q": ref_leaves[0], "k": ref_leaves[1], "v": ref_leaves[2]})
    )
    want = torch.autograd.grad(expected_out, ref_leaves, grad_out, allow_unused=True)
    eps = EPS[case.dtype]
    for label, a, b, leaf in zip("qkv", got, want, ref_leaves, strict=True):
        b = torch.zeros_like(leaf) if b is None else b
        a = torch.zeros_like(leaf) if a is None else a.double()
        if not torch.isfinite(a).all():
            return f"d{label} not finite"
        scale = _amax(b) + _amax(grad_out)
        error = _amax(a - b)
        if error > 2000 * eps * scale + 1e-12:
            return f"d{label}: max error {error:.3g} > {2000 * eps * scale:.3g}"
    return None


@pytest.mark.parametrize(
    "backend", ["reference", "chunked", "chunked-tiles", "sdpa", "cpu", "auto"]
)
def test_fuzz_gradients_against_float64_oracle(backend: str) -> None:
    tally = Tally()
    for seed in range(GRAD_CASES * 3):
        case = _grad_case(seed)
        if case is None:
            continue
        try:
            problem = compare_gradients(case, backend)
        except Exception as error:
            problem = f"raised {type(error).__name__}: {error}"
        if problem == "not served":
            tally.not_served += 1
            continue
        tally.run += 1
        if problem is not None:
            tally.failed.append(f"{problem} | {case.describe()}")
        if tally.run >= GRAD_CASES:
            break
    report(backend, "gradients", tally)
    assert tally.run >= (GRAD_CASES // 2 if backend != "cpu" else GRAD_CASES // 5)
    assert not tally.failed, f"{len(tally.failed)} of {tally.run} failed:\n" + "\n".join(
        tally.failed[:10]
    )
