"""The ``cpu`` backend: the compiled kernel behind the backend contract.

:class:`CpuBackend` serves CPU calls whose mask and score function the kernel evaluates from
parameters (:mod:`qkv.backends.cpu.plan`), in every dtype: float32 and float64 compute in their
own type. bfloat16 and float16 compute ``q k^T``, ``P V`` and the backward products as
half-precision GEMMs with float32 accumulation where the CPU has them (oneDNN's brgemm:
AVX512-BF16 or AMX), softmax statistics, accumulators and gradients in float32, the
probabilities and the score gradient rounded to the input type for their GEMMs (as fused GPU
kernels do); elsewhere they are computed in float32 and :func:`precision_note` (shown by
:func:`qkv.explain`) says why. What it refuses (dropout, ``return_weights``, mask or score
functions of your own, a kernel that failed to build) it says in :meth:`CpuBackend.supports`, and
``auto`` uses the chunked backend instead.

Memory: forward keeps ``q, k, v`` (float32 copies for half types computed in float32), the
float32 output and the log-sum-exp; backward recomputes the tiles, repacks ``q, k, v, dO`` for
the half GEMMs, plus a float64 ``(runs, ...)`` accumulator for a bias tensor's or a relative
table's gradient (one run per thread; a fixed 8 under ``torch.use_deterministic_algorithms(True)``,
which makes forward and backward bitwise the same on any thread count). Never ``O(Nq * Nk)``
besides a bias the caller gave.

Non-finite inputs follow :func:`qkv.attention`'s rule: the kernel's row maximum is NaN when an
attended score is NaN or ``+inf``, and such a row's output and log-sum-exp are NaN (in every
path: float32, float64, the half-precision GEMMs and decoding).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from qkv.backends.block_mask import EMPTY, FULL, UNKNOWN, BlockMask, block_mask_for, request_status
from qkv.backends.cpu.build import kernel_status, load_kernel
from qkv.backends.cpu.plan import KernelPlan, plan_request
from qkv.backends.reference import reference_attention_lse, reference_gradients
from qkv.request import AttentionRequest

__all__ = ["TILE_KV", "TILE_Q", "CpuBackend", "cpu_attention", "cpu_attention_lse"]

#: Default tile sizes of the kernel: a (TILE_Q, TILE_KV) float32 score tile and its K/V tiles
#: stay in a core's L2 cache. Chosen by measurement (benchmarks/cpu_kernel.py).
TILE_Q, TILE_KV = 64, 256
#: Key tile widths tried for a call; the one with the least estimated work wins
#: (:func:`choose_tiles`): narrow tiles waste less on the edges of a sliding window, wide ones
#: cost less per score.
TILE_KV_CHOICES = (256, 128, 64)
#: Fixed cost of visiting one tile (three BLAS calls, the row loop), in units of one score.
TILE_OVERHEAD_SCORES = 2048
#: Taller tiles, the first that leaves :data:`MIN_TASKS` tasks, for a forward call whose query
#: tiles each read at least :data:`TALL_STREAM_BYTES` of K and V: every query tile streams its
#: keys and values from beyond the core's caches, so fewer, taller query tiles read them fewer
#: times. Measured forward, one thread, N = 16384, no mask, against SDPA in the same run:
#: float32 64 x 256 tiles took 1.23x SDPA's time, 256 x 512 1.05x, 512 x 512 1.01x (causal:
#: 1.28x, 1.02x, 1.02x); bfloat16 0.69x, 0.63x, 0.64x. At N = 4096 (2 MiB of float32 K and V
#: per head) they gained nothing, and the backward lost (bfloat16 causal fwd+bwd, 256 x 256:
#: 1.14x the time of 64 x 256), so calls that need gradients keep the default height.
TALL_TILES = ((512, 512), (256, 512))
TALL_STREAM_BYTES = 4 * 2**20
#: Fewest (batch, head, query tile) tasks a call is cut into, so that threads share the work
#: evenly (a constant, not the thread count, so that the tiles, and the results, do not depend
#: on the threads).
MIN_TASKS = 64

_EMPTY_LONG = torch.empty(0, dtype=torch.long)
_EMPTY_BOOL = torch.empty(0, dtype=torch.bool)
_EMPTY_DOUBLE = torch.empty(0, dtype=torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_HALF_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
_half_reasons: dict[torch.dtype, str | None] = {}


def half_gemm_reason(dtype: torch.dtype) -> str | None:
    """Why ``dtype`` cannot be computed on the kernel's half-precision GEMMs on this CPU (None
    when it can; a float32 or float64 dtype always gets a reason). The kernel probes
    ``at::native::cpublas::brgemm`` once per dtype: it needs oneDNN's micro-kernel for the type
    (AVX512-BF16 or AMX for bfloat16; AMX-FP16 for float16)."""
    if dtype not in _HALF_NAMES:
        return f"{dtype} is not a half-precision type"
    if dtype not in _half_reasons:
        status = kernel_status()
        if not status.ok:
            _half_reasons[dtype] = status.reason
        else:
            ops = load_kernel()
            problem: str = ops.half_gemm_status(_HALF_NAMES[dtype])  # type: ignore[attr-defined]
            _half_reasons[dtype] = problem or None
    return _half_reasons[dtype]


def uses_half_gemm(dtype: torch.dtype, tile_q: int, tile_kv: int) -> bool:
    """True when a call in ``dtype`` with these tiles runs on the half-precision GEMMs (the
    VNNI packing pairs rows, so both tile sizes must be even)."""
    return half_gemm_reason(dtype) is None and tile_q % 2 == 0 and tile_kv % 2 == 0


#: The kernel decodes (kernel.cpp's ``kDecodeRows``) a call whose queries fit one tile of at
#: most this many rows: K and V are read once per group of query heads, in their own type.
DECODE_ROWS = 16


def decodes(request: AttentionRequest, tile_q: int) -> bool:
    """True when the kernel runs ``request`` on its decoding route with query tiles of
    ``tile_q`` rows."""
    return request.q_len <= min(DECODE_ROWS, tile_q)


@functools.cache
def bfloat16_dot_decoding() -> bool:
    """True when the kernel decodes bfloat16 on AVX512-BF16 dot products (this CPU has them)."""
    if not kernel_status().ok:
        return False
    return bool(load_kernel().bfloat16_dot_decoding())  # type: ignore[attr-defined]


def precision_note(
    dtype: torch.dtype, tile_q: int, tile_kv: int, *, decoding: bool = False
) -> str | None:
    """How the kernel computes a half-precision call, in words (None for float32 and float64)."""
    if dtype not in _HALF_NAMES:
        return None
    name = _HALF_NAMES[dtype]
    if decoding and dtype == torch.bfloat16 and bfloat16_dot_decoding():
        return (
            "decoding: q k^T and P V as AVX512-BF16 dot products with float32 accumulation, K "
            "and V read as they are; softmax statistics in float32, probabilities rounded to "
            "bfloat16 for P V"
        )
    if decoding:
        return f"decoding: {name} K and V widened to float32 as they are read, float32 products"
    if uses_half_gemm(dtype, tile_q, tile_kv):
        return (
            f"{name} GEMMs with float32 accumulation (oneDNN brgemm); softmax statistics in "
            f"float32, probabilities rounded to {name} for P V"
        )
    reason = half_gemm_reason(dtype) or f"odd tile sizes ({tile_q}, {tile_kv})"
    return f"{name} computed in float32 BLAS: no {name} GEMM on this CPU ({reason})"


@dataclass(frozen=True, eq=False)
class _Call:
    """What forward and backward both pass to the kernel besides the differentiated tensors."""

    scale: float
    status: Tensor  # (nQ, nK) int8
    tile_q: int
    tile_kv: int
    row_lo: Tensor
    row_hi: Tensor
    doc_q: Tensor
    doc_k: Tensor
    dense: Tensor
    mod_kind: Tensor
    mod_value: Tensor
    mod_int: Tensor
    fixed_tables: tuple[Tensor | None, ...]  # ALiBi slopes; None where a learnable table goes
    shape: tuple[int, int, int, int]  # (B, Hq, Nq, Nk)
    request: AttentionRequest  # for a differentiable backward (reference_gradients)

    def tables(self, learnable: tuple[Tensor, ...], dtype: torch.dtype) -> list[Tensor]:
        out, it = [], iter(learnable)
        for fixed in self.fixed_tables:
            table = next(it) if fixed is None else fixed
            out.append(table.detach().to(dtype).contiguous())
        return out


def _expanded_bias(bias: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    if bias is None:
        return torch.empty(0, dtype=dtype)
    bias = bias.detach().to(dtype)
    if any(st == 0 and n > 1 for st, n in zip(bias.stride(), bias.shape, strict=True)):
        bias = bias.contiguous()  # an expanded view: its gradient is per position
    return bias.expand(shape)


@dataclass(frozen=True, eq=False)
class _Forward:
    """The kernel's forward results and the operands it ran on (what backward reuses)."""

    out: Tensor  # (B, Hq, Nq, Dv) in the compute dtype, or a half input type (see below)
    lse: Tensor  # (B, Hq, Nq), +inf on rows attending nothing
    qc: Tensor
    kc: Tensor
    vc: Tensor
    bias_e: Tensor
    mod_tables: list[Tensor]


