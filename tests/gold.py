"""Shared test machinery: random inputs, the plain same-dtype control, and the error bound.

The rule (house style): a candidate's error against the float64 gold must stay within a small
multiple of the error a plain same-dtype implementation makes against the same gold, plus a tiny
absolute floor for cases where the control happens to be exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from qkv.backends import get_backend
from qkv.request import build_request

HALF = (torch.float16, torch.bfloat16)
#: Multiple of the control's error a candidate may reach (flash-attention uses 2x; FlexAttention
#: 10x for float32, whose control errors are tiny and noisy).
ERROR_FACTOR = {torch.float16: 3.0, torch.bfloat16: 3.0, torch.float32: 10.0, torch.float64: 10.0}
ABS_FLOOR = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6, torch.float64: 1e-12}


@dataclass
class Inputs:
    q: Tensor
    k: Tensor
    v: Tensor

    def to(self, dtype: torch.dtype, *, requires_grad: bool = True) -> Inputs:
        return Inputs(
            *(t.detach().to(dtype).requires_grad_(requires_grad) for t in (self.q, self.k, self.v))
        )


def random_inputs(
    B: int,
    Hq: int,
    Hkv: int,
    Nq: int,
    Nk: int,
    D: int,
    Dv: int | None = None,
    *,
    seed: int = 0,
    non_contiguous: bool = False,
) -> Inputs:
    """Fresh float64 inputs; non-contiguous ones are transposed views of (B, N, H, D) storage."""
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv

    def make(H: int, N: int, d: int) -> Tensor:
        if non_contiguous:
            return torch.randn(B, N, H, d, generator=g, dtype=torch.float64).transpose(1, 2)
        return torch.randn(B, H, N, d, generator=g, dtype=torch.float64)

    return Inputs(make(Hq, Nq, D), make(Hkv, Nk, D), make(Hkv, Nk, Dv))


def dense_mask_of(q: Tensor, k: Tensor, **kwargs: object) -> Tensor:
    """The request's full boolean mask, all True where nothing is masked: (B, Hq, Nq, Nk)."""
    request = build_request(q, k, k, **kwargs)  # type: ignore[arg-type]
    B, Hq, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    mask = request.mask_tile(request.full_q, request.full_kv)
    full = torch.ones(B, Hq, Nq, Nk, dtype=torch.bool)
    return full if mask is None else full & mask


def naive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    modify: Callable[[Tensor], Tensor] | None,
    scale: float,
) -> Tensor:
    """The plain same-dtype control: repeat K/V, softmax in the input dtype. Fully masked rows are
    zeroed by multiplication, the way a careful plain implementation avoids NaN."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale
    if modify is not None:
        scores = modify(scores).to(q.dtype)
    has_key = mask.any(-1, keepdim=True)
    scores = scores.masked_fill(~(mask | ~has_key), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v) * has_key


def max_error(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_control(
    name: str, candidate: Tensor, gold: Tensor, control: Tensor, dtype: torch.dtype
) -> None:
    err = max_error(candidate, gold)
    ctrl = max_error(control, gold)
    bound = ERROR_FACTOR[dtype] * ctrl + ABS_FLOOR[dtype]
    assert torch.isfinite(candidate).all(), f"{name}: non-finite values"
    assert err <= bound, (
        f"{name}: error {err:.3g} > bound {bound:.3g} (control error {ctrl:.3g}, {dtype})"
    )


def skip_unless_served(backend: str, q: Tensor, k: Tensor, v: Tensor, **kwargs: object) -> None:
    """Skip the test, with the backend's own reason, when ``backend`` refuses this call (the
    triton backend off CUDA, SDPA asked for weights, ...)."""
    import pytest

    reason = get_backend(backend).supports(build_request(q, k, v, **kwargs))  # type: ignore[arg-type]
    if reason is not None:
        pytest.skip(f"{backend} does not serve this case: {reason}")
