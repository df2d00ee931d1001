"""What the triton backend serves, decided without importing triton (so ``qkv.explain`` and
``auto`` stay cheap and work where triton is not installed)."""

from __future__ import annotations

import importlib.util
import math
from functools import cache

import torch

from qkv.request import AttentionRequest
from qkv.scores import ScoreFunction, Softcap, is_additive

__all__ = ["KERNEL_DTYPES", "MAX_HEAD_DIM", "softcap_of", "triton_installed", "unsupported_reason"]

#: dtypes the backend serves. float32 runs exactly only with slow non-tensor-core matmuls
#: (``input_precision="ieee"``, which the launcher accepts when called directly); TF32 would cost
#: ~1e-3 relative error, so ``auto`` leaves float32 to exact backends.
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
LAUNCHER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
INDEX_LIMIT = 2**31
#: The kernels run one program per (tile, batch * head) with ``batch * head`` on the launch
#: grid's second axis, which CUDA caps at 2^16 - 1.
GRID_Y_LIMIT = 2**16 - 1


@cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def softcap_of(score_mod: ScoreFunction) -> float | None:
    """The cap of a :func:`qkv.scores.softcap` score function, read from its type and
    parameters (never from its name), or None for any other function."""
    return score_mod.cap if type(score_mod) is Softcap else None


def unsupported_reason(
    request: AttentionRequest,
    *,
    allow_cpu: bool = False,
    dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES,
) -> str | None:
    """Why the triton kernels cannot serve ``request`` (None when they can).

    Args:
        request: the call.
        allow_cpu: accept CPU tensors (only meaningful under ``TRITON_INTERPRET=1``, for tests).
        dtypes: the dtypes accepted (the backend: float16/bfloat16; the launcher also float32).
    """
    if not triton_installed():
        return "triton is not installed (pip install 'qkv[gpu]')"
    if request.device.type != "cuda" and not allow_cpu:
        return f"runs on CUDA tensors only; got {request.device.type} tensors"
    if request.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        return (
            f"the kernels take {names}; got {str(request.dtype).removeprefix('torch.')} "
            "(float32 would need TF32 matmuls, ~1e-3 relative error; sdpa serves it exactly)"
        )
    if max(request.head_dim, request.value_dim) > MAX_HEAD_DIM:
        return f"head dims up to {MAX_HEAD_DIM}; got D={request.head_dim}, Dv={request.value_dim}"
    if request.return_weights:
        return "return_weights: the kernels never materialise the (B, Hq, Nq, Nk) weights"
    mod = request.score_mod
    if mod is not None and not is_additive(mod) and softcap_of(mod) is None:
        return (
            f"score function {mod!r} is neither additive (materialised as a bias) nor softcap "
            "(computed in the kernel)"
        )
    if request.q_len == 0 or request.kv_len == 0 or request.batch == 0:
        return "empty sequences or batch"
    if request.batch * request.q_heads > GRID_Y_LIMIT:
        return (
            f"B * Hq = {request.batch} * {request.q_heads} programs on the launch grid's second "
            f"axis; CUDA allows at most {GRID_Y_LIMIT}"
        )
    # Kernel offsets are 32-bit where triton passes sizes that fit: stay below 2^31 elements.
    largest = max(_span(t) for t in (request.q, request.k, request.v))
    if largest >= INDEX_LIMIT:
        return f"a tensor of {largest} elements; the kernels index up to 2^31 - 1"
    bias = _bias_span(request)
    if bias >= INDEX_LIMIT:
        return f"a bias of {bias} elements; the kernels index up to 2^31 - 1"
    if request.dropout_p > 0 and request.q_len * request.kv_len >= INDEX_LIMIT:
        return (
            "dropout needs Nq * Nk < 2^31 (its random stream is indexed by position); "
            f"got {request.q_len} x {request.kv_len}"
        )
    return None


def _span(t: torch.Tensor) -> int:
    """Elements from ``t``'s first to its last addressed one (its numel when contiguous)."""
    if t.numel() == 0:
        return 0
    return 1 + sum(
        (size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True)
    )


def _bias_span(request: AttentionRequest) -> int:
    """Elements of the bias the kernels read: the bias tensor, or for an additive score function
    the tensor ``request.dense_bias()`` materialises (its broadcast shape read off a 2 x 2
    corner, evaluated only when the full score matrix could be that large)."""
    span = 0 if request.bias is None else _span(request.bias)
    mod = request.score_mod
    if mod is None or not is_additive(mod) or request.score_elements < INDEX_LIMIT:
        return span
    corner = request.modify_scores(
        torch.zeros((), device=request.device),
        (0, min(2, request.q_len)),
        (0, min(2, request.kv_len)),
    )
    shape = (1,) * (4 - corner.ndim) + tuple(corner.shape)
    full = (request.batch, request.q_heads, request.q_len, request.kv_len)
    return math.prod(n if seen > 1 else 1 for n, seen in zip(full, shape, strict=True))