def _run_forward(
    call: _Call,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    tables: tuple[Tensor, ...],
    *,
    for_backward: bool,
) -> _Forward:
    """One forward on the kernel. Without ``for_backward`` the half path writes its output in
    the input type (a float32 output the size of ``q`` and its conversion cost a tenth of a long
    bfloat16 forward, in freshly mapped pages mostly); backward reads the float32 one."""
    ops = load_kernel()
    cd = compute_dtype(q.dtype)
    half = uses_half_gemm(q.dtype, call.tile_q, call.tile_kv)
    io = q.dtype if half else cd  # the half path reads q, k, v in their own type
    # k and v keep their layout: the kernel reads a KV cache's slice in place when
    # decoding and makes its own dense copy otherwise
    qc, kc, vc = (t.detach() if t.dtype == io else t.detach().to(io) for t in (q, k, v))
    qc = qc.contiguous()
    bias_e = _expanded_bias(bias, call.shape, cd)
    mod_tables = call.tables(tables, cd)
    out, lse = ops.forward(  # type: ignore[attr-defined]
        qc, kc, vc, call.scale, call.status, call.tile_q, call.tile_kv, call.row_lo,
        call.row_hi, call.doc_q, call.doc_k, call.dense, bias_e, call.mod_kind,
        call.mod_value, call.mod_int, mod_tables, half and not for_backward,
    )  # fmt: skip
    return _Forward(out, lse, qc, kc, vc, bias_e, mod_tables)


