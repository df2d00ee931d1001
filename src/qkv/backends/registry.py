"""The backend registry: named implementations of one attention contract, and how `auto` picks.

A backend is any object with a ``name``, ``supports(request) -> str | None`` (None when it can
serve the request, otherwise the reason it cannot, in words a user can act on) and
``forward(request) -> (out, weights | None)``. A backend named explicitly raises its reason
instead of falling back silently.

How ``auto`` picks (:func:`select_backend`): it walks :data:`AUTO_ORDER` and keeps the backends
that can serve the call. A backend may also give ``cost_estimate(request) -> seconds`` and
``memory_estimate(request) -> bytes``. If the first backend that can serve gives no cost
estimate, it is taken (a backend a user registers in front keeps its place) unless its memory
estimate exceeds :data:`MEMORY_LIMIT_BYTES`. Otherwise ``auto`` takes the cheapest estimate
among those whose expected extra memory stays within the limit (the least memory if none does);
ties go to the earlier backend.

The built-in order is triton, sdpa, chunked, reference. The triton backend gives no cost
estimate, so wherever it serves (float16/bfloat16 CUDA tensors with triton installed) it is
first in line and taken, unless it would need more than the memory limit (a score function it
materializes as an ``(Hq, Nq, Nk)`` bias, a bias gradient of ``(B, Hq, Nq, Nk)``); elsewhere it
gives its reason and the estimates decide among the rest.

The estimates are coarse models built from :class:`DeviceRates` (a matmul rate, a cost per
element of memory-bound elementwise work, a cost per tensor op) calibrated with ``qkv bench`` on
the CPU; they only need to order the backends correctly, and they do so by wide margins: SDPA's
fused kernel for plain and small calls, the chunked backend where a mask lets it skip most tiles
or where a dense path would need more than the memory limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from qkv.request import AttentionRequest

__all__ = [
    "AUTO_ORDER",
    "MEMORY_LIMIT_BYTES",
    "Backend",
    "DeviceRates",
    "Selection",
    "available_backends",
    "device_rates",
    "format_ms",
    "get_backend",
    "register_backend",
    "select_backend",
    "unregister_backend",
]


@runtime_checkable
class Backend(Protocol):
    """What a backend provides. ``forward`` returns ``out (B, Hq, Nq, Dv)`` and, when
    ``request.return_weights``, the ``(B, Hq, Nq, Nk)`` probabilities (else None)."""

    name: str

    def supports(self, request: AttentionRequest) -> str | None: ...

    def forward(self, request: AttentionRequest) -> tuple[Tensor, Tensor | None]: ...


_REGISTRY: dict[str, Backend] = {}
#: Backends `auto` considers, in order of preference. `reference` is last: it always serves.
AUTO_ORDER: list[str] = []

#: Expected extra memory above which ``auto`` avoids a backend when another fits. 1 GiB: the
#: size of a float32 score matrix for B * H = 16 at N = 4096, or of SDPA's float copy of a dense
#: mask for B * H = 1 at N = 16384. Above it a dense path risks running out of memory on an
#: ordinary machine and spends its time on memory traffic, while the chunked backend needs
#: ``O(N * D)``.
MEMORY_LIMIT_BYTES = 1 << 30


@dataclass(frozen=True)
class DeviceRates:
    """Throughput figures the backends' cost estimates are built from.

    Attributes:
        matmul_flops: floating-point operations per second of the attention matmuls in a fused
            kernel (SDPA); other backends scale it by their own efficiency.
        element_seconds: seconds per element of one memory-bound elementwise pass (exp, add,
            compare) over float32 scores.
        op_seconds: fixed cost of launching one tensor op from Python.
    """

    matmul_flops: float
    element_seconds: float
    op_seconds: float

    def __post_init__(self) -> None:
        for name in ("matmul_flops", "element_seconds", "op_seconds"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0; got {value!r}")


#: Per device type. CPU: a 2-core Xeon, float32 (SDPA at N = 4096: about 290 GFLOP/s; one
#: elementwise pass over 8 x 256 x 256 scores about 50 us). CUDA: rough H100-class guesses, not
#: tuned; every op there is a kernel launch.
RATES: dict[str, DeviceRates] = {
    "cpu": DeviceRates(matmul_flops=2.9e11, element_seconds=1e-10, op_seconds=1e-5),
    "cuda": DeviceRates(matmul_flops=2e14, element_seconds=5e-13, op_seconds=8e-6),
}


def device_rates(device: torch.device) -> DeviceRates:
    """The :class:`DeviceRates` of ``device`` (the CPU's for unknown device types)."""
    return RATES.get(device.type, RATES["cpu"])


#: Elementwise passes to build one entry of a dense mask or bias from index functions (int64
#: index arithmetic, comparisons, the bool result), in units of a float32 pass.
BUILD_PASSES = 8


def dense_build_seconds(request: AttentionRequest, rates: DeviceRates) -> float:
    """Time a dense backend spends materializing the request's mask function, non-plain causal
    mask and additive score function as ``(.., Nq, Nk)`` tensors (mask tensors are given)."""
    plane = request.q_len * request.kv_len
    elements = request.dense_mask_elements()
    if request.causal is not None and request.q_len != request.kv_len:
        elements += plane
    if request.score_mod is not None:
        elements += request.q_heads * plane
    return elements * BUILD_PASSES * rates.element_seconds


def register_backend(
    backend: Backend, *, auto_priority: int | None = None, replace: bool = False
) -> None:
    """Add a backend under ``backend.name``.

    Args:
        backend: the implementation.
        auto_priority: position in :data:`AUTO_ORDER` (0 = tried first); None keeps it out of
            ``auto``, so it runs only when named.
        replace: allow replacing a backend of the same name.
    """
    if not isinstance(backend, Backend):
        raise TypeError(
            f"backend must have name, supports() and forward(); got {type(backend).__name__}"
        )
    if backend.name in ("auto", ""):
        raise ValueError(f"backend name {backend.name!r} is reserved")
    if backend.name in _REGISTRY and not replace:
        raise ValueError(
            f"a backend named {backend.name!r} is already registered; pass replace=True"
        )
    _REGISTRY[backend.name] = backend
    if backend.name in AUTO_ORDER:
        AUTO_ORDER.remove(backend.name)
    if auto_priority is not None:
        AUTO_ORDER.insert(auto_priority, backend.name)


def unregister_backend(name: str) -> None:
    """Remove a backend (and its place in ``auto``)."""
    get_backend(name)
    del _REGISTRY[name]
    if name in AUTO_ORDER:
        AUTO_ORDER.remove(name)


def available_backends() -> list[str]:
    """Names of the registered backends."""
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(["auto", *_REGISTRY])
        raise ValueError(f"unknown backend {name!r}; known backends: {known}") from None


@dataclass(frozen=True)
class Selection:
    """Which backend serves a request, and what ``auto`` knew when it chose.

    Attributes:
        backend: the chosen backend.
        rejected: for each backend in the auto order that cannot serve, its reason.
        able: names of the backends that could serve, in auto order (empty for a named call).
        costs: cost estimates (seconds) of the backends that could serve and give one.
        memory: expected extra memory (bytes) of those ``auto`` had to look at.
    """

    backend: Backend
    rejected: dict[str, str] = field(default_factory=dict)
    able: tuple[str, ...] = ()
    costs: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)

    def passed_over(self) -> dict[str, str]:
        """Why each backend that could serve was not chosen, in words."""
        chosen = self.backend.name
        notes: dict[str, str] = {}
        for name in self.able:
            if name == chosen:
                continue
            if chosen not in self.costs and chosen not in self.memory:
                notes[name] = f"could serve, but {chosen} comes first"
            elif self.memory.get(name, 0.0) > MEMORY_LIMIT_BYTES:
                notes[name] = (
                    f"could serve, but needs {self.memory[name] / 2**30:.1f} GiB, over auto's "
                    f"{MEMORY_LIMIT_BYTES / 2**30:.0f} GiB limit"
                )
            elif name not in self.costs or chosen not in self.costs:
                notes[name] = "could serve, but gives no cost estimate and is not first in line"
            else:
                notes[name] = (
                    f"could serve, estimated {format_ms(self.costs[name])} "
                    f"against {format_ms(self.costs[chosen])}"
                )
        return notes


