"""Attention backends behind one dispatch. See :mod:`qkv.backends.registry`."""

from qkv.backends.chunked import ChunkedBackend
from qkv.backends.cpu import CpuBackend
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
from qkv.backends.triton import TritonBackend

# auto considers them in the order triton, sdpa, chunked, reference (see registry.py). triton
# gives no cost estimate, so where it serves (float16/bfloat16 CUDA tensors, triton installed)
# it is first in line and taken; elsewhere it gives its reason and auto takes the cheapest
# estimate among the others. Registered in this order so available_backends() keeps its order.
# Importing the triton backend does not import triton: its kernels load on the first call.
register_backend(SdpaBackend(), auto_priority=0)
register_backend(ReferenceBackend(), auto_priority=1)
register_backend(ChunkedBackend(), auto_priority=1)
register_backend(TritonBackend(), auto_priority=0)
# The compiled CPU kernel (built on first use): its cost estimate decides against sdpa/chunked.
register_backend(CpuBackend(), auto_priority=1)

__all__ = [
    "AUTO_ORDER",
    "MEMORY_LIMIT_BYTES",
    "Backend",
    "ChunkedBackend",
    "CpuBackend",
    "DeviceRates",
    "ReferenceBackend",
    "SdpaBackend",
    "Selection",
    "TritonBackend",
    "available_backends",
    "get_backend",
    "register_backend",
    "select_backend",
    "unregister_backend",
]
