"""Attention backends behind one dispatch. See :mod:`qkv.backends.registry`."""

from qkv.backends.chunked import ChunkedBackend
from qkv.backends.reference import ReferenceBackend
from qkv.backends.registry import (
    AUTO_ORDER,
    MEMORY_LIMIT_BYTES,
    Backend,
    DeviceRates,
    Selection,
    available_backends,
    get_backend,
    register_backend,
    select_backend,
    unregister_backend,
)
from qkv.backends.sdpa import SdpaBackend

# auto considers them in the order sdpa, chunked, reference and takes the cheapest estimate
# (see registry.py). Registered in this order so available_backends() keeps its order.
register_backend(SdpaBackend(), auto_priority=0)
register_backend(ReferenceBackend(), auto_priority=1)
register_backend(ChunkedBackend(), auto_priority=1)

__all__ = [
    "AUTO_ORDER",
    "MEMORY_LIMIT_BYTES",
    "Backend",
    "ChunkedBackend",
    "DeviceRates",
    "ReferenceBackend",
    "SdpaBackend",
    "Selection",
    "available_backends",
    "get_backend",
    "register_backend",
    "select_backend",
    "unregister_backend",
]