class _CpuAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        call: _Call,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor | None,
        *tables: Tensor,
    ) -> tuple[Tensor, Tensor]:
        run = _run_forward(call, q, k, v, bias, tables, for_backward=True)
        ctx.save_for_backward(run.qc, run.kc, run.vc, run.out, run.lse, q, k, v, bias, *tables)  # type: ignore[arg-type]
        ctx.call = call  # type: ignore[attr-defined]
        ctx.bias_e = run.bias_e  # type: ignore[attr-defined]
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)  # type: ignore[attr-defined]
        ctx.mod_tables = run.mod_tables  # type: ignore[attr-defined]
        ctx.table_dtypes = [t.dtype for t in tables]  # type: ignore[attr-defined]
        ctx.in_dtype = q.dtype  # type: ignore[attr-defined]
        return run.out.to(q.dtype), run.lse  # lse: (B, Hq, Nq), +inf on rows attending nothing

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad_out: Tensor, grad_lse: Tensor | None = None
    ) -> tuple[Tensor | None, ...]:
        qc, kc, vc, out, lse, *inputs = ctx.saved_tensors  # type: ignore[attr-defined]
        value_dim = vc.shape[-1]
        with_lse = grad_lse is not None and bool(grad_lse.any())
        call: _Call = ctx.call  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # create_graph=True: gradients with a graph of their own
            if with_lse:
                raise RuntimeError(
                    "double backward (create_graph=True) through return_lse is not supported by "
                    "backend 'cpu'; use backend='reference'"
                )
            q, k, v, bias = inputs[:4]
            live = dataclasses.replace(call.request, q=q, k=k, v=v, bias=bias)
            found = reference_gradients(
                live, [t if n else None for t, n in zip(inputs, needs[1:], strict=True)],
                grad_out, "cpu",
            )  # fmt: skip
            return (None, *found)
        if with_lse:
            assert grad_lse is not None
            vc, out, grad_out = _with_lse_gradient(vc, out, grad_out, grad_lse, lse)
        ops = load_kernel()
        learnable = [fixed is None for fixed in call.fixed_tables]
        n_learn = sum(learnable)
        want_tables = torch.tensor(
            [lrn and needs[5 + sum(learnable[:m])] for m, lrn in enumerate(learnable)],
            dtype=torch.bool,
        )
        bias_grad = ctx.bias_meta is not None and needs[4]  # type: ignore[attr-defined]
        grads = ops.backward(  # type: ignore[attr-defined]
            qc, kc.contiguous(), vc.contiguous(), out, lse, grad_out.to(qc.dtype).contiguous(),
            call.scale, call.status,
            call.tile_q, call.tile_kv, call.row_lo, call.row_hi, call.doc_q, call.doc_k,
            call.dense, ctx.bias_e, bias_grad, call.mod_kind, call.mod_value,  # type: ignore[attr-defined]
            call.mod_int, ctx.mod_tables, want_tables,  # type: ignore[attr-defined]
        )  # fmt: skip
        dq, dk, dv, dbias = grads[:4]
        dv = dv[..., :value_dim]  # (the lse gradient's extra column, if any, dropped)
        dtype = ctx.in_dtype  # type: ignore[attr-defined]
        bias_out = None
        if bias_grad:
            shape, bias_dtype = ctx.bias_meta  # type: ignore[attr-defined]
            bias_out = dbias.reshape(shape).to(bias_dtype)  # the kernel keeps the bias's shape
        table_out: list[Tensor | None] = []
        for m, lrn in enumerate(learnable):
            if lrn:
                g = grads[4 + m]
                table_dtype = ctx.table_dtypes[len(table_out)]  # type: ignore[attr-defined]
                table_out.append(g.to(table_dtype) if g.numel() else None)
        assert len(table_out) == n_learn
        return (
            None,
            dq.to(dtype) if needs[1] else None,
            dk.to(dtype) if needs[2] else None,
            dv.to(dtype) if needs[3] else None,
            bias_out,
            *table_out,
        )


