"""auto times close candidates once per shape class on the machine, and remembers the winner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import qkv
from qkv import scores
from qkv.backends import measured, select_backend
from qkv.request import build_request


@pytest.fixture
def measuring(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("QKV_AUTO_MEASURE", "1")
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(measured, "MIN_SECONDS", 0.0)  # small calls measured too
    monkeypatch.setattr(measured, "AMBIGUOUS", 1e9)  # every candidate is close
    monkeypatch.setattr(measured, "_LOADED", False)
    measured.forget()
    yield tmp_path
    measured.forget()


def test_close_candidates_are_timed_once_per_shape_class(
    measuring: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timed: list[str] = []
    original = measured._time_once

    def counting(backend, request, grad_out):  # type: ignore[no-untyped-def]
        timed.append(backend.name)
        return original(backend, request, grad_out)

    monkeypatch.setattr(measured, "_time_once", counting)
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    first = select_backend(build_request(q, k, v, causal=True))
    assert first.measured_class and len(timed) >= 4  # two rounds over at least two candidates
    count = len(timed)
    again = select_backend(
        build_request(*(torch.randn(1, 2, 37, 8) for _ in range(3)), causal=True)
    )
    assert (
        again.backend.name == first.backend.name and len(timed) == count
    )  # same class: remembered
    other = select_backend(build_request(*(torch.randn(1, 2, 300, 8) for _ in range(3))))
    assert other.measured_class and len(timed) > count  # another class: timed
    files = list(measuring.glob("auto-*.json"))
    assert (
        len(files) == 1
        and measured.shape_class(build_request(q, k, v, causal=True)) in files[0].read_text()
    )


def test_explain_never_times(measuring: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> float:
        raise AssertionError("explain timed a backend")

    monkeypatch.setattr(measured, "_time_once", fail)
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    assert qkv.explain(q, k, v).chosen


def test_measuring_a_training_call_leaves_the_callers_gradients_alone(measuring: Path) -> None:
    rel = scores.RelativePositionBias(2, max_distance=4)
    torch.nn.init.normal_(rel.table)
    q, k, v = (torch.randn(1, 2, 40, 8, requires_grad=True) for _ in range(3))
    out = qkv.attention(q, k, v, bias=rel)
    assert rel.table.grad is None and q.grad is None  # the timed copies left nothing behind
    out.sum().backward()
    ref = qkv.attention(q.detach(), k.detach(), v.detach(), bias=rel, backend="reference")
    torch.testing.assert_close(out, ref)
    assert rel.table.grad is not None


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QKV_AUTO_MEASURE", "0")
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    assert not select_backend(build_request(q, k, v)).measured_class