def select_backend(request: AttentionRequest, name: str = "auto") -> Selection:
    """Pick the backend for ``request``: the named one (raising its reason if it cannot serve),
    or for ``"auto"`` the policy in this module's docstring."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string; got {type(name).__name__}")
    if name != "auto":
        backend = get_backend(name)
        reason = backend.supports(request)
        if reason is not None:
            raise ValueError(
                f"backend {name!r} cannot serve this call: {reason} ({request.describe()})"
            )
        return Selection(backend)
    rejected: dict[str, str] = {}
    able: list[Backend] = []
    for candidate in AUTO_ORDER:
        backend = _REGISTRY[candidate]
        reason = backend.supports(request)
        if reason is None:
            able.append(backend)
        else:
            rejected[candidate] = reason
    if not able:
        details = "; ".join(f"{n}: {r}" for n, r in rejected.items())
        raise ValueError(f"no backend can serve this call ({request.describe()}): {details}")
    return _cheapest(able, request, rejected)


def _estimate(backend: Backend, what: str, request: AttentionRequest) -> float | None:
    method = getattr(backend, what, None)
    return None if method is None else float(method(request))


def _cheapest(
    able: list[Backend], request: AttentionRequest, rejected: dict[str, str]
) -> Selection:
    """The policy: see the module docstring. ``able`` is in :data:`AUTO_ORDER` order."""
    names = tuple(b.name for b in able)
    costs = {b.name: c for b in able if (c := _estimate(b, "cost_estimate", request)) is not None}
    memory: dict[str, float] = {}
    first = able[0]
    if first.name not in costs:  # in front without a cost estimate: it keeps its place...
        memory[first.name] = _estimate(first, "memory_estimate", request) or 0.0
        if memory[first.name] <= MEMORY_LIMIT_BYTES:
            return Selection(first, rejected, names, costs)
    # ...unless over the memory limit. Cheapest first; a memory estimate is only needed until
    # one fits within the limit.
    ranked = sorted((b for b in able if b.name in costs), key=lambda b: costs[b.name])
    for backend in ranked:
        memory[backend.name] = _estimate(backend, "memory_estimate", request) or 0.0
        if memory[backend.name] <= MEMORY_LIMIT_BYTES:
            return Selection(backend, rejected, names, costs, memory)
    least = min((b for b in able if b.name in memory), key=lambda b: memory[b.name])
    return Selection(least, rejected, names, costs, memory)


def format_ms(seconds: float) -> str:
    """``0.12 ms``, ``3.4 ms``, ``150 ms``: two significant digits, no exponent."""
    ms = seconds * 1e3
    return f"{ms:,.0f} ms" if ms >= 10 else f"{ms:.2g} ms"