def _with_lse_gradient(
    v: Tensor, out: Tensor, grad_out: Tensor, grad_lse: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``v``, ``out`` and ``dO`` with one more value column that carries the gradient ``g`` of
    the log-sum-exp into the kernel's backward: ``d lse_i / d s_ij = P_ij`` adds ``g_i P_ij``
    to ``dS = P * (dP - D_i)``. A column of ones in ``V`` and ``g`` in ``dO`` add ``g_i`` to
    every ``dP_ij``; a column of zeros in ``O`` leaves ``D_i = rowsum(dO * O)`` as it was. The
    extra column of ``dV`` is dropped. Rows attending nothing (``lse = +inf``) take none."""
    g = torch.where(torch.isfinite(lse), grad_lse.to(out.dtype), 0.0)[..., None]
    ones = v.new_ones(*v.shape[:3], 1)
    v = torch.cat([v, ones], dim=-1).contiguous()  # (B, Hkv, Nk, Dv + 1)
    out = torch.cat([out, torch.zeros_like(g)], dim=-1).contiguous()  # (B, Hq, Nq, Dv + 1)
    grad_out = torch.cat([grad_out.to(out.dtype), g], dim=-1)  # (B, Hq, Nq, Dv + 1)
    return v, out, grad_out


@functools.lru_cache(maxsize=64)
def _all_full(q_tiles: int, kv_tiles: int) -> Tensor:
    """The tile states of a call without a mask (the kernel only reads them)."""
    return torch.full((q_tiles, kv_tiles), FULL, dtype=torch.int8)


def _status_of(request: AttentionRequest, tile_q: int, tile_kv: int) -> tuple[Tensor, int, int]:
    """``(status, tile_q, tile_kv)``: the tile states the kernel runs, at a block mask's own
    tile sizes when the mask is one."""
    if request.whole_mask is None:  # a decoding step, or no mask at all: no census to take
        return (
            _all_full(-(-request.q_len // tile_q), -(-request.kv_len // tile_kv)),
            tile_q,
            tile_kv,
        )
    block = block_mask_for(request, tile_q, tile_kv)
    return block.status.contiguous(), block.tile_q, block.tile_kv


def _call_of(request: AttentionRequest, plan: KernelPlan, tile_q: int, tile_kv: int) -> _Call:
    status, tile_q, tile_kv = _status_of(request, tile_q, tile_kv)
    mask, mods = plan.mask, plan.modifiers
    fixed: list[Tensor | None] = []
    for m in mods:
        learnable = m.table is not None and m.table.requires_grad and torch.is_grad_enabled()
        fixed.append(None if learnable else (m.table if m.table is not None else _EMPTY_LONG))
    return _Call(
        scale=request.scale,
        status=status,
        tile_q=tile_q,
        tile_kv=tile_kv,
        row_lo=_EMPTY_LONG if mask.lo is None else mask.lo,
        row_hi=_EMPTY_LONG if mask.hi is None else mask.hi,
        doc_q=_EMPTY_LONG if mask.doc_q is None else mask.doc_q,
        doc_k=_EMPTY_LONG if mask.doc_k is None else mask.doc_k,
        dense=_EMPTY_BOOL
        if mask.dense is None
        else mask.dense.expand(request.batch, request.q_heads, request.q_len, request.kv_len),
        mod_kind=torch.tensor([m.kind for m in mods], dtype=torch.long) if mods else _EMPTY_LONG,
        mod_value=torch.tensor([m.value for m in mods], dtype=torch.float64)
        if mods
        else _EMPTY_DOUBLE,
        mod_int=torch.tensor([[m.offset, m.max_distance] for m in mods], dtype=torch.long).view(-1)
        if mods
        else _EMPTY_LONG,
        fixed_tables=tuple(fixed),
        shape=(request.batch, request.q_heads, request.q_len, request.kv_len),
        request=request,
    )


def choose_tiles(
    request: AttentionRequest, tile_q: int | None = None, choices: tuple[int, ...] = TILE_KV_CHOICES
) -> tuple[int, int]:
    """The ``(tile_q, tile_kv)`` of least estimated work (see :func:`tile_census`)."""
    census = tile_census(request, tile_q, choices)
    return census.tile_q, census.tile_kv


@dataclass(frozen=True)
class Census:
    """A call's tile grid as the kernel would run it: tile sizes, tiles visited, and of those
    the tiles only a mask tensor can decide (the block mask evaluates the tensor there)."""

    tile_q: int
    tile_kv: int
    visited: int
    unknown: int


_CENSUS: weakref.WeakKeyDictionary[
    AttentionRequest, tuple[tuple[int | None, tuple[int, ...]], Census]
] = weakref.WeakKeyDictionary()
#: Calls with at most this many scores per head skip the tile classification: they are one or a
#: few tiles, and ``auto`` prices them without it.
SMALL_CALL_SCORES = 128 * 256


def tile_census(
    request: AttentionRequest, tile_q: int | None = None, choices: tuple[int, ...] = TILE_KV_CHOICES
) -> Census:
    """Of the key tile widths ``choices`` at query tile height ``tile_q``, the one of least
    estimated work (visited tiles times their scores plus :data:`TILE_OVERHEAD_SCORES` each),
    from the tile states known without evaluating anything: narrow tiles waste less on the edges
    of a sliding window, wide ones cost less per score. With ``tile_q`` None, :data:`TILE_Q`,
    or one of :data:`TALL_TILES` for a forward call that streams much K and V per query tile.
    Remembered per request (``auto`` asks, then the call runs)."""
    key = (tile_q, choices)
    if (known := _CENSUS.get(request)) is not None and known[0] == key:
        return known[1]
    best: tuple[float, Census] | None = None
    if request.whole_mask is None:  # every tile visited: the widest does the least work
        choices = (max(choices),)
    for tile_kv in sorted(choices):  # the narrowest first: the wider ones are pooled from it
        census = _count_tiles(request, tile_q or TILE_Q, tile_kv)
        tq, tk = min(census.tile_q, request.q_len), min(tile_kv, request.kv_len)
        work = census.visited * (tq * tk + TILE_OVERHEAD_SCORES)
        if best is None or work <= best[0]:  # ties go to the wider tile
            best = (work, census)
    assert best is not None
    census = best[1] if tile_q is not None else _taller(request, best[1])
    _CENSUS[request] = (key, census)
    return census


def _count_tiles(request: AttentionRequest, tile_q: int, tile_kv: int) -> Census:
    """The tiles a call visits at these sizes (all of them for a small call or no mask)."""
    Nq, Nk = request.q_len, request.kv_len
    if Nq * Nk <= SMALL_CALL_SCORES or request.whole_mask is None:
        return Census(tile_q, tile_kv, -(-Nq // tile_q) * -(-Nk // tile_kv), 0)
    status = request_status(request, tile_q, tile_kv, resolve=False)
    return Census(tile_q, tile_kv, int((status != EMPTY).sum()), int((status == UNKNOWN).sum()))


def _taller(request: AttentionRequest, census: Census) -> Census:
    """``census``, or the first of :data:`TALL_TILES` that leaves :data:`MIN_TASKS` tasks for
    a forward call whose query tiles each read :data:`TALL_STREAM_BYTES` of K and V."""
    if request.needs_grad or request.q_len <= census.tile_q:  # one query tile reads K/V once
        return census
    q_tiles = -(-request.q_len // census.tile_q)
    keys = census.visited / max(q_tiles, 1) * min(census.tile_kv, request.kv_len)
    per_key = (request.head_dim + request.value_dim) * request.k.element_size()
    if keys * per_key < TALL_STREAM_BYTES:
        return census
    tasks = request.batch * request.q_heads
    for tile_q, tile_kv in TALL_TILES:
        if tasks * -(-request.q_len // tile_q) >= MIN_TASKS:
            return _count_tiles(request, tile_q, tile_kv)
    return census


def cpu_attention_lse(
    request: AttentionRequest, *, tile_q: int = TILE_Q, tile_kv: int = TILE_KV
) -> tuple[Tensor, Tensor]:
    """Run one validated call on the compiled kernel.

    Args:
        request: a request :meth:`CpuBackend.supports` accepts.
        tile_q, tile_kv: tile sizes (a :class:`~qkv.backends.block_mask.BlockMask` passed as the
            mask brings its own).

    Returns:
        ``out (B, Hq, Nq, Dv)``, differentiable with respect to ``q, k, v``, a bias tensor and a
        :class:`~qkv.scores.RelativePositionBias` table; and the log-sum-exp ``(B, Hq, Nq)`` in
        the compute dtype, differentiable too (``-inf`` on empty rows when
        ``request.return_lse``).

    Raises:
        ValueError: if the request is one the kernel cannot serve.
    """
    plan = plan_request(request)
    if isinstance(plan, str):
        raise ValueError(plan)
    if request.score_elements == 0:
        # Nothing to tile (B, Hq, Nq or Nk is 0): the formula on empty scores gives the empty
        # or all-zero output and zero gradients, as on the chunked backend.
        out, _, lse = reference_attention_lse(request)
        return out, lse
    call = _call_of(request, plan, tile_q, tile_kv)
    learnable = tuple(
        m.table
        for m, fixed in zip(plan.modifiers, call.fixed_tables, strict=True)
        if fixed is None and m.table is not None
    )
    if request.needs_grad or any(t.requires_grad for t in learnable):
        out, lse = _CpuAttention.apply(
            call, request.q, request.k, request.v, request.bias, *learnable
        )
    else:  # nothing to differentiate (inference, decoding): no autograd node to build
        run = _run_forward(
            call, request.q, request.k, request.v, request.bias, learnable, for_backward=False
        )
        out, lse = run.out.to(request.dtype), run.lse
    if request.return_lse:  # the kernel keeps +inf on rows attending nothing; callers get -inf
        lse = torch.where(lse == float("inf"), float("-inf"), lse)
    return out, lse


def cpu_attention(
    request: AttentionRequest, *, tile_q: int = TILE_Q, tile_kv: int = TILE_KV
) -> Tensor:
    """:func:`cpu_attention_lse` without the log-sum-exp: ``out (B, Hq, Nq, Dv)``."""
    return cpu_attention_lse(request, tile_q=tile_q, tile_kv=tile_kv)[0]


class CpuBackend:
    """Fused, compiled attention for CPU tensors (:mod:`qkv.backends.cpu`).

    Args:
        tile_q, tile_kv: fixed tile sizes; default :data:`TILE_Q` (or :data:`TALL_TILES`) and
            the cheapest key tile width of :data:`TILE_KV_CHOICES` for each call
            (:func:`tile_census`).
    """

    name = "cpu"

    def __init__(self, *, tile_q: int | None = None, tile_kv: int | None = None) -> None:
        self.tile_q = tile_q
        self.tile_kv = tile_kv

    def supports(self, request: AttentionRequest) -> str | None:
        if request.device.type != "cpu":
            return f"the CPU kernel runs on CPU tensors; these are on {request.device.type}"
        if request.dropout_p > 0:
            return "dropout is not implemented in the CPU kernel"
        if request.return_weights:
            return "the CPU kernel does not return the attention probabilities"
        if isinstance(request.mask, BlockMask) and (
            reason := request.mask.incompatibility(request)
        ):
            return reason
        plan = plan_request(request)
        if isinstance(plan, str):
            return plan
        status = kernel_status()  # builds the kernel on the first call
        return status.reason

    def census(self, request: AttentionRequest) -> Census:
        """The tile sizes a call runs with and the tiles it visits: a block mask's own sizes,
        the ones this backend was given, or the cheapest of :data:`TILE_KV_CHOICES`."""
        if isinstance(request.mask, BlockMask):
            bm = request.mask
            visited = bm.visited_tiles
            return Census(bm.tile_q, bm.tile_kv, visited, 0)
        if self.tile_kv is not None:
            return tile_census(request, self.tile_q or TILE_Q, (self.tile_kv,))
        return tile_census(request, self.tile_q)

    def tile_sizes(self, request: AttentionRequest) -> tuple[int, int]:
        """The ``(tile_q, tile_kv)`` a call runs with (:meth:`census`)."""
        census = self.census(request)
        return census.tile_q, census.tile_kv

    def note(self, request: AttentionRequest) -> str | None:
        """How a half-precision call is computed (:func:`precision_note`); None otherwise."""
        if request.q.dtype not in _HALF_NAMES:
            return None
        tile_q, tile_kv = self.tile_sizes(request)
        return precision_note(request.q.dtype, tile_q, tile_kv, decoding=decodes(request, tile_q))

    def forward(self, request: AttentionRequest) -> tuple[Tensor, Tensor | None]:
        tile_q, tile_kv = self.tile_sizes(request)
        return cpu_attention(request, tile_q=tile_q, tile_kv=tile_kv), None

    def forward_lse(self, request: AttentionRequest) -> tuple[Tensor, Tensor | None, Tensor]:
        tile_q, tile_kv = self.tile_sizes(request)
        out, lse = cpu_attention_lse(request, tile_q=tile_q, tile_kv=tile_kv)
        return out, None, lse
