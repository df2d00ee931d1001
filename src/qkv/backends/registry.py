"""The backend registry: named implementations of one attention contract, and how `auto` picks.

A backend is any object with a ``name``, ``supports(request) -> str | None`` (None when it can
serve the request, otherwise the reason it cannot, in words a user can act on) and
``forward(request) -> (out, weights | None)``. ``auto`` walks :data:`AUTO_ORDER` and takes the
first backend that supports the request; a backend named explicitly raises its reason instead of
falling back silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import Tensor

from qkv.request import AttentionRequest

__all__ = [
    "AUTO_ORDER",
    "Backend",
    "Selection",
    "available_backends",
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
#: Backends `auto` tries, fastest first. `reference` is last: it always serves.
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
    """Which backend serves a request, and why each one tried before it did not."""

    backend: Backend
    rejected: dict[str, str] = field(default_factory=dict)


def select_backend(request: AttentionRequest, name: str = "auto") -> Selection:
    """Pick the backend for ``request``: the named one (raising its reason if it cannot serve),
    or for ``"auto"`` the first in :data:`AUTO_ORDER` that can."""
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
    for candidate in AUTO_ORDER:
        backend = _REGISTRY[candidate]
        reason = backend.supports(request)
        if reason is None:
            return Selection(backend, rejected)
        rejected[candidate] = reason
    details = "; ".join(f"{n}: {r}" for n, r in rejected.items())
    raise ValueError(f"no backend can serve this call ({request.describe()}): {details}")
