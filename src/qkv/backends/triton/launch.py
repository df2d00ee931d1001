"""Validating launcher and autograd function of the triton kernels.

:func:`triton_attention` takes an :class:`~qkv.request.AttentionRequest` and returns the output
``(B, Hq, Nq, Dv)``, differentiable in ``q, k, v`` and a bias (tensor or additive score function,
e.g. a learnable :class:`~qkv.scores.RelativePositionBias`). One or a few query tokens against a
long cache without gradients go to the split-KV decoding kernel instead.

How each request feature reaches the kernels:

- causal (either alignment): an offset; fully masked tiles skipped, the diagonal masked by index.
- mask functions, bool tensors, block masks: a :class:`~qkv.backends.triton.plan.MaskPlan`
  (tile lists + bitmaps of partial tiles), evaluated once per call, or once per block mask.
- bias tensors: read in the kernel through broadcast strides (no copy); their gradient ``dS`` is
  written by the ``dQ`` kernel into a ``(B, Hq, Nq, Nk)`` float32 buffer and summed down to the
  bias's shape (so ``O(B * Hq * Nq * Nk)`` memory only when a bias needs a gradient).
- additive score functions (ALiBi, relative position biases, chains of them): materialised once
  as a bias with ``request.dense_bias()`` (autograd carries the gradient to their tables).
- softcap: computed in the kernel, ``cap * tanh(s / cap)``, with its derivative in backward.
- dropout: Philox bits regenerated from ``(seed, batch * head, position)`` in backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import triton
from torch import Tensor
from torch.autograd.function import FunctionCtx

from qkv.backends.triton import kernels
from qkv.backends.triton.plan import MaskPlan, mask_plan
from qkv.backends.triton.support import (
    LAUNCHER_DTYPES,
    softcap_of,
    unsupported_reason,
)
from qkv.backends.triton.tuning import KernelConfig, interpreting, pick_config
from qkv.request import AttentionRequest
from qkv.scores import is_additive

__all__ = ["decode_eligible", "triton_attention"]

#: Most stacked query rows (GQA group x new tokens) the decoding kernel takes in one tile.
DECODE_MAX_ROWS = 64
#: Shortest cache worth splitting; shorter ones go through the flash kernel.
DECODE_MIN_KEYS = 256


def _padded(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


@dataclass(eq=False)
class _Call:
    """What the kernels need besides ``q, k, v, bias``; plans are built per tile size, lazily."""

    request: AttentionRequest
    softcap: float | None
    dropout_p: float
    seed: int
    plans: dict[tuple[int, int], MaskPlan] = field(default_factory=dict)

    def plan(self, config: KernelConfig) -> MaskPlan:
        key = (config.block_m, config.block_n)
        if key not in self.plans:
            self.plans[key] = mask_plan(self.request, *key)
        return self.plans[key]

    @property
    def precision(self) -> str:
        # float32 runs exactly (no TF32) when the launcher is called with it directly.
        return "ieee" if self.request.dtype == torch.float32 else "tf32"


def _bias_args(bias: Tensor | None, like: Tensor, shape: tuple[int, int, int, int]) -> list[Any]:
    """The bias pointer and its (batch, head, query, key) strides, 0 along broadcast dims."""
    if bias is None:
        return [like, 0, 0, 0, 0]
    full = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape)).expand(*shape)
    return [full, *full.stride()]


def _bits_args(plan: MaskPlan) -> list[Any]:
    """The partial-tile bitmap and its batch and head strides."""
    return [plan.bits, *plan.bits_strides()]


def _constexprs(
    call: _Call,
    q: Tensor,
    v: Tensor,
    config: KernelConfig,
    plan: MaskPlan,
    transposed: bool = False,
) -> dict[str, Any]:
    """Compile-time arguments: each distinct combination is one compiled kernel."""
    return {
        "D": q.shape[3],
        "DV": v.shape[3],
        "BLOCK_D": _padded(q.shape[3]),
        "BLOCK_DV": _padded(v.shape[3]),
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "MASK_MODE": plan.mode,
        "SOFTCAP": call.softcap is not None,
        "DROPOUT": call.dropout_p > 0,
        "PRECISION": call.precision,
        "FULL_RUN": plan.full_run(transposed),
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }


def _scalars(call: _Call, plan: MaskPlan) -> list[Any]:
    """Run-time scalars shared by every kernel, in kernel order."""
    return [
        call.request.scale,
        call.softcap or 1.0,
        plan.causal_offset,
        call.seed,
        call.dropout_p,
    ]


# --- forward -------------------------------------------------------------------------------------


def _launch_forward(
    call: _Call, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
    out: Tensor, lse2: Tensor, config: KernelConfig,
) -> None:  # fmt: skip
    B, H, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    plan = call.plan(config)
    grid = (triton.cdiv(Nq, config.block_m), B * H)
    kernels.attention_fwd_kernel[grid](
        q, k, v, out, lse2,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *plan.rows.args(),
        *_bits_args(plan),
        *_bias_args(bias, q, (B, H, Nq, Nk)),
        H, H // Hkv, Nq, Nk,
        *_scalars(call, plan),
        HAS_BIAS=bias is not None,
        **_constexprs(call, q, v, config, plan),
    )  # fmt: skip


def _forward(
    call: _Call, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``out (B, Hq, Nq, Dv)`` and the base-2 log-sum-exp ``(B * Hq, Nq)`` float32."""
    B, H, Nq, D = q.shape
    Dv = v.shape[3]
    out = q.new_empty(B, H, Nq, Dv)
    lse2 = torch.empty(B * H, Nq, dtype=torch.float32, device=q.device)

    def run(config: KernelConfig) -> None:
        _launch_forward(call, q, k, v, bias, out, lse2, config)

    config = pick_config("fwd", _padded(D), _padded(Dv), q.dtype, q.device, run)
    run(config)
    return out, lse2


