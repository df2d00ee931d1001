"""Attention backends behind one dispatch. See :mod:`qkv.backends.registry`."""

from qkv.backends.chunked import ChunkedBackend
from qkv.backends.reference import ReferenceBackend
from qkv.backends.registry import (
    AUTO_ORDER,
    Backend,
    Selection,
    available_backends,
    get_backend,
    register_backend,
    select_backend,
    unregister_backend,
)
from qkv.backends.sdpa import SdpaBackend

register_backend(SdpaBackend(), auto_priority=0)
register_backend(ReferenceBackend(), auto_priority=1)
register_backend(ChunkedBackend())  # named only; the auto policy comes later

__all__ = [
    "AUTO_ORDER",
    "Backend",
    "ReferenceBackend",
    "SdpaBackend",
    "Selection",
    "available_backends",
    "get_backend",
    "register_backend",
    "select_backend",
    "unregister_backend",
]
