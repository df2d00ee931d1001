"""Attention backends behind one dispatch. See :mod:`qkv.backends.registry`."""

from qkv.backends.chunked import ChunkedBackend
from qkv.backends.cost import AUTO_ORDER_BUILT_IN
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

# Registered in this order so available_backends() keeps its order; auto walks them in the order
# of qkv.backends.cost, where every built-in estimate lives. Importing the triton backend does
# not import triton: its kernels load on the first call. The compiled CPU kernel is built on
# first use.
for _backend in (
    SdpaBackend(),
    ReferenceBackend(),
    ChunkedBackend(),
    TritonBackend(),
    CpuBackend(),
):
    register_backend(_backend, auto_priority=0)
AUTO_ORDER[:] = list(AUTO_ORDER_BUILT_IN)

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
