"""Triton GPU backend: FlashAttention-2 forward/backward and split-KV decoding kernels.

Importing this package does not import triton; the kernels are compiled on first use.
See ``docs/gpu.md``.
"""

from qkv.backends.triton.backend import TritonBackend

__all__ = ["TritonBackend"]
