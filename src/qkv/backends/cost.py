"""The cost model: what every built-in backend is expected to cost, and the order ``auto`` walks.

One room for it, outside the kernel files, so that the numbers ``auto`` compares are written
(and calibrated) side by side. :func:`estimate_seconds` and :func:`estimate_bytes` answer for a
built-in backend from the functions here, and for a backend you registered from its own
``cost_estimate`` / ``memory_estimate`` methods, if it has them.

The estimates are coarse models built from :class:`DeviceRates` (a matmul rate, a cost per
element of memory-bound elementwise work, a cost per tensor op) calibrated with ``qkv bench`` on
the CPU; they only need to order the backends correctly. Tile counts come from the request's one
tile census (:func:`qkv.backends.block_mask.request_status`), the same the kernels then run with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from qkv.backends.block_mask import EMPTY, FULL, UNKNOWN, request_status
from qkv.backends.chunked import ChunkedBackend
from qkv.backends.cpu.backend import (
    CpuBackend,
    compute_dtype,
    decodes,
    uses_half_gemm,
)
from qkv.backends.reference import ReferenceBackend
from qkv.backends.sdpa import SdpaBackend, is_plain, uses_is_causal
from qkv.backends.triton.backend import TritonBackend
from qkv.request import AttentionRequest, stats_dtype
from qkv.scores import is_additive

__all__ = [
    "AUTO_ORDER_BUILT_IN",
    "MEMORY_LIMIT_BYTES",
    "RATES",
    "DeviceRates",
    "device_rates",
    "estimate_bytes",
    "estimate_seconds",
]

#: The order ``auto`` walks the built-in backends in (ties go to the earlier one). triton gives
#: no cost estimate, so wherever it serves (float16/bfloat16 CUDA tensors, triton installed) it
#: is taken, unless over the memory limit; elsewhere the estimates decide among the rest.
AUTO_ORDER_BUILT_IN = ("triton", "sdpa", "cpu", "chunked", "reference")

#: Expected extra memory above which ``auto`` avoids a backend when another fits. 1 GiB: the
#: size of a float32 score matrix for B * H = 16 at N = 4096, or of SDPA's float copy of a dense
#: mask for B * H = 1 at N = 16384. Above it a dense path risks running out of memory on an
#: ordinary machine and spends its time on memory traffic, while the tiled backends need
#: ``O(N * D)``.
MEMORY_LIMIT_BYTES = 1 << 30


@dataclass(frozen=True)
class DeviceRates:
    """Throughput figures the cost estimates are built from.

    Attributes:
        matmul_flops: floating-point operations per second of the attention matmuls in a fused
            kernel (SDPA); other backends scale it by their own efficiency.
        element_seconds: seconds per element of one memory-bound elementwise pass (exp, add,
            compare) over float32 scores.
        op_seconds: fixed cost of launching one tensor op from Python.
        memory_bytes_per_second: bytes per second read from memory, the limit of a call that
            reads a long key/value cache for a few queries (decoding).
    """

    matmul_flops: float
    element_seconds: float
    op_seconds: float
    memory_bytes_per_second: float = 2e10

    def __post_init__(self) -> None:
        for name in ("matmul_flops", "element_seconds", "op_seconds", "memory_bytes_per_second"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0; got {value!r}")


#: Per device type. CPU: a 2-core Xeon, float32 (SDPA at N = 4096: about 290 GFLOP/s; one
#: elementwise pass over 8 x 256 x 256 scores about 50 us). CUDA: rough H100-class guesses, not
#: tuned; every op there is a kernel launch.
RATES: dict[str, DeviceRates] = {
    "cpu": DeviceRates(matmul_flops=2.9e11, element_seconds=1e-10, op_seconds=1e-5),
    "cuda": DeviceRates(
        matmul_flops=2e14, element_seconds=5e-13, op_seconds=8e-6, memory_bytes_per_second=2e12
    ),
}


def device_rates(device: torch.device) -> DeviceRates:
    """The :class:`DeviceRates` of ``device`` (the CPU's for unknown device types)."""
    return RATES.get(device.type, RATES["cpu"])


#: Elementwise passes to build one entry of a dense mask or bias from index functions (int64
#: index arithmetic, comparisons, the bool result), in units of a float32 pass.
BUILD_PASSES = 8


def kv_read_seconds(request: AttentionRequest, rates: DeviceRates, times: float = 1.0) -> float:
    """Time to read K and V ``times`` over at the device's memory rate."""
    kv = request.k.numel() * request.k.element_size() + request.v.numel() * request.v.element_size()
    return times * kv / rates.memory_bytes_per_second


def dense_build_seconds(request: AttentionRequest, rates: DeviceRates) -> float:
    """Time a dense backend spends materializing the request's mask function, non-plain causal
    mask and additive score function as ``(.., Nq, Nk)`` tensors (mask tensors are given)."""
    plane = request.q_len * request.kv_len
    elements = request.dense_mask_elements()
    if request.causal is not None and request.q_len != request.kv_len:
        elements += plane
    if request.score_mod is not None:
        elements += request.q_heads * plane
    return elements * BUILD_PASSES * rates.element_seconds


# --- sdpa --------------------------------------------------------------------------------------


#: Backward over forward time of PyTorch's fused CPU kernel, and of qkv's compiled kernel
#: (fp32, N = 4096, no mask and causal, measured with benchmarks/cpu_kernel.py: SDPA 472 / 109 ms
#: without a mask, qkv's kernel 559 / 145 ms).
SDPA_TRAINING_FACTOR = 4.3
CPU_KERNEL_TRAINING_FACTOR = 3.9


def sdpa_seconds(request: AttentionRequest) -> float:
    """The fused kernel's matmuls at the device's matmul rate (half of them for ``is_causal``,
    which skips the masked half), plus, for a call that is not plain, building the dense mask or
    bias and two passes over it inside the kernel."""
    rates = device_rates(request.device)
    flops = 2.0 * request.score_elements * (request.head_dim + request.value_dim)
    plain = is_plain(request)
    if uses_is_causal(request):
        flops /= 2
    # SDPA's CPU kernels read K and V once per query head (grouped heads repeat them): the
    # floor of a call with few queries against a long cache
    groups = request.q_heads // request.kv_heads
    seconds = max(flops / rates.matmul_flops, kv_read_seconds(request, rates, groups))
    seconds += 4 * rates.op_seconds
    if not plain:
        seconds += dense_build_seconds(request, rates)
        seconds += 2 * request.score_elements * rates.element_seconds
    return seconds * (SDPA_TRAINING_FACTOR if request.needs_grad else 1.0)


def sdpa_bytes(request: AttentionRequest) -> int:
    """The fused kernel's O(N * D) buffers (calibrated with ``qkv bench`` on the CPU: about 2x
    the size of q forward, 18x with autograd), plus the O(Nq * Nk) dense mask or bias we hand it
    when the call is not plain (int64 index arithmetic to build a mask, a byte to keep it, four
    for SDPA's float copy)."""
    linear = request.q.numel() * request.q.element_size() * (18 if request.needs_grad else 2)
    if is_plain(request):
        return linear
    mask_elements = request.dense_mask_elements()
    if isinstance(request.mask, Tensor):
        mask_elements += request.mask.numel()
    if request.causal is not None and mask_elements == 0:
        mask_elements = request.q_len * request.kv_len
    bias_elements = 0
    if request.bias is not None:
        bias_elements += request.bias.numel()
    if request.score_mod is not None:
        bias_elements += request.q_heads * request.q_len * request.kv_len
    return linear + mask_elements * 13 + bias_elements * 2 * request.q.element_size()


# --- reference ---------------------------------------------------------------------------------


def reference_seconds(request: AttentionRequest) -> float:
    """Two unfused matmuls (at 80% of the fused rate), about ten elementwise passes over the
    ``(B, Hq, Nq, Nk)`` scores (scale, cast, mask, max, exp, sum, divide), building a dense mask
    or bias, a dozen ops. Backward counted as 2x."""
    rates = device_rates(request.device)
    flops = 2.0 * request.score_elements * (request.head_dim + request.value_dim)
    seconds = (
        flops / (0.8 * rates.matmul_flops)
        + 10 * request.score_elements * rates.element_seconds
        + dense_build_seconds(request, rates)
        + 12 * rates.op_seconds
    )
    # K and V repeated for grouped heads: read, written and read again (the decoding floor)
    groups = request.q_heads // request.kv_heads
    seconds = max(seconds, kv_read_seconds(request, rates, 1 + 2 * groups))
    return seconds * (3.0 if request.needs_grad else 1.0)


def reference_bytes(request: AttentionRequest) -> int:
    """About three live score-sized tensors in the forward pass, three and a half more kept for
    backward, one more for the masked copy, and the mask itself with its int64 index arithmetic
    (measured with ``qkv bench``)."""
    stats_bytes = torch.empty((), dtype=stats_dtype(request.dtype)).element_size()
    live = 3.0 + (3.5 if request.needs_grad else 0.0) + (1.0 if request.has_mask else 0.0)
    return int(request.score_elements * stats_bytes * live + request.dense_mask_elements() * 9)


# --- chunked -----------------------------------------------------------------------------------


def chunked_census(backend: ChunkedBackend, request: AttentionRequest) -> tuple[int, int, int]:
    """``(visited, masked, unknown)`` tiles of a call, known without evaluating any mask:
    tiles computed, tiles on which the mask is evaluated, and of those the ones whose state is
    only found by evaluating the mask (a mask function of your own)."""
    tile_q, tile_kv = backend.tile_sizes(request)
    if request.q_len <= tile_q and request.kv_len <= tile_kv:  # one tile: skip the work
        return 1, int(request.has_mask), int(request.has_mask)
    status = request_status(request, tile_q, tile_kv, resolve=False)
    visited = int((status != EMPTY).sum())
    unknown = int((status == UNKNOWN).sum())
    return visited, visited - int((status == FULL).sum()), unknown


def chunked_seconds(backend: ChunkedBackend, request: AttentionRequest) -> float:
    """The matmuls of the visited tiles at 80% of the fused rate, about eight elementwise passes
    over each visited score tile, a dozen tensor ops per tile (the Python loop), the mask on the
    tiles where it is evaluated, and for tiles of unknown state the summary's own evaluation.
    Backward counted as 3.5x forward, per-tile ops 3x."""
    rates = device_rates(request.device)
    tile_q, tile_kv = backend.tile_sizes(request)
    tq, tk = min(tile_q, request.q_len), min(tile_kv, request.kv_len)
    visited, masked, unknown = chunked_census(backend, request)
    pairs = request.batch * request.q_heads * tq * tk  # entries of one score tile
    flops = 2.0 * pairs * (request.head_dim + request.value_dim) * visited
    work = flops / (0.8 * rates.matmul_flops) + 8 * visited * pairs * rates.element_seconds
    work += masked * tq * tk * 8 * rates.element_seconds
    if request.q_len <= tile_q:  # decoding: K and V read once per query head
        groups = request.q_heads // request.kv_heads
        work = max(work, kv_read_seconds(request, rates, groups))
    ops = (12 * visited + 4 * masked + 30) * rates.op_seconds
    summary = unknown * (tq * tk * 8 * rates.element_seconds + 4 * rates.op_seconds)
    if request.needs_grad:
        work, ops = work * 3.5, ops * 3
    return work + ops + summary


def chunked_bytes(backend: ChunkedBackend, request: AttentionRequest) -> int:
    """A few live score tiles and the per-row statistics in forward; with autograd also the
    gradient accumulators in the stats dtype beside the gradients themselves (measured peak at
    N=16384, B=1, H=8, D=64, float32, forward and backward: 204 MiB; this gives 243); plus the
    weights when asked for."""
    tile_q, tile_kv = backend.tile_sizes(request)
    sd_bytes = torch.empty((), dtype=stats_dtype(request.dtype)).element_size()
    in_bytes = request.q.element_size()
    rows = request.batch * request.q_heads
    tile = rows * min(tile_q, request.q_len) * min(tile_kv, request.kv_len) * sd_bytes
    total = 4 * tile + rows * request.q_len * sd_bytes * (2 + request.value_dim)
    if request.needs_grad:
        q_elements = rows * request.q_len * request.head_dim
        kv_elements = (
            request.batch
            * request.kv_heads
            * request.kv_len
            * (request.head_dim + request.value_dim)
        )
        total += (q_elements + kv_elements) * (sd_bytes + in_bytes)
    if request.return_weights:
        total += request.score_elements * in_bytes
    return total


# --- cpu (the compiled kernel) -------------------------------------------------------------------

#: Matmul rate of the kernel relative to SDPA's fused kernel, and its fixed per-call cost
#: (planning, the block mask), measured with benchmarks/cpu_kernel.py (float32, N = 4096, one
#: thread, the kernel on brgemm: 0.77x SDPA's time without a mask, 0.82x causal).
KERNEL_EFFICIENCY = 1.25
FIXED_SECONDS = 3e-4
#: Speed of the kernel's bfloat16 path (half-precision GEMMs, :func:`uses_half_gemm`) over its
#: float32 path, forward and backward (AMD EPYC with AVX512-BF16, one thread, N = 2048, D = 64:
#: 230 against 414 ms forward, 783 against 1172 ms forward+backward; SDPA took 415 and 969 ms
#: in bfloat16, the same as in float32).
HALF_GEMM_SPEEDUP = 1.6
#: The kernel reads q contiguous, and k and v in the dtype it computes in, each (batch, head)
#: slice as dense rows when it decodes (a KV cache's view of its buffers, read in place) and
#: contiguous otherwise; any other input is copied first (``_CpuAttention.forward``,
#: ``attention_forward`` in kernel.cpp): read once and written once. For a copy over
#: :data:`FRESH_COPY_BYTES` the allocator maps fresh pages on every call, and faulting them in
#: costs far more than the copy: SmolLM2's cache views (Hkv = 3, D = 64, float32, one thread, AMD
#: EPYC) copied at 0.6-0.8x the two passes' time up to 12.6 MB per tensor, and 5.2x at 50 MB
#: (2.0 GB/s copied), which this rate gives.
FRESH_COPY_BYTES = 32 << 20
FRESH_PAGE_BYTES_PER_SECOND = 2.5e9


def _dense_rows(t: Tensor) -> bool:
    """Each ``(b, h)`` slice of ``t (B, H, N, D)`` is a dense ``(N, D)`` block."""
    return t.stride(3) == 1 and (t.shape[2] <= 1 or t.stride(2) == t.shape[3])


def copy_seconds(
    request: AttentionRequest, io_dtype: torch.dtype, rates: DeviceRates, *, decoding: bool
) -> float:
    """Time to copy the inputs the kernel cannot read as they are into ``io_dtype`` tensors it
    can: q not contiguous; k or v not in ``io_dtype``, or, on the decoding route, without dense
    rows per ``(b, h)`` slice, or, on the tiled routes, not contiguous."""
    seconds = 0.0
    out_size = torch.empty((), dtype=io_dtype).element_size()
    for t in (request.q, request.k, request.v):
        if t.dtype == io_dtype:
            if t is request.q or not decoding:
                if t.is_contiguous():
                    continue
            elif _dense_rows(t):
                continue
        written = t.numel() * out_size
        seconds += (t.numel() * t.element_size() + written) / rates.memory_bytes_per_second
        if written > FRESH_COPY_BYTES:
            seconds += written / FRESH_PAGE_BYTES_PER_SECOND
    return seconds


def cpu_seconds(backend: CpuBackend, request: AttentionRequest) -> float:
    """The visited tiles' matmuls at the kernel's measured efficiency, one exp and a few passes
    per visited score (for decoding, at least the reading of K and V), copying the inputs it
    cannot read as they are (:func:`copy_seconds`), the evaluation of tiles only a mask function
    of your own can decide, and a fixed cost for planning the call in Python."""
    rates = device_rates(request.device)
    census = backend.census(request)
    tq, tk = min(census.tile_q, request.q_len), min(census.tile_kv, request.kv_len)
    pairs = request.batch * request.q_heads * tq * tk * census.visited
    flops = 2.0 * pairs * (request.head_dim + request.value_dim)
    seconds = flops / (KERNEL_EFFICIENCY * rates.matmul_flops)
    seconds += pairs * 2 * rates.element_seconds
    half = uses_half_gemm(request.dtype, census.tile_q, census.tile_kv)
    if half:
        seconds /= HALF_GEMM_SPEEDUP
    decoding = decodes(request, census.tile_q)
    if decoding:
        # decoding reads K and V once per group of query heads, at about half the memory
        # rate (measured: 44-51% of it on one thread with one query)
        seconds = max(seconds, kv_read_seconds(request, rates, 2.0))
    io_dtype = request.dtype if half else compute_dtype(request.dtype)
    seconds += copy_seconds(request, io_dtype, rates, decoding=decoding)
    seconds += FIXED_SECONDS
    seconds += census.unknown * tq * tk * 8 * rates.element_seconds
    return seconds * (CPU_KERNEL_TRAINING_FACTOR if request.needs_grad else 1.0)


def cpu_bytes(backend: CpuBackend, request: AttentionRequest) -> int:
    """float32 copies of half inputs, the log-sum-exp, a few tiles; with autograd the gradients
    in the compute dtype."""
    cd_bytes = 8 if request.dtype == torch.float64 else 4
    elements = request.q.numel() + request.k.numel() + request.v.numel()
    rows = request.batch * request.q_heads * request.q_len
    total = rows * (request.value_dim + 1) * cd_bytes
    census = backend.census(request)
    if request.dtype in (torch.float16, torch.bfloat16) and not decodes(request, census.tile_q):
        # float32 copies, or the half path's repacked operands (about the same); decoding reads
        # K and V as they are
        total += elements * cd_bytes
    # Each thread's few tiles (up to 1 MiB of float32 each) are counted once, so that the
    # estimate does not depend on the thread count.
    total += 4 * census.tile_q * census.tile_kv * cd_bytes
    if request.needs_grad:
        total += elements * cd_bytes * 2
    return total


# --- triton ------------------------------------------------------------------------------------


def triton_bytes(request: AttentionRequest) -> int:
    """The float32 log-sum-exp per query row; an additive score function materialised as a
    float32 ``(Hq, Nq, Nk)`` bias; with autograd also ``D_i``, the float32 copies of ``dO`` and
    ``O`` it is computed from, and a float32 ``(B, Hq, Nq, Nk)`` buffer when a bias needs a
    gradient. Partial-tile mask bitmaps (at most ``Nq * Nk`` bytes per distinct batch/head of
    the mask) are not counted."""
    rows = request.batch * request.q_heads * request.q_len
    total = 4 * rows
    if request.score_mod is not None and is_additive(request.score_mod):
        total += 4 * request.q_heads * request.q_len * request.kv_len
    if request.needs_grad:
        total += 4 * rows + 4 * rows * request.value_dim
        if request.bias is not None and request.bias.requires_grad:
            total += 4 * request.score_elements
    return total


# --- lookup --------------------------------------------------------------------------------------

Estimate = Callable[[object, AttentionRequest], float]

#: Per built-in backend class: (seconds or None, bytes). triton gives no time estimate.
_BUILT_IN: dict[type, tuple[Estimate | None, Estimate]] = {
    SdpaBackend: (lambda b, r: sdpa_seconds(r), lambda b, r: sdpa_bytes(r)),
    ReferenceBackend: (lambda b, r: reference_seconds(r), lambda b, r: reference_bytes(r)),
    ChunkedBackend: (chunked_seconds, chunked_bytes),  # type: ignore[dict-item]
    CpuBackend: (cpu_seconds, cpu_bytes),  # type: ignore[dict-item]
    TritonBackend: (None, lambda b, r: triton_bytes(r)),
}


def estimate_seconds(backend: object, request: AttentionRequest) -> float | None:
    """Expected seconds of ``request`` on ``backend`` (None: it gives no estimate)."""
    built_in = _BUILT_IN.get(type(backend))
    if built_in is not None:
        seconds = built_in[0]
        return None if seconds is None else float(seconds(backend, request))
    method = getattr(backend, "cost_estimate", None)
    return None if method is None else float(method(request))


def estimate_bytes(backend: object, request: AttentionRequest) -> float | None:
    """Expected extra memory of ``request`` on ``backend``, beyond inputs and output (None: it
    gives no estimate)."""
    built_in = _BUILT_IN.get(type(backend))
    if built_in is not None:
        return float(built_in[1](backend, request))
    method = getattr(backend, "memory_estimate", None)
    return None if method is None else float(method(request))