# --- backward ------------------------------------------------------------------------------------


def _backward(
    call: _Call, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, out: Tensor,
    lse2: Tensor, dout: Tensor, bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:  # fmt: skip
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    # D_i = rowsum(dO * O), with O the (dropped-out) output forward returned.
    delta = (dout.float() * out.float()).sum(-1).reshape(B * H, Nq).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbias = (
        torch.zeros(B, H, Nq, Nk, dtype=torch.float32, device=q.device)
        if bias_grad
        else torch.empty(1, dtype=torch.float32, device=q.device)
    )
    bias_args = _bias_args(bias, q, (B, H, Nq, Nk))

    def run_dkdv(config: KernelConfig) -> None:
        plan = call.plan(config)
        grid = (triton.cdiv(Nk, config.block_n), B * Hkv)
        kernels.attention_bwd_dkdv_kernel[grid](
            q, k, v, dout, lse2, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
            *plan.cols.args(),
            *_bits_args(plan),
            *bias_args,
            H, Hkv, H // Hkv, Nq, Nk,
            *_scalars(call, plan),
            HAS_BIAS=bias is not None,
            **_constexprs(call, q, v, config, plan, transposed=True),
        )  # fmt: skip

    def run_dq(config: KernelConfig) -> None:
        plan = call.plan(config)
        grid = (triton.cdiv(Nq, config.block_m), B * H)
        kernels.attention_bwd_dq_kernel[grid](
            q, k, v, dout, lse2, delta, dq, dbias,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
            *plan.rows.args(),
            *_bits_args(plan),
            *bias_args,
            H, H // Hkv, Nq, Nk,
            *_scalars(call, plan),
            HAS_BIAS=bias is not None,
            BIAS_GRAD=bias_grad,
            **_constexprs(call, q, v, config, plan),
        )  # fmt: skip

    run_dkdv(pick_config("dkdv", _padded(D), _padded(Dv), q.dtype, q.device, run_dkdv))
    run_dq(pick_config("dq", _padded(D), _padded(Dv), q.dtype, q.device, run_dq))
    grad_bias = _reduce_to(dbias, bias) if bias_grad and bias is not None else None
    return dq, dk, dv, grad_bias


def _reduce_to(full: Tensor, bias: Tensor) -> Tensor:
    """Sum a ``(B, Hq, Nq, Nk)`` gradient down to ``bias``'s broadcast shape."""
    shape4 = (1,) * (4 - bias.ndim) + tuple(bias.shape)
    dims = [d for d in range(4) if shape4[d] == 1 and full.shape[d] != 1]
    reduced = full.sum(dim=dims, keepdim=True) if dims else full
    return reduced.reshape(bias.shape).to(bias.dtype)


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, call: _Call
    ) -> Tensor:
        out, lse2 = _forward(call, q, k, v, bias)
        ctx.save_for_backward(q, k, v, bias, out, lse2)  # type: ignore[arg-type]
        ctx.call = call  # type: ignore[attr-defined]
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: the kernels' gradients have no graph
            raise RuntimeError(
                "double backward (create_graph=True) is not supported by backend 'triton'; "
                "use backend='chunked' or 'reference'"
            )
        q, k, v, bias, out, lse2 = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = _backward(ctx.call, q, k, v, bias, out, lse2, dout, bias_grad)
        return dq, dk, dv, dbias, None


# --- decoding ------------------------------------------------------------------------------------


