"""Triton GPU backend: FlashAttention-2 forward/backward and split-KV decoding kernels.

Importing this package does not import triton; the kernels compile on first use. ``qkv.backends``
registers it first in the ``auto`` order: it serves float16/bfloat16 CUDA tensors and gives its
reason otherwise. See ``docs/gpu.md``.
"""

from qkv.backends.triton.backend import TritonBackend

__all__ = ["TritonBackend"]
