"""The backend registry: named implementations of one attention contract, and how `auto` picks.

A backend is any object with a ``name``, ``supports(request) -> str | None`` (None when it can
serve the request, otherwise the reason it cannot, in words a user can act on) and
``forward(request) -> (out, weights | None)``. A backend named explicitly raises its reason
instead of falling back silently. A backend that can return each row's log-sum-exp
(``return_lse=True``) also has ``forward_lse(request) -> (out, weights | None, lse)``; one
without it is never given such a call (:func:`serve_reason`).

How ``auto`` picks (:func:`select_backend`): it walks :data:`AUTO_ORDER` and keeps the backends
that can serve the call. A backend may also give ``cost_estimate(request) -> seconds`` and
``memory_estimate(request) -> bytes``. If the first backend that can serve gives no cost
estimate, it is taken (a backend a user registers in front keeps its place) unless its memory
estimate exceeds :data:`MEMORY_LIMIT_BYTES`. Otherwise ``auto`` takes the cheapest estimate
among those whose expected extra memory stays within the limit (the least memory if none does);
ties go to the earlier backend. Where the cheapest estimates are too close to trust on a large
call, the close candidates are timed once per shape class on this machine and the winner is
remembered (:mod:`qkv.backends.measured`; ``QKV_AUTO_MEASURE=0`` turns it off).

The built-in order and every built-in estimate live in one room, :mod:`qkv.backends.cost`
(triton, sdpa, cpu, chunked, reference; triton gives no time estimate, so wherever it serves it
is first in line and taken unless over the memory limit); a backend you register gives its own
``cost_estimate``/``memory_estimate`` methods, or none.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from qkv.backends import measured
from qkv.backends.cost import (
    MEMORY_LIMIT_BYTES,
    DeviceRates,
    device_rates,
    estimate_bytes,
    estimate_seconds,
)
from qkv.request import AttentionRequest

__all__ = [
    "AUTO_ORDER",
    "MEMORY_LIMIT_BYTES",
    "Backend",
    "DeviceRates",
    "Selection",
    "available_backends",
    "device_rates",
    "forget_selections",
    "format_ms",
    "get_backend",
    "register_backend",
    "select_backend",
    "serve_reason",
    "unregister_backend",
]


@runtime_checkable
class Backend(Protocol):
    """What a backend provides. ``forward`` returns ``out (B, Hq, Nq, Dv)`` and, when
    ``request.return_weights``, the ``(B, Hq, Nq, Nk)`` probabilities (else None)."""

    name: str

    def supports(self, request: AttentionRequest) -> str | None: ...

    def forward(self, request: AttentionRequest) -> tuple[Tensor, Tensor | None]: ...


def serve_reason(backend: Backend, request: AttentionRequest) -> str | None:
    """Why ``backend`` cannot serve ``request`` (None when it can): its own ``supports``, and
    for ``return_lse=True`` whether it has ``forward_lse`` at all."""
    if request.return_lse and not callable(getattr(backend, "forward_lse", None)):
        return "it does not return the log-sum-exp (return_lse=True)"
    return backend.supports(request)


_REGISTRY: dict[str, Backend] = {}
#: Backends `auto` considers, in order of preference. `reference` is last: it always serves.
AUTO_ORDER: list[str] = []


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
    forget_selections()
    if backend.name in AUTO_ORDER:
        AUTO_ORDER.remove(backend.name)
    if auto_priority is not None:
        AUTO_ORDER.insert(auto_priority, backend.name)


def unregister_backend(name: str) -> None:
    """Remove a backend (and its place in ``auto``)."""
    get_backend(name)
    del _REGISTRY[name]
    forget_selections()
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
        measured_class: the choice was timed on this machine for the call's shape class, not
            taken from the estimates (:mod:`qkv.backends.measured`).
    """

    backend: Backend
    rejected: dict[str, str] = field(default_factory=dict)
    able: tuple[str, ...] = ()
    costs: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    measured_class: bool = False

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
            elif self.measured_class and name in self.costs:
                notes[name] = (
                    f"could serve, estimated {format_ms(self.costs[name])}; {chosen} was chosen "
                    "by timing the closest estimates on this machine for calls of this shape"
                )
            elif name not in self.costs or chosen not in self.costs:
                notes[name] = "could serve, but gives no cost estimate and is not first in line"
            else:
                notes[name] = (
                    f"could serve, estimated {format_ms(self.costs[name])} "
                    f"against {format_ms(self.costs[chosen])}"
                )
        return notes


