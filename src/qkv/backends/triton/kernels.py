# mypy: disable-error-code="no-untyped-def"
# ruff: noqa: SIM108 (constexpr if/else blocks are compiled out; a ternary would not be)
# (Triton kernels take untyped tensors/pointers; only their constexpr parameters are annotated.)
"""Triton kernels of the ``triton`` backend: FlashAttention-2 forward and backward, split-KV decoding.

Imported only when a call actually runs on this backend (``triton`` is an optional package, and
nothing is compiled at import time). Under ``TRITON_INTERPRET=1`` the same kernels run on CPU
tensors, which is how the test suite checks them without a GPU.

Conventions shared by every kernel:

- Scores are kept in base 2: ``s2 = (q k^T * scale + bias -> softcap) * log2(e)``, so the
  softmax uses ``exp2``; the saved log-sum-exp ``lse2`` is in the same unit (``+inf`` on a row
  with nothing to attend, so that backward's ``exp2(s2 - lse2)`` is 0 there, never NaN).
- Work is driven by block tables (see :mod:`qkv.backends.triton.plan`): for each query tile the
  key tiles that are fully visible (computed without any mask) and those partially visible
  (computed with the mask), and the transposed tables for the key-tile-major ``dK, dV`` kernel.
  Fully masked tiles appear in neither list and cost nothing.
- ``MASK_MODE`` says how a partial tile is masked: 0 only key positions past ``Nk`` (ragged last
  tile), 1 the causal rule ``kv <= q + offset`` from indices, 2 a per-tile bitmap evaluated once
  per call from the request's mask function.
- GQA: query head ``h`` reads key/value head ``h // G``; K and V are never repeated. The
  ``dK, dV`` kernel loops over the ``G`` query heads of its key/value head, so no atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _tanh(x):
    # tanh from exp (portable to the interpreter): saturates cleanly to +-1 for large |x|.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _partial_mask(
    offs_m,
    offs_n,
    Nq,
    Nk,
    causal_offset,
    BITS,
    bits_off,
    MASK_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Visible entries of a partial tile ``(BLOCK_M, BLOCK_N)`` at absolute positions."""
    inside = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
    if MASK_MODE == 1:
        inside = inside & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
    if MASK_MODE == 2:
        local_m = tl.arange(0, BLOCK_M)
        local_n = tl.arange(0, BLOCK_N)
        bits = tl.load(BITS + bits_off + local_m[:, None] * BLOCK_N + local_n[None, :])
        inside = inside & (bits != 0)
    return inside


