"""The ``triton`` backend: FlashAttention-2 kernels on CUDA, behind the :class:`Backend` protocol."""

from __future__ import annotations

from torch import Tensor

from qkv.backends.triton.support import unsupported_reason
from qkv.request import AttentionRequest

__all__ = ["TritonBackend"]


class TritonBackend:
    """Fused attention in Triton: float16/bfloat16 CUDA tensors, every mask kind, bias tensors and
    additive score functions (with gradients), softcap, dropout; split-KV decoding for a few
    query tokens against a long cache. Triton is imported only when a call runs here.

    ``_allow_cpu`` (private, for tests) also accepts CPU tensors, which only works under
    ``TRITON_INTERPRET=1``.
    """

    name = "triton"

    def __init__(self) -> None:
        self._allow_cpu = False

    def supports(self, request: AttentionRequest) -> str | None:
        return unsupported_reason(request, allow_cpu=self._allow_cpu)

    def forward(self, request: AttentionRequest) -> tuple[Tensor, Tensor | None]:
        from qkv.backends.triton.launch import triton_attention

        return triton_attention(request), None