def select_backend(
    request: AttentionRequest, name: str = "auto", *, measure: bool = True
) -> Selection:
    """Pick the backend for ``request``: the named one (raising its reason if it cannot serve),
    or for ``"auto"`` the policy in this module's docstring. ``measure=False`` never times
    backends (:mod:`qkv.backends.measured`), but still uses a choice measured before."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string; got {type(name).__name__}")
    if name != "auto":
        backend = get_backend(name)
        reason = serve_reason(backend, request)
        if reason is not None:
            raise ValueError(
                f"backend {name!r} cannot serve this call: {reason} ({request.describe()})"
            )
        return Selection(backend)
    key = _signature(request, measure)
    remembered = _remembered(key, request)
    if remembered is not None:
        return remembered
    selection = _select_auto(request, measure)
    _remember(key, request, selection)
    return selection


def _select_auto(request: AttentionRequest, measure: bool) -> Selection:
    rejected: dict[str, str] = {}
    able: list[Backend] = []
    for candidate in AUTO_ORDER:
        backend = _REGISTRY[candidate]
        reason = serve_reason(backend, request)
        if reason is None:
            able.append(backend)
        else:
            rejected[candidate] = reason
    if not able:
        details = "; ".join(f"{n}: {r}" for n, r in rejected.items())
        raise ValueError(f"no backend can serve this call ({request.describe()}): {details}")
    return _cheapest(able, request, rejected, measure)


# --- remembered selections --------------------------------------------------------------------
# A model calls attention with the same shapes and the same mask object step after step, and
# pricing a call (the tile census, five estimates) costs 0.1-1 ms: a few percent of a small
# call. So auto's answer is remembered per *call signature*: everything supports() and the
# estimates read (shapes, strides, dtypes, gradient needs, flags, global modes) and the identity
# of the mask and score objects, which are immutable once built. A mask tensor is keyed by its
# identity and version counter, so an in-place edit is priced afresh. Entries hold weak
# references where the object allows them, and the memo is bounded.
_SELECTIONS: OrderedDict[Hashable, tuple[tuple[Any, ...], Selection]] = OrderedDict()
_SELECTIONS_SIZE = 256


def forget_selections() -> None:
    """Drop every remembered ``auto`` selection (after a backend is registered or removed, or a
    measured choice is forgotten; tests that patch a backend call it too)."""
    _SELECTIONS.clear()


def _tensor_layout(t: Tensor | None) -> Hashable:
    if t is None:
        return None
    return (tuple(t.shape), t.stride(), t.dtype, t.device, t.requires_grad)


def _referent(obj: Any) -> Hashable:
    """A mask or score object's part of the key: its identity (and, for a tensor, its version
    and layout; for a module, which of its parameters train)."""
    if obj is None:
        return None
    if isinstance(obj, Tensor):
        return (id(obj), obj._version, _tensor_layout(obj))
    if isinstance(obj, torch.nn.Module):
        return (id(obj), tuple(p.requires_grad for p in obj.parameters()))
    return id(obj)


def _hold(obj: Any) -> Any:
    try:
        return weakref.ref(obj)
    except TypeError:  # an object without weak references is held (the memo is bounded)
        return lambda obj=obj: obj


def _signature(request: AttentionRequest, measure: bool) -> Hashable:
    return (
        _tensor_layout(request.q),
        _tensor_layout(request.k),
        _tensor_layout(request.v),
        _tensor_layout(request.bias),
        _referent(request.mask),
        _referent(request.score_mod),
        request.causal,
        request.scale,
        request.dropout_p,
        request.return_weights,
        request.return_lse,
        torch.is_grad_enabled(),
        torch.are_deterministic_algorithms_enabled(),
        measured.enabled() and measure,
        measured.forgotten(),
    )


def _remembered(key: Hashable, request: AttentionRequest) -> Selection | None:
    entry = _SELECTIONS.get(key)
    if entry is None:
        return None
    held, selection = entry
    if any(
        ref() is not obj for ref, obj in zip(held, (request.mask, request.score_mod), strict=True)
    ):
        del _SELECTIONS[key]  # an id reused by a new object after the old one died
        return None
    _SELECTIONS.move_to_end(key)
    return selection


def _remember(key: Hashable, request: AttentionRequest, selection: Selection) -> None:
    _SELECTIONS[key] = ((_hold(request.mask), _hold(request.score_mod)), selection)
    if len(_SELECTIONS) > _SELECTIONS_SIZE:
        _SELECTIONS.popitem(last=False)


def _estimate(backend: Backend, what: str, request: AttentionRequest) -> float | None:
    if what == "cost_estimate":
        return estimate_seconds(backend, request)
    return estimate_bytes(backend, request)


def _cheapest(
    able: list[Backend], request: AttentionRequest, rejected: dict[str, str], measure: bool
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
    fits = [b for b in ranked if memory[b.name] <= MEMORY_LIMIT_BYTES]
    if not fits:
        least = min((b for b in able if b.name in memory), key=lambda b: memory[b.name])
        return Selection(least, rejected, names, costs, memory)
    by_name = {b.name: b for b in fits}
    known = measured.known_choice(request, list(by_name))
    if known is not None:
        return Selection(by_name[known], rejected, names, costs, memory, measured_class=True)
    close = measured.worth_measuring(request, {b.name: costs[b.name] for b in fits})
    if close and measure:
        winner = measured.measure_choice(request, [by_name[n] for n in close])
        return Selection(by_name[winner], rejected, names, costs, memory, measured_class=True)
    return Selection(fits[0], rejected, names, costs, memory)


def format_ms(seconds: float) -> str:
    """``0.12 ms``, ``3.4 ms``, ``150 ms``: two significant digits, no exponent."""
    ms = seconds * 1e3
    return f"{ms:,.0f} ms" if ms >= 10 else f"{ms:.2g} ms"