def _decode_serves(request: AttentionRequest) -> bool:
    """Whether the decoding kernel can compute ``request`` at all: no gradient, a few stacked
    query rows (``Hq / Hkv * Nq <= 64``), no mask beyond causal, no bias, no dropout."""
    return (
        not request.needs_grad
        and request.group_size * request.q_len <= DECODE_MAX_ROWS
        and request.mask is None
        and request.bias is None
        and (request.score_mod is None or not is_additive(request.score_mod))
        and request.dropout_p == 0.0
    )


def decode_eligible(request: AttentionRequest) -> bool:
    """Whether the decoding kernel should serve ``request``: it can, and the cache is long."""
    return _decode_serves(request) and request.kv_len >= DECODE_MIN_KEYS


def _num_splits(request: AttentionRequest, block_n: int) -> int:
    """Enough key splits to give every multiprocessor about two programs."""
    programs = request.batch * request.kv_heads
    if request.device.type == "cuda":
        sms = torch.cuda.get_device_properties(request.device).multi_processor_count
    else:
        sms = 2
    wanted = max(1, -(-2 * sms // programs))
    return max(1, min(wanted, triton.cdiv(request.kv_len, block_n), 128))


def _decode(request: AttentionRequest, softcap: float | None) -> Tensor:
    q, k, v = request.q, request.k, request.v
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hkv
    block_n = 32 if interpreting() else 64
    splits = _num_splits(request, block_n)
    split_len = triton.cdiv(triton.cdiv(Nk, splits), block_n) * block_n
    splits = triton.cdiv(Nk, split_len)
    rows = _padded(G * Nq)
    part_o = torch.empty(B * Hkv, splits, rows, _padded(Dv), dtype=torch.float32, device=q.device)
    part_lse = torch.empty(B * Hkv, splits, rows, dtype=torch.float32, device=q.device)
    offset = (Nk - Nq) if request.causal == "bottom_right" else 0
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    kernels.decode_split_kernel[(splits, B * Hkv)](
        q, k, v, part_o, part_lse,
        *q.stride(), *k.stride(), *v.stride(),
        Hkv, G, Nq, Nk, split_len, splits,
        request.scale, softcap or 1.0, offset,
        D=D, DV=Dv, BLOCK_D=_padded(D), BLOCK_DV=_padded(Dv), BLOCK_R=rows, BLOCK_N=block_n,
        CAUSAL=request.causal is not None, SOFTCAP=softcap is not None,
        PRECISION=precision, num_warps=4, num_stages=2,
    )  # fmt: skip
    out = q.new_empty(B, H, Nq, Dv)
    kernels.decode_combine_kernel[(B * Hkv,)](
        part_o, part_lse, out, *out.stride(), Hkv, G, Nq, splits,
        DV=Dv, BLOCK_DV=_padded(Dv), BLOCK_R=rows, BLOCK_S=_padded(splits), num_warps=4,
    )  # fmt: skip
    return out


# --- entry point ---------------------------------------------------------------------------------


def _draw_seed() -> int:
    # From PyTorch's default CPU generator, so torch.manual_seed(s) reproduces a call's dropout.
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def triton_attention(
    request: AttentionRequest, *, dropout_seed: int | None = None, decode: bool | None = None
) -> Tensor:
    """Attention through the triton kernels: ``out (B, Hq, Nq, Dv)``.

    Args:
        request: a validated call (:func:`qkv.request.build_request`). CUDA tensors, or CPU
            tensors under ``TRITON_INTERPRET=1``; float16, bfloat16, or float32 (exact,
            non-tensor-core matmuls).
        dropout_seed: the Philox seed of the dropout bits; None draws one from PyTorch's default
            generator.
        decode: force (True) or forbid (False) the split-KV decoding kernel; None lets
            :func:`decode_eligible` decide.

    Raises:
        ValueError: the kernels cannot serve ``request`` (the message says why).
    """
    reason = unsupported_reason(request, allow_cpu=interpreting(), dtypes=LAUNCHER_DTYPES)
    if reason is not None:
        raise ValueError(f"triton kernels cannot serve this call: {reason} ({request.describe()})")
    softcap = None
    if request.score_mod is not None and not is_additive(request.score_mod):
        softcap = softcap_of(request.score_mod)
    use_decode = decode_eligible(request) if decode is None else decode
    if use_decode:
        if not _decode_serves(request):
            raise ValueError(f"the decoding kernel cannot serve this call ({request.describe()})")
        return _decode(request, softcap)
    bias = (
        request.dense_bias() if request.score_mod is not None and softcap is None else request.bias
    )
    seed = _draw_seed() if dropout_seed is None and request.dropout_p > 0 else (dropout_seed or 0)
    call = _Call(request=request, softcap=softcap, dropout_p=request.dropout_p, seed=seed)
    return _TritonAttention.apply(request.q, request.k, request.v, bias, call)
