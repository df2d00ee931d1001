"""The ``triton`` backend: FlashAttention-2 kernels on CUDA, behind the :class:`Backend` protocol."""

from __future__ import annotations

from torch import Tensor

from qkv.backends.triton.support import unsupported_reason
from qkv.request import AttentionRequest
from qkv.scores import is_additive

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

    def memory_estimate(self, request: AttentionRequest) -> int:
        """Bytes beyond inputs and output: the float32 log-sum-exp per query row; an additive
        score function materialised as a float32 ``(Hq, Nq, Nk)`` bias; with autograd also
        ``D_i``, the float32 copies of ``dO`` and ``O`` it is computed from, and a float32
        ``(B, Hq, Nq, Nk)`` buffer when a bias needs a gradient. Partial-tile mask bitmaps
        (at most ``Nq * Nk`` bytes per distinct batch/head of the mask) are not counted."""
        rows = request.batch * request.q_heads * request.q_len
        total = 4 * rows
        if request.score_mod is not None and is_additive(request.score_mod):
            total += 4 * request.q_heads * request.q_len * request.kv_len
        if request.needs_grad:
            total += 4 * rows + 4 * rows * request.value_dim
            if request.bias is not None and request.bias.requires_grad:
                total += 4 * request.score_elements
        return total

    def forward(self, request: AttentionRequest) -> tuple[Tensor, Tensor | None]:
        from qkv.backends.triton.launch import triton_attention

        return triton_attention(request), None