@triton.jit
def _modified_scores(
    qk,
    offs_m,
    offs_n,
    Nq,
    Nk,
    sm_scale,
    softcap,
    BIAS,
    bias_off,
    stride_am,
    stride_an,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Scaled scores after bias and softcap (natural units), plus ``tanh`` for softcap's
    derivative in backward (1.0 when there is no softcap)."""
    s = qk * sm_scale
    if HAS_BIAS:
        inside = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
        b_ptr = BIAS + bias_off + offs_m[:, None] * stride_am + offs_n[None, :] * stride_an
        s += tl.load(b_ptr, mask=inside, other=0.0).to(tl.float32)
    t = s
    if SOFTCAP:
        t = _tanh(s / softcap)
        s = softcap * t
    return s, t


@triton.jit
def _dropout_keep(seed, bh, offs_m, offs_n, Nk, dropout_p):
    """The keep-mask of positions ``(offs_m, offs_n)`` of row block ``bh``: one Philox stream per
    (batch, head), offset by the position, so forward and backward draw the same bits."""
    offsets = offs_m[:, None] * Nk + offs_n[None, :]
    return tl.rand(seed + bh, offsets) >= dropout_p


# --- forward -------------------------------------------------------------------------------------


@triton.jit
def _fwd_tile(
    acc,
    m_i,
    l_i,
    q,
    K_head,
    V_head,
    start_n,
    offs_m,
    offs_d,
    offs_dv,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    Nq,
    Nk,
    sm_scale,
    softcap,
    causal_offset,
    BIAS,
    bias_off,
    stride_am,
    stride_an,
    BITS,
    bits_off,
    seed,
    bh,
    dropout_p,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    MASK_MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Fold one key tile into the running ``(acc, m_i, l_i)`` of a query tile."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Nk
    k_ptr = K_head + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptr = V_head + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    # A FULL tile lies inside Nk (the ragged last tile is always PARTIAL): no bounds check
    # unless the head dims are padded, so the loads stay plain and vectorised.
    if MASKED or D != BLOCK_D:
        k = tl.load(k_ptr, mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    else:
        k = tl.load(k_ptr)  # (BLOCK_N, BLOCK_D), rows contiguous as stored
    if MASKED or DV != BLOCK_DV:
        v = tl.load(v_ptr, mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    else:
        v = tl.load(v_ptr)  # (BLOCK_N, BLOCK_DV)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N) float32
    if HAS_BIAS or SOFTCAP:
        s, _ = _modified_scores(
            qk, offs_m, offs_n, Nq, Nk, sm_scale, softcap, BIAS, bias_off, stride_am, stride_an,
            HAS_BIAS, SOFTCAP,
        )  # fmt: skip
        s = s * 1.4426950408889634  # base 2
    else:
        s = qk * (sm_scale * 1.4426950408889634)  # one multiply: scale and base 2 together
    if MASKED:
        visible = _partial_mask(
            offs_m, offs_n, Nq, Nk, causal_offset, BITS, bits_off, MASK_MODE, BLOCK_M, BLOCK_N
        )
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED or HAS_BIAS:
        # A row with nothing visible yet keeps m = -inf; subtracting 0 instead keeps exp2 at 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new  # FULL tiles come first and are finite: m is finite from the first one
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:  # the normaliser counts every weight; only the value sum sees the dropout
        keep = _dropout_keep(seed, bh, offs_m, offs_n, Nk, dropout_p)
        p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def attention_fwd_kernel(
    Q, K, V, OUT, LSE2,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    FULL_CNT, FULL_IDX, PART_CNT, PART_IDX, PART_ID, table_stride,
    BITS, stride_bits_b, stride_bits_h,
    BIAS, stride_ab, stride_ah, stride_am, stride_an,
    H, G, Nq, Nk,
    sm_scale, softcap, causal_offset, seed, dropout_p,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, FULL_RUN: tl.constexpr,
):  # fmt: skip
    """One program per (query tile, batch * query head). Writes ``OUT`` and ``LSE2``."""
    # Last query tiles first: under a causal mask they have the most keys, and starting the
    # longest programs first leaves short ones to fill the machine at the end.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Nq
    q = tl.load(
        Q
        + b * stride_qb
        + h * stride_qh
        + offs_m[:, None] * stride_qm
        + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    K_head = K + b * stride_kb + kvh * stride_kh
    V_head = V + b * stride_vb + kvh * stride_vh
    bias_off = b * stride_ab + h * stride_ah
    bits_base = b * stride_bits_b + h * stride_bits_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    row = pid_m * table_stride
    n_full = tl.load(FULL_CNT + pid_m)
    first_full = tl.load(FULL_IDX + row)
    for t in range(0, n_full):
        if FULL_RUN:  # consecutive tiles: affine addresses the pipeliner can prefetch
            start_n = (first_full + t) * BLOCK_N
        else:
            start_n = tl.load(FULL_IDX + row + t) * BLOCK_N
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, K_head, V_head, start_n, offs_m, offs_d, offs_dv,
            stride_kn, stride_kd, stride_vn, stride_vd, Nq, Nk, sm_scale, softcap, causal_offset,
            BIAS, bias_off, stride_am, stride_an, BITS, 0, seed, bh, dropout_p,
            D, DV, BLOCK_N, BLOCK_M, False, MASK_MODE, HAS_BIAS, SOFTCAP, DROPOUT, PRECISION,
            BLOCK_D, BLOCK_DV,
        )  # fmt: skip
    n_part = tl.load(PART_CNT + pid_m)
    for t in range(0, n_part):
        start_n = tl.load(PART_IDX + row + t) * BLOCK_N
        bits_off = bits_base + tl.load(PART_ID + row + t).to(tl.int64) * (BLOCK_M * BLOCK_N)
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, K_head, V_head, start_n, offs_m, offs_d, offs_dv,
            stride_kn, stride_kd, stride_vn, stride_vd, Nq, Nk, sm_scale, softcap, causal_offset,
            BIAS, bias_off, stride_am, stride_an, BITS, bits_off, seed, bh, dropout_p,
            D, DV, BLOCK_N, BLOCK_M, True, MASK_MODE, HAS_BIAS, SOFTCAP, DROPOUT, PRECISION,
            BLOCK_D, BLOCK_DV,
        )  # fmt: skip

    attended = l_i > 0.0
    out = acc / tl.where(attended, l_i, 1.0)[:, None]
    lse2 = tl.where(attended, m_i + tl.math.log2(tl.where(attended, l_i, 1.0)), float("inf"))
    tl.store(LSE2 + bh * Nq + offs_m, lse2, mask=m_ok)
    o_ptr = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
    tl.store(
        o_ptr + offs_dv[None, :] * stride_od,
        out.to(OUT.dtype.element_ty),
        mask=m_ok[:, None] & (offs_dv[None, :] < DV),
    )


# --- backward ------------------------------------------------------------------------------------


@triton.jit
def _bwd_dkdv_tile(
    dk, dv, k, v, Q_head, DO_head, LSE2_row, DELTA_row, start_m, offs_n, offs_d, offs_dv,
    stride_qm, stride_qd, stride_dom, stride_dod, Nq, Nk, sm_scale, softcap, causal_offset,
    BIAS, bias_off, stride_am, stride_an, BITS, bits_off, seed, bh, dropout_p,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Accumulate one query tile's contribution to a key tile's ``dK`` and ``dV``. Score tiles are
    ``(BLOCK_M, BLOCK_N)`` as in forward; the products with keys as rows take transposed operands."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Nq
    q = tl.load(
        Q_head + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    do = tl.load(
        DO_head + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
        mask=m_ok[:, None] & (offs_dv[None, :] < DV),
        other=0.0,
    )  # (BLOCK_M, BLOCK_DV)
    lse2 = tl.load(LSE2_row + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA_row + offs_m, mask=m_ok, other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
    s, t = _modified_scores(
        qk, offs_m, offs_n, Nq, Nk, sm_scale, softcap, BIAS, bias_off, stride_am, stride_an,
        HAS_BIAS, SOFTCAP,
    )  # fmt: skip
    s2 = s * 1.4426950408889634
    if MASKED:
        visible = _partial_mask(
            offs_m, offs_n, Nq, Nk, causal_offset, BITS, bits_off, MASK_MODE, BLOCK_M, BLOCK_N
        )
        s2 = tl.where(visible, s2, float("-inf"))
    p = tl.math.exp2(s2 - lse2[:, None])  # (BLOCK_M, BLOCK_N)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m, offs_n, Nk, dropout_p)
        p_drop = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    else:
        p_drop = p
    dv += tl.dot(tl.trans(p_drop.to(do.dtype)), do, input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK_OUT, DV_OUT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    FULL_CNT, FULL_IDX, PART_CNT, PART_IDX, PART_ID, table_stride,
    BITS, stride_bits_b, stride_bits_h,
    BIAS, stride_ab, stride_ah, stride_am, stride_an,
    H, HKV, G, Nq, Nk,
    sm_scale, softcap, causal_offset, seed, dropout_p,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, FULL_RUN: tl.constexpr,
):  # fmt: skip
    """One program per (key tile, batch * key/value head); the tables are key-tile-major."""
    pid_n = tl.program_id(0)
    bkv = tl.program_id(1)
    b = bkv // HKV
    kvh = bkv % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Nk
    k = tl.load(
        K
        + b * stride_kb
        + kvh * stride_kh
        + offs_n[:, None] * stride_kn
        + offs_d[None, :] * stride_kd,
        mask=n_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )  # (BLOCK_N, BLOCK_D)
    v = tl.load(
        V
        + b * stride_vb
        + kvh * stride_vh
        + offs_n[:, None] * stride_vn
        + offs_dv[None, :] * stride_vd,
        mask=n_ok[:, None] & (offs_dv[None, :] < DV),
        other=0.0,
    )  # (BLOCK_N, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    row = pid_n * table_stride
    n_full = tl.load(FULL_CNT + pid_n)
    first_full = tl.load(FULL_IDX + row)
    n_part = tl.load(PART_CNT + pid_n)
    for g in range(0, G):
        h = kvh * G + g
        bh = b * H + h
        Q_head = Q + b * stride_qb + h * stride_qh
        DO_head = DO + b * stride_dob + h * stride_doh
        bias_off = b * stride_ab + h * stride_ah
        bits_base = b * stride_bits_b + h * stride_bits_h
        for t in range(0, n_full):
            if FULL_RUN:
                start_m = (first_full + t) * BLOCK_M
            else:
                start_m = tl.load(FULL_IDX + row + t) * BLOCK_M
            dk, dv = _bwd_dkdv_tile(
                dk, dv, k, v, Q_head, DO_head, LSE2 + bh * Nq, DELTA + bh * Nq, start_m, offs_n,
                offs_d, offs_dv, stride_qm, stride_qd, stride_dom, stride_dod, Nq, Nk, sm_scale,
                softcap, causal_offset, BIAS, bias_off, stride_am, stride_an, BITS, 0, seed, bh,
                dropout_p, D, DV, BLOCK_M, BLOCK_N, False, MASK_MODE, HAS_BIAS, SOFTCAP, DROPOUT,
                PRECISION,
            )  # fmt: skip
        for t in range(0, n_part):
            start_m = tl.load(PART_IDX + row + t) * BLOCK_M
            bits_off = bits_base + tl.load(PART_ID + row + t).to(tl.int64) * (BLOCK_M * BLOCK_N)
            dk, dv = _bwd_dkdv_tile(
                dk, dv, k, v, Q_head, DO_head, LSE2 + bh * Nq, DELTA + bh * Nq, start_m, offs_n,
                offs_d, offs_dv, stride_qm, stride_qd, stride_dom, stride_dod, Nq, Nk, sm_scale,
                softcap, causal_offset, BIAS, bias_off, stride_am, stride_an, BITS, bits_off, seed,
                bh, dropout_p, D, DV, BLOCK_M, BLOCK_N, True, MASK_MODE, HAS_BIAS, SOFTCAP,
                DROPOUT, PRECISION,
            )  # fmt: skip
    dk = dk * sm_scale
    dk_ptr = DK_OUT + b * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dkn
    tl.store(
        dk_ptr + offs_d[None, :] * stride_dkd,
        dk.to(DK_OUT.dtype.element_ty),
        mask=n_ok[:, None] & (offs_d[None, :] < D),
    )
    dv_ptr = DV_OUT + b * stride_dvb + kvh * stride_dvh + offs_n[:, None] * stride_dvn
    tl.store(
        dv_ptr + offs_dv[None, :] * stride_dvd,
        dv.to(DV_OUT.dtype.element_ty),
        mask=n_ok[:, None] & (offs_dv[None, :] < DV),
    )


@triton.jit
def _bwd_dq_tile(
    dq, q, do, lse2, delta, K_head, V_head, start_n, offs_m, offs_d, offs_dv,
    stride_kn, stride_kd, stride_vn, stride_vd, Nq, Nk, sm_scale, softcap, causal_offset,
    BIAS, bias_off, stride_am, stride_an, DBIAS, dbias_off, stride_dbm, BITS, bits_off, seed, bh,
    dropout_p, D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BIAS_GRAD: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Accumulate one key tile's contribution to a query tile's ``dQ`` (and store its ``dS``
    when the bias needs a gradient)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Nk
    kT = tl.load(
        K_head + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        mask=n_ok[None, :] & (offs_d[:, None] < D),
        other=0.0,
    )  # (BLOCK_D, BLOCK_N)
    vT = tl.load(
        V_head + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
        mask=n_ok[None, :] & (offs_dv[:, None] < DV),
        other=0.0,
    )  # (BLOCK_DV, BLOCK_N)
    qk = tl.dot(q, kT, input_precision=PRECISION)
    s, t = _modified_scores(
        qk, offs_m, offs_n, Nq, Nk, sm_scale, softcap, BIAS, bias_off, stride_am, stride_an,
        HAS_BIAS, SOFTCAP,
    )  # fmt: skip
    s2 = s * 1.4426950408889634
    if MASKED:
        visible = _partial_mask(
            offs_m, offs_n, Nq, Nk, causal_offset, BITS, bits_off, MASK_MODE, BLOCK_M, BLOCK_N
        )
        s2 = tl.where(visible, s2, float("-inf"))
    p = tl.math.exp2(s2 - lse2[:, None])
    dp = tl.dot(do, vT, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m, offs_n, Nk, dropout_p)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    if BIAS_GRAD:
        inside = (offs_m[:, None] < Nq) & n_ok[None, :]
        db_ptr = DBIAS + dbias_off + offs_m[:, None] * stride_dbm + offs_n[None, :]
        tl.store(db_ptr, ds, mask=inside)
    dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
    return dq


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ, DBIAS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    FULL_CNT, FULL_IDX, PART_CNT, PART_IDX, PART_ID, table_stride,
    BITS, stride_bits_b, stride_bits_h,
    BIAS, stride_ab, stride_ah, stride_am, stride_an,
    H, G, Nq, Nk,
    sm_scale, softcap, causal_offset, seed, dropout_p,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    FULL_RUN: tl.constexpr,
):  # fmt: skip
    """One program per (query tile, batch * query head); the same tables as forward."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest first, as in forward
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Nq
    q = tl.load(
        Q
        + b * stride_qb
        + h * stride_qh
        + offs_m[:, None] * stride_qm
        + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    do = tl.load(
        DO
        + b * stride_dob
        + h * stride_doh
        + offs_m[:, None] * stride_dom
        + offs_dv[None, :] * stride_dod,
        mask=m_ok[:, None] & (offs_dv[None, :] < DV),
        other=0.0,
    )
    lse2 = tl.load(LSE2 + bh * Nq + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * Nq + offs_m, mask=m_ok, other=0.0)
    K_head = K + b * stride_kb + kvh * stride_kh
    V_head = V + b * stride_vb + kvh * stride_vh
    bias_off = b * stride_ab + h * stride_ah
    dbias_off = bh.to(tl.int64) * Nq * Nk
    bits_base = b * stride_bits_b + h * stride_bits_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row = pid_m * table_stride
    n_full = tl.load(FULL_CNT + pid_m)
    first_full = tl.load(FULL_IDX + row)
    for t in range(0, n_full):
        if FULL_RUN:  # consecutive tiles: affine addresses the pipeliner can prefetch
            start_n = (first_full + t) * BLOCK_N
        else:
            start_n = tl.load(FULL_IDX + row + t) * BLOCK_N
        dq = _bwd_dq_tile(
            dq, q, do, lse2, delta, K_head, V_head, start_n, offs_m, offs_d, offs_dv,
            stride_kn, stride_kd, stride_vn, stride_vd, Nq, Nk, sm_scale, softcap, causal_offset,
            BIAS, bias_off, stride_am, stride_an, DBIAS, dbias_off, Nk, BITS, 0, seed, bh,
            dropout_p, D, DV, BLOCK_M, BLOCK_N, False, MASK_MODE, HAS_BIAS, BIAS_GRAD, SOFTCAP,
            DROPOUT, PRECISION,
        )  # fmt: skip
    n_part = tl.load(PART_CNT + pid_m)
    for t in range(0, n_part):
        start_n = tl.load(PART_IDX + row + t) * BLOCK_N
        bits_off = bits_base + tl.load(PART_ID + row + t).to(tl.int64) * (BLOCK_M * BLOCK_N)
        dq = _bwd_dq_tile(
            dq, q, do, lse2, delta, K_head, V_head, start_n, offs_m, offs_d, offs_dv,
            stride_kn, stride_kd, stride_vn, stride_vd, Nq, Nk, sm_scale, softcap, causal_offset,
            BIAS, bias_off, stride_am, stride_an, DBIAS, dbias_off, Nk, BITS, bits_off, seed, bh,
            dropout_p, D, DV, BLOCK_M, BLOCK_N, True, MASK_MODE, HAS_BIAS, BIAS_GRAD, SOFTCAP,
            DROPOUT, PRECISION,
        )  # fmt: skip
    dq = dq * sm_scale
    dq_ptr = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm
    tl.store(
        dq_ptr + offs_d[None, :] * stride_dqd,
        dq.to(DQ.dtype.element_ty),
        mask=m_ok[:, None] & (offs_d[None, :] < D),
    )


# --- decoding ------------------------------------------------------------------------------------


@triton.jit
def decode_split_kernel(
    Q, K, V, PART_O, PART_LSE2,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    HKV, G, Nq, Nk, split_len, num_splits,
    sm_scale, softcap, causal_offset,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Split-KV decoding: one program per (split of the keys, batch * key/value head).

    The ``G * Nq`` query rows that share a key/value head (GQA group x new tokens) are stacked
    into one tile of ``BLOCK_R`` rows, so each key is read once per group, and the keys are cut
    into ``num_splits`` ranges processed in parallel: a few query rows cannot fill the GPU any
    other way. Each program writes an unnormalised partial output and its base-2 log-sum-exp;
    :func:`decode_combine_kernel` merges the splits.
    """
    pid_s = tl.program_id(0)
    bkv = tl.program_id(1)
    b = bkv // HKV
    kvh = bkv % HKV
    rows = tl.arange(0, BLOCK_R)  # row r = g * Nq + i: query head kvh * G + g, token i
    g = rows // Nq
    i = rows % Nq
    r_ok = rows < G * Nq
    h = kvh * G + g
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q
        + b * stride_qb
        + h[:, None] * stride_qh
        + i[:, None] * stride_qm
        + offs_d[None, :] * stride_qd,
        mask=r_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    start = pid_s * split_len
    stop = tl.minimum(start + split_len, Nk)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    K_head = K + b * stride_kb + kvh * stride_kh
    V_head = V + b * stride_vb + kvh * stride_vh
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < stop
        k = tl.load(
            K_head + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=n_ok[None, :] & (offs_d[:, None] < D),
            other=0.0,
        )
        s = tl.dot(q, k, input_precision=PRECISION) * sm_scale
        if SOFTCAP:
            s = softcap * _tanh(s / softcap)
        s = s * 1.4426950408889634
        visible = r_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= i[:, None] + causal_offset)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V_head + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=n_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    attended = l_i > 0.0
    acc = acc / tl.where(attended, l_i, 1.0)[:, None]
    lse2 = tl.where(attended, m_i + tl.math.log2(tl.where(attended, l_i, 1.0)), float("-inf"))
    # PART_O: (B * Hkv, num_splits, BLOCK_R, BLOCK_DV) float32; PART_LSE2: (B * Hkv, num_splits, BLOCK_R)
    base = (bkv * num_splits + pid_s) * BLOCK_R
    tl.store(PART_LSE2 + base + rows, lse2)
    tl.store(PART_O + (base + rows[:, None]) * BLOCK_DV + offs_dv[None, :], acc)


@triton.jit
def decode_combine_kernel(
    PART_O, PART_LSE2, OUT,
    stride_ob, stride_oh, stride_om, stride_od,
    HKV, G, Nq, num_splits,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Merge the splits of one (batch, key/value head): ``O = sum_s w_s O_s`` with weights
    ``w_s = 2^(lse_s - lse)``; a row no split attended stays 0."""
    bkv = tl.program_id(0)
    b = bkv // HKV
    kvh = bkv % HKV
    rows = tl.arange(0, BLOCK_R)
    splits = tl.arange(0, BLOCK_S)
    s_ok = splits < num_splits
    lse_ptr = PART_LSE2 + (bkv * num_splits + splits[:, None]) * BLOCK_R + rows[None, :]
    lse2 = tl.load(lse_ptr, mask=s_ok[:, None], other=float("-inf"))  # (BLOCK_S, BLOCK_R)
    top = tl.max(lse2, 0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    w = tl.math.exp2(lse2 - top_safe[None, :])
    total = tl.sum(w, 0)
    w = w / tl.where(total > 0.0, total, 1.0)[None, :]
    offs_dv = tl.arange(0, BLOCK_DV)
    out = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for s in range(0, num_splits):
        w_s = tl.sum(tl.where(splits[:, None] == s, w, 0.0), 0)  # (BLOCK_R,)
        part = tl.load(
            PART_O
            + ((bkv * num_splits + s) * BLOCK_R + rows[:, None]) * BLOCK_DV
            + offs_dv[None, :]
        )
        out += w_s[:, None] * part
    g = rows // Nq
    i = rows % Nq
    h = kvh * G + g
    r_ok = rows < G * Nq
    o_ptr = (
        OUT
        + b * stride_ob
        + h[:, None] * stride_oh
        + i[:, None] * stride_om
        + offs_dv[None, :] * stride_od
    )
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=r_ok[:, None] & (offs_dv[None, :] < DV))
