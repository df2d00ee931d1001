"""The compiled CPU kernel (backend ``cpu``): float64 conformance across tiles, what it refuses
and why, its build outcome, and its tile choice.

Tiles are shrunk to ``4 x 8`` positions, as in ``test_chunked.py``, so short sequences cross
many tiles: EMPTY tiles are skipped, FULL ones never evaluate the mask, PARTIAL ones do.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

import qkv
from gold import Inputs, assert_within_control, dense_mask_of, naive_attention, random_inputs
from helpers import (
    TILED_BIASES as BIASES,
)
from helpers import (
    TILED_CAUSAL as CAUSAL,
)
from helpers import (
    TILED_DTYPES as DTYPES,
)
from helpers import (
    TILED_MASKS as MASKS,
)
from helpers import (
    TILED_SHAPES as SHAPES,
)
from helpers import (
    bias_grad,
    cast_bias,
    make_bias,
    tiled_mask,
)
from qkv import masks, scores
from qkv.backends import get_backend, select_backend
from qkv.backends.block_mask import build_block_mask
from qkv.backends.cpu import CpuBackend, build, kernel_status
from qkv.backends.cpu import backend as cpu_backend
from qkv.backends.cpu.backend import TILE_Q as KERNEL_TILE_Q
from qkv.backends.cpu.backend import choose_tiles, half_gemm_reason, precision_note, uses_half_gemm
from qkv.request import build_request

TILE_Q, TILE_KV = 4, 8

pytestmark = pytest.mark.skipif(
    not kernel_status().ok, reason=f"the CPU kernel is not available: {kernel_status().reason}"
)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> Iterator[CpuBackend]:
    backend = get_backend("cpu")
    assert isinstance(backend, CpuBackend)
    monkeypatch.setattr(backend, "tile_q", TILE_Q)
    monkeypatch.setattr(backend, "tile_kv", TILE_KV)
    yield backend


def readable(value: object) -> str:
    return str(value).removeprefix("torch.")


def compare(
    x: Inputs, dtype: torch.dtype, seed: int, *, bias: object = None, **kwargs: object
) -> list[Tensor | None]:
    """The cpu backend, the float64 reference and the plain same-dtype control on the same
    inputs: output and every gradient within the control's error bound. Returns the cpu
    backend's [out, dq, dk, dv, dbias]."""
    B, Hq, Nq, Dv = x.q.shape[0], x.q.shape[1], x.q.shape[2], x.v.shape[3]
    grad_out = torch.randn(
        B, Hq, Nq, Dv, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    dense = dense_mask_of(x.q, x.k, **kwargs)

    def run(backend: str | None, inputs: Inputs, b: object) -> list[Tensor | None]:
        if backend is None:
            req = build_request(inputs.q, inputs.k, inputs.v, bias=b)  # type: ignore[arg-type]
            modify: Callable[[Tensor], Tensor] | None = None
            if b is not None:
                modify = lambda s: req.modify_scores(s, req.full_q, req.full_kv)  # noqa: E731
            out = naive_attention(inputs.q, inputs.k, inputs.v, dense, modify, req.scale)
        else:
            out = qkv.attention(inputs.q, inputs.k, inputs.v, bias=b, backend=backend, **kwargs)  # type: ignore[arg-type]
        out.backward(grad_out.to(out.dtype))
        return [out.detach(), inputs.q.grad, inputs.k.grad, inputs.v.grad, bias_grad(b)]

    got = run("cpu", x.to(dtype), cast_bias(bias, dtype))
    want = run("reference", x.to(torch.float64), cast_bias(bias, torch.float64))
    ctrl = run(None, x.to(dtype), cast_bias(bias, dtype))
    for name, g, w, c in zip(("out", "dq", "dk", "dv", "dbias"), got, want, ctrl, strict=True):
        if w is None:
            continue
        assert g is not None and c is not None, f"{name}: no gradient"
        assert_within_control(name, g, w, c, dtype)
    empty = ~dense.any(-1)  # rows with nothing to attend: zeros, exactly
    assert got[0] is not None and got[1] is not None
    assert torch.equal(got[0][empty], torch.zeros_like(got[0][empty]))
    assert torch.equal(got[1][empty], torch.zeros_like(got[1][empty]))
    return got


CASES = list(
    itertools.product(
        DTYPES, CAUSAL, [*MASKS, "query_padding", "window_and_doc", "or_and_not", "not_window"]
    )
)


def cpu_mask(kind: str, B: int, Nq: int, Nk: int, seed: int) -> object:
    g = torch.Generator().manual_seed(seed)
    if kind == "query_padding":
        return masks.query_padding(torch.randint(0, Nq + 1, (B,), generator=g))
    if kind == "window_and_doc":
        ids = torch.sort(torch.randint(0, 3, (B, max(Nq, Nk)), generator=g), dim=-1).values
        return masks.sliding_window(5, 1) & masks.document(ids[:, :Nq], ids[:, :Nk])
    if kind == "or_and_not":  # lowered to several key intervals per row
        lengths = torch.randint(0, Nk + 1, (B,), generator=g)
        return (masks.prefix_lm(3) | masks.sliding_window(2, 1)) & ~masks.key_padding(lengths)
    if kind == "not_window":
        return ~masks.sliding_window(3, 2, offset=1)
    return tiled_mask(kind, B, Nq, Nk, seed)


@pytest.mark.parametrize(("dtype", "causal", "mask_kind"), CASES, ids=readable)
def test_matches_float64_reference(dtype: torch.dtype, causal: object, mask_kind: str) -> None:
    case = CASES.index((dtype, causal, mask_kind))
    B, Hq, Hkv, Nq, Nk, D, Dv, non_contiguous = SHAPES[case % len(SHAPES)]
    x = random_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, seed=case, non_contiguous=non_contiguous)
    compare(x, dtype, case, mask=cpu_mask(mask_kind, B, Nq, Nk, case), causal=causal)


SERVED_BIASES = [b for b in BIASES if b != "relative_softcap"] + ["chain"]
BIAS_CASES = list(itertools.product(DTYPES, SERVED_BIASES, ["none", "window"]))


@pytest.mark.parametrize(("dtype", "bias_kind", "mask_kind"), BIAS_CASES, ids=readable)
def test_bias_and_its_gradient_match_float64_reference(
    dtype: torch.dtype, bias_kind: str, mask_kind: str
) -> None:
    case = BIAS_CASES.index((dtype, bias_kind, mask_kind))
    B, Hq, Hkv, Nq, Nk, D, Dv, non_contiguous = SHAPES[case % len(SHAPES)]
    x = random_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, seed=100 + case, non_contiguous=non_contiguous)
    options: dict[str, object] = {}
    if mask_kind == "window":
        options = {"mask": masks.sliding_window(4, 2), "causal": "bottom_right"}
    if bias_kind == "chain":  # a learnable table pulled back through a softcap
        bias: object = scores.chain(
            make_bias("relative", Hq, Nq, Nk, case), scores.alibi(Hq), scores.softcap(3.0)
        )
    else:
        bias = make_bias(bias_kind, Hq, Nq, Nk, case)
    got = compare(x, dtype, case, bias=bias, **options)
    if bias_kind in ("tensor", "relative"):
        assert got[4] is not None


def test_chained_relative_table_gets_its_gradient_through_softcap() -> None:
    x = random_inputs(1, 2, 1, 9, 13, 8, seed=5).to(torch.float64)
    rel = scores.RelativePositionBias(2, max_distance=3).double()
    torch.nn.init.normal_(rel.table, generator=torch.Generator().manual_seed(6))
    grads = []
    for backend in ("cpu", "reference"):
        rel.table.grad = None
        out = qkv.attention(
            x.q, x.k, x.v, bias=scores.chain(rel, scores.softcap(1.5)), backend=backend
        )
        out.sum().backward()
        assert rel.table.grad is not None
        grads.append(rel.table.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "options",
    [
        {"causal": True, "mask": masks.sliding_window(3)},
        {"mask": masks.key_padding([5, 9])},
        {"bias": scores.alibi(2), "causal": "bottom_right"},
    ],
    ids=["causal_window", "padding", "alibi"],
)
def test_gradcheck(options: dict[str, object]) -> None:
    x = random_inputs(2, 2, 1, 7, 9, 4, seed=3).to(torch.float64)
    fn = lambda q, k, v: qkv.attention(q, k, v, backend="cpu", **options)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.q, x.k, x.v))


def test_gradcheck_bias_tensor_and_relative_table() -> None:
    x = random_inputs(1, 2, 2, 6, 10, 4, seed=4).to(torch.float64)
    bias = torch.randn(1, 2, 1, 10, dtype=torch.float64, requires_grad=True)  # broadcast rows
    rel = scores.RelativePositionBias(2, max_distance=2).double()
    torch.nn.init.normal_(rel.table)

    def fn(q: Tensor, k: Tensor, b: Tensor, table: Tensor) -> Tensor:
        with torch.no_grad():
            rel.table.copy_(table)
        out = qkv.attention(q, k, x.v, bias=b, backend="cpu", causal=True)
        return out

    assert torch.autograd.gradcheck(lambda q, k, b: fn(q, k, b, rel.table), (x.q, x.k, bias))
    assert torch.autograd.gradcheck(
        lambda table: qkv.attention(
            x.q.detach(), x.k.detach(), x.v.detach(), bias=_table_mod(table), backend="cpu"
        ),
        (rel.table.detach().clone().requires_grad_(True),),
    )


def _table_mod(table: Tensor) -> scores.RelativePositionBias:
    """A RelativePositionBias whose table is ``table`` itself (gradients flow to it)."""
    mod = scores.RelativePositionBias(table.shape[0], max_distance=(table.shape[1] - 1) // 2)
    del mod.table
    mod.table = table  # type: ignore[assignment]
    return mod


def test_default_tiles_cross_tiles_in_float32(small_tiles: CpuBackend) -> None:
    small_tiles.tile_q = small_tiles.tile_kv = None  # the shipped sizes
    x = random_inputs(1, 4, 2, TILE_Q + 3, 700, 16, seed=7)
    compare(x, torch.float32, 7, causal="bottom_right", mask=masks.sliding_window(100))


def test_block_mask_passed_as_mask_is_reused() -> None:
    x = random_inputs(1, 2, 2, 30, 30, 8, seed=8)
    bm = build_block_mask(masks.sliding_window(4), q_len=30, kv_len=30, tile_q=4, tile_kv=8)
    compare(x, torch.float32, 8, mask=bm, causal=True)


def test_tile_choice_narrows_for_windows_and_stays_wide_without_mask() -> None:
    q = torch.empty(1, 1, 4096, 8)
    wide = choose_tiles(build_request(q, q, q), KERNEL_TILE_Q, (256, 128, 64))
    narrow = choose_tiles(
        build_request(q, q, q, mask=masks.sliding_window(63)), KERNEL_TILE_Q, (256, 64)
    )
    assert wide == (KERNEL_TILE_Q, 256)
    assert narrow == (KERNEL_TILE_Q, 64)


def test_tall_tiles_only_for_forward_calls_streaming_much_k_and_v() -> None:
    # 8 heads x 16384 keys x (64 + 64) float32 values: 8 MiB of K and V per query tile
    q = torch.empty(1, 8, 16384, 64)
    assert choose_tiles(build_request(q, q, q)) == (512, 512)
    assert choose_tiles(build_request(q, q, q, causal=True)) == (512, 512)
    window = build_request(q, q, q, mask=masks.sliding_window(255), causal=True)
    assert choose_tiles(window)[0] == KERNEL_TILE_Q  # a window reads few keys per query tile
    short = torch.empty(1, 8, 4096, 64)  # 2 MiB
    assert choose_tiles(build_request(short, short, short))[0] == KERNEL_TILE_Q
    trained = q.clone().requires_grad_()
    assert choose_tiles(build_request(trained, q, q))[0] == KERNEL_TILE_Q
    one_head = torch.empty(1, 1, 16384, 64)  # 512-row tiles would leave 32 tasks
    assert choose_tiles(build_request(one_head, one_head, one_head)) == (256, 512)
    step = torch.empty(8, 8, 1, 64)  # decoding: one query tile reads K and V once
    assert (
        choose_tiles(build_request(step, q.expand(8, -1, -1, -1), q.expand(8, -1, -1, -1)))[0]
        == KERNEL_TILE_Q
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kwargs",
    [{"causal": True}, {"mask": masks.sliding_window(200)}, {}],
    ids=["causal", "window", "none"],
)
def test_tall_tiles_match_float64(
    small_tiles: CpuBackend, dtype: torch.dtype, kwargs: dict[str, object]
) -> None:
    # the kernel at the tall tile sizes, forward and backward, partial last tiles included
    x = random_inputs(1, 4, 2, 1000, 1100, 16, seed=31)
    for tile_q, tile_kv in cpu_backend.TALL_TILES:
        small_tiles.tile_q, small_tiles.tile_kv = tile_q, tile_kv
        compare(x, dtype, 31, **kwargs)


def test_tile_states_pooled_from_finer_tiles_equal_their_own_classification() -> None:
    from qkv.backends.block_mask import hinted_status, request_status

    g = torch.Generator().manual_seed(5)
    docs = torch.randint(0, 6, (1000,), generator=g).sort().values
    for mask in (masks.sliding_window(70), masks.document(docs) & masks.causal()):
        request = build_request(torch.empty(1, 1, 1000, 8), torch.empty(1, 1, 1000, 8),
                                torch.empty(1, 1, 1000, 8), mask=mask)  # fmt: skip
        request_status(request, 64, 64, resolve=False)  # the finest grid first
        for tq, tk in ((128, 64), (64, 256), (256, 512), (512, 128)):
            pooled = request_status(request, tq, tk, resolve=False)
            direct = hinted_status(request.whole_mask, 1000, 1000, tq, tk)
            assert torch.equal(pooled, direct), (mask, tq, tk)


UNSERVED = {
    "dropout": ({"dropout_p": 0.1}, "dropout"),
    "weights": ({"return_weights": True}, "probabilities"),
    "own mask function": ({"mask": lambda b, h, q, kv: (q + kv) % 3 != 0}, "of your own"),
    "or with documents": (
        {"mask": masks.causal() | masks.document(torch.arange(300) // 7)},
        "| of a document mask",
    ),
    "own score function": ({"bias": lambda s, b, h, q, kv: s * 2}, "not one the CPU"),
}


@pytest.mark.parametrize("kind", list(UNSERVED))
def test_refuses_with_a_reason_and_auto_falls_back_to_chunked(kind: str) -> None:
    options, words = UNSERVED[kind]
    q = torch.randn(1, 2, 300, 8)
    request = build_request(q, q, q, **options)  # type: ignore[arg-type]
    reason = get_backend("cpu").supports(request)
    assert reason is not None and words in reason
    explanation = qkv.explain(q, q, q, **options)  # type: ignore[arg-type]
    assert explanation.chosen != "cpu"
    assert explanation.reasons["cpu"] == reason


def test_kernel_that_cannot_be_built_says_why_and_nothing_breaks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failed = build.KernelStatus(
        False, "the CPU kernel cannot be built: no C++ compiler", 0.0, False
    )
    monkeypatch.setattr(build, "_status", failed)
    q = torch.randn(1, 2, 2048, 16)
    mask = masks.sliding_window(63)
    explanation = qkv.explain(q, q, q, mask=mask)
    assert explanation.reasons["cpu"] == failed.reason
    assert explanation.chosen == "chunked"
    want = qkv.attention(q, q, q, mask=mask, backend="reference")
    torch.testing.assert_close(qkv.attention(q, q, q, mask=mask), want)


def test_build_reports_a_missing_compiler_and_the_off_switch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("QKV_CPU_KERNEL", "0")
    off = build._build()
    assert not off.ok and off.reason is not None and "QKV_CPU_KERNEL=0" in off.reason
    monkeypatch.delenv("QKV_CPU_KERNEL")
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no cached build to load
    missing = build._build()
    assert not missing.ok and missing.reason is not None and "compiler" in missing.reason


def test_extension_name_changes_with_the_source_flags_and_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = build.extension_name()
    monkeypatch.setattr(build, "CFLAGS", [*build.CFLAGS, "-DX"])
    assert build.extension_name() != name
    monkeypatch.setattr(build, "_cpu_flags", lambda: "sse2")
    assert build.extension_name() not in (name,)


def test_auto_takes_the_kernel_for_a_long_sliding_window(small_tiles: CpuBackend) -> None:
    small_tiles.tile_q = small_tiles.tile_kv = None
    q = torch.empty(1, 8, 8192, 64)
    request = build_request(q, q, q, mask=masks.sliding_window(255))
    assert select_backend(request).backend.name == "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_heads_in_threads_match_one_thread(dtype: torch.dtype) -> None:
    x = random_inputs(2, 6, 2, 40, 50, 8, seed=9).to(dtype)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = x.to(dtype)
            out = qkv.attention(y.q, y.k, y.v, backend="cpu", causal=True)
            out.sum().backward()
            outs.append([out.detach(), y.q.grad, y.k.grad, y.v.grad])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


BF16_GEMM = half_gemm_reason(torch.bfloat16)
needs_bf16_gemm = pytest.mark.skipif(
    BF16_GEMM is not None, reason=f"no bfloat16 GEMM on this CPU: {BF16_GEMM}"
)


@needs_bf16_gemm
@pytest.mark.parametrize(
    ("shape", "options"),
    [
        ((1, 4, 2, 67, 300, 64, 64), {"causal": "bottom_right", "mask": masks.sliding_window(100)}),
        ((2, 2, 1, 33, 45, 7, 5), {}),  # odd head dims and lengths: zero padding to even
        ((1, 2, 2, 70, 70, 16, 16), {"bias": "alibi", "causal": True}),
    ],
    ids=["window_gqa", "odd_dims", "alibi"],
)
def test_bfloat16_on_the_half_gemms_with_shipped_tiles(
    small_tiles: CpuBackend, shape: tuple[int, ...], options: dict[str, object]
) -> None:
    small_tiles.tile_q = small_tiles.tile_kv = None  # the shipped sizes (64 x 256/128/64)
    x = random_inputs(*shape, seed=11)
    options = dict(options)
    bias = scores.alibi(shape[1]) if options.pop("bias", None) == "alibi" else None
    y = x.to(torch.bfloat16, requires_grad=False)
    request = build_request(y.q, y.k, y.v, **options)  # type: ignore[arg-type]
    assert uses_half_gemm(torch.bfloat16, *small_tiles.tile_sizes(request))
    compare(x, torch.bfloat16, 11, bias=bias, **options)


@needs_bf16_gemm
@pytest.mark.parametrize("head_dim", [16, 7])
def test_bfloat16_inference_writes_the_output_the_training_path_rounds(head_dim: int) -> None:
    # without gradients the kernel writes bfloat16 itself; it must be the float32 output of the
    # training path rounded to nearest even, NaN rows and rows attending nothing included
    x = random_inputs(2, 4, 2, 150, 170, head_dim, seed=13)
    q, k, v = (t.to(torch.bfloat16) for t in (x.q, x.k, x.v))
    q[0, 1, 5, 0] = float("nan")  # one NaN row
    keep = torch.ones(150, 170, dtype=torch.bool)
    keep[7] = False  # one row attending nothing
    kwargs: dict[str, object] = {"mask": keep, "causal": "bottom_right"}
    with torch.no_grad():
        inferred = qkv.attention(q, k, v, backend="cpu", **kwargs)  # type: ignore[arg-type]
    trained = qkv.attention(
        q.requires_grad_(),
        k,
        v,
        backend="cpu",
        **kwargs,  # type: ignore[arg-type]
    )
    assert inferred.dtype == torch.bfloat16
    assert torch.equal(inferred.isnan(), trained.isnan()) and inferred[0, 1, 5].isnan().all()
    assert torch.equal(inferred.nan_to_num(), trained.detach().nan_to_num())
    assert torch.equal(inferred[:, :, 7], torch.zeros_like(inferred[:, :, 7]))


@needs_bf16_gemm
def test_bfloat16_runs_on_the_half_gemms_and_explain_says_so(
    small_tiles: CpuBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = random_inputs(1, 2, 1, 20, 24, 8, seed=12).to(torch.bfloat16, requires_grad=False)
    note = str(qkv.explain(x.q, x.k, x.v, backend="cpu", causal=True))
    assert "bfloat16 GEMMs with float32 accumulation" in note
    on_gemms = qkv.attention(x.q, x.k, x.v, backend="cpu", causal=True)
    monkeypatch.setitem(cpu_backend._half_reasons, torch.bfloat16, "switched off")
    in_float32 = qkv.attention(x.q, x.k, x.v, backend="cpu", causal=True)
    # P rounded to bfloat16 before P V: not the float32 computation, bit for bit
    assert not torch.equal(on_gemms, in_float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_without_its_gemm_computes_in_float32_and_says_why(
    small_tiles: CpuBackend, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    monkeypatch.setitem(cpu_backend._half_reasons, dtype, "no such unit (test)")
    x = random_inputs(1, 2, 1, 21, 30, 8, seed=13)
    compare(x, dtype, 13, causal=True)
    y = x.to(dtype, requires_grad=False)
    note = str(qkv.explain(y.q, y.k, y.v, backend="cpu", causal=True))
    assert "computed in float32 BLAS" in note and "no such unit (test)" in note


@needs_bf16_gemm
def test_odd_tiles_compute_bfloat16_in_float32(small_tiles: CpuBackend) -> None:
    small_tiles.tile_q, small_tiles.tile_kv = 3, 8  # VNNI pairs rows: odd tiles cannot
    x = random_inputs(1, 2, 2, 17, 19, 8, seed=14)
    compare(x, torch.bfloat16, 14, mask=masks.sliding_window(4))
    y = x.to(torch.bfloat16, requires_grad=False)
    note = str(qkv.explain(y.q, y.k, y.v, backend="cpu"))
    assert "odd tile sizes (3, 8)" in note


def test_float_dtypes_have_no_precision_note() -> None:
    assert precision_note(torch.float32, 64, 256) is None
    assert half_gemm_reason(torch.float32) == "torch.float32 is not a half-precision type"


DECODE_MASKS = {
    "none": {},
    "causal": {"causal": "bottom_right"},
    "window": {"causal": "bottom_right", "mask": masks.sliding_window(40)},
    "key_padding": {"mask": masks.key_padding(torch.tensor([301, 97]))},
    "nothing_to_attend": {"mask": masks.key_padding(torch.tensor([0, 150]))},
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_q", [1, 3])
@pytest.mark.parametrize("mask_kind", list(DECODE_MASKS))
def test_decoding_splits_keys_and_reads_each_group_once(
    dtype: torch.dtype, n_q: int, mask_kind: str
) -> None:
    # one query tile against 38 key tiles: the decoding path, its keys in several chunks, the
    # 4 query heads of each kv head stacked; the lse it returns feeds the backward
    x = random_inputs(2, 8, 2, n_q, 301, 8, 6, seed=15)
    compare(x, dtype, 15, **DECODE_MASKS[mask_kind])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_reads_a_cache_slice_in_place_and_its_gradient_is_right(
    dtype: torch.dtype,
) -> None:
    # a KV cache is a slice of a longer buffer: dense rows, heads apart (not contiguous)
    g = torch.Generator().manual_seed(17)
    buffers = [torch.randn(2, 2, 400, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    q64 = torch.randn(2, 8, 3, 8, generator=g, dtype=torch.float64)
    grad = torch.randn(2, 8, 3, 8, generator=g, dtype=torch.float64)

    def run(backend: str, t: torch.dtype) -> list[Tensor]:
        q, *caches = (x.to(t).requires_grad_() for x in (q64, *buffers))
        k, v = (c[:, :, :301] for c in caches)
        assert not k.is_contiguous()
        out = qkv.attention(q, k, v, causal="bottom_right", backend=backend)
        out.backward(grad.to(t))
        return [out.detach(), q.grad, caches[0].grad, caches[1].grad]  # type: ignore[list-item]

    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for got, want in zip(run("cpu", dtype), run("reference", torch.float64), strict=True):
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_decoding_with_the_shipped_tiles(small_tiles: CpuBackend) -> None:
    small_tiles.tile_q = small_tiles.tile_kv = None
    x = random_inputs(1, 8, 2, 2, 3000, 32, seed=16)
    compare(x, torch.float32, 16, causal="bottom_right")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("n_q", "head_dim", "value_dim"), [(1, 128, 128), (2, 64, 32), (1, 32, 256)]
)
@pytest.mark.parametrize("mask_kind", ["causal", "window", "key_padding"])
def test_decoding_vector_loops(
    dtype: torch.dtype, n_q: int, head_dim: int, value_dim: int, mask_kind: str
) -> None:
    # head dims of 32, 64, 128 or 256 with at most 8 stacked rows take the AVX-512 loops that
    # read K and V in their own type (where the CPU has AVX-512; plain loops elsewhere): 301 keys
    # end on an odd tile (the last key outside the pairs), the window (the last 41 keys) leaves
    # masked pairs of keys at both of its ends
    kwargs = dict(DECODE_MASKS[mask_kind])
    if mask_kind == "window":
        kwargs["mask"] = masks.sliding_window(40, offset=301 - n_q)
    x = random_inputs(2, 8, 2, n_q, 301, head_dim, value_dim, seed=17)
    compare(x, dtype, 17, **kwargs)


def test_auto_takes_the_kernel_for_grouped_decoding() -> None:
    # a few queries against a long cache are priced by the bytes of K and V they read: SDPA
    # reads them once per query head, the kernel once per group of heads
    q = torch.randn(1, 32, 1, 64)
    k = torch.randn(1, 8, 16384, 64)
    request = build_request(q, k, k, causal="bottom_right")
    selection = select_backend(request)
    assert selection.backend.name == "cpu"
    assert selection.costs["sdpa"] > 1.5 * selection.costs["cpu"]


def _bias_call_with_threads(threads: int) -> list[Tensor]:
    """Forward and every gradient (a broadcast bias and a relative table included) of one call
    run with ``threads`` threads and the default tile sizes."""
    g = torch.Generator().manual_seed(12)
    q = torch.randn(2, 4, 300, 16, generator=g).requires_grad_()
    k = torch.randn(2, 2, 300, 16, generator=g).requires_grad_()
    v = torch.randn(2, 2, 300, 16, generator=g).requires_grad_()
    bias = torch.randn(1, 4, 1, 300, generator=g).requires_grad_()
    rel = scores.RelativePositionBias(4, 8)
    with torch.no_grad():
        rel.table.normal_(generator=g)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = qkv.attention(q, k, v, bias=bias, mask=masks.sliding_window(70), backend="cpu")
        out2 = qkv.attention(q, k, v, bias=rel, causal=True, backend="cpu")
        grad_out = torch.randn(out.shape, generator=g)
        loss = (out * grad_out).sum() + (out2 * grad_out).sum()
        grads = torch.autograd.grad(loss, (q, k, v, bias, rel.table))
    finally:
        torch.set_num_threads(previous)
    return [out.detach(), out2.detach(), *grads]


def test_deterministic_algorithms_give_the_same_bits_on_any_thread_count(
    small_tiles: CpuBackend,
) -> None:
    small_tiles.tile_q = small_tiles.tile_kv = None
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        one, two, three = (_bias_call_with_threads(n) for n in (1, 2, 3))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for a, b, c in zip(one, two, three, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_broadcast_bias_gradient_is_accumulated_in_float64(small_tiles: CpuBackend) -> None:
    # A scalar bias shifts every score of a row alike: softmax ignores it, its gradient is 0.
    # Summed over 2048 x 2048 scores in float32 one after another it came out 1.1e-4; in
    # float64 only the rounding of each dS remains, as on the reference backend.
    small_tiles.tile_q = small_tiles.tile_kv = None
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 1, 2048, 16, generator=g) for _ in range(3))
    grad_out = torch.randn(1, 1, 2048, 16, generator=g)
    found = {}
    for backend in ("cpu", "reference"):
        bias = torch.zeros(1, requires_grad=True)
        out = qkv.attention(q, k, v, bias=bias, backend=backend)
        (found[backend],) = torch.autograd.grad((out * grad_out).sum(), bias)
    assert abs(float(found["cpu"])) < max(2 * abs(float(found["reference"])), 2e-5)


# --- the merged kernel's routes: NaN rule, log-sum-exp and determinism on each ------------------

ROUTES = {
    # (dtype, Nq): one query tile of at most 16 rows decodes; more rows tile
    "float32_tiled": (torch.float32, 24),
    "float32_decode": (torch.float32, 3),
    "bfloat16_tiled": (torch.bfloat16, 24),
    "bfloat16_decode": (torch.bfloat16, 3),
}


def _route_inputs(dtype: torch.dtype, n_q: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, n_q, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 301, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 301, 8, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _skip_without_half_gemm(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and half_gemm_reason(dtype) is not None:
        pytest.skip(f"no bfloat16 GEMM on this CPU: {half_gemm_reason(dtype)}")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("route", list(ROUTES))
def test_attended_nan_or_inf_makes_its_row_nan_on_every_route(
    small_tiles: CpuBackend, route: str, value: float
) -> None:
    # key 299 of kv head 0 poisoned: attended by the last rows only (causal bottom-right), in
    # the last key chunk of the decoding split, whose merge must keep the NaN; key 40 of kv head
    # 1: in an early chunk, attended by every row of query heads 2 and 3
    small_tiles.tile_q = 16  # decoding rows (G * Nq = 6) and tiled rows (24) alike
    dtype, n_q = ROUTES[route]
    _skip_without_half_gemm(dtype)
    q, k, v = _route_inputs(dtype, n_q, 31)
    k[0, 0, 299] = value
    k[0, 1, 40] = value
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    kwargs: dict[str, object] = {"causal": "bottom_right"}
    request = build_request(q, k, v, **kwargs)  # type: ignore[arg-type]
    if dtype == torch.bfloat16:
        assert uses_half_gemm(dtype, *small_tiles.tile_sizes(request))
    out, lse = qkv.attention(q, k, v, backend="cpu", return_lse=True, **kwargs)  # type: ignore[arg-type]
    ref_out, ref_lse = qkv.attention(
        *(t.detach().double() for t in (q, k, v)), backend="reference", return_lse=True, **kwargs
    )  # type: ignore[arg-type]
    nan_rows = ref_out.isnan().any(-1)
    assert nan_rows.any() and not nan_rows.all()
    assert torch.equal(out.isnan().any(-1), nan_rows)
    assert out[nan_rows].isnan().all() and lse[nan_rows].isnan().all()
    assert torch.equal(lse.isnan(), ref_lse.isnan())
    finite = ~nan_rows
    assert torch.allclose(
        out[finite].double(), ref_out[finite], atol=3e-2 if dtype == torch.bfloat16 else 1e-5
    )
    # dV: NaN exactly at the keys a NaN row attends (masked keys of a NaN row get none)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(32))
    (dv,) = torch.autograd.grad(out, v, grad_out.to(dtype))
    ref_v = v.detach().double().requires_grad_()
    ref = qkv.attention(
        q.detach().double(), k.detach().double(), ref_v, backend="reference", **kwargs
    )  # type: ignore[arg-type]
    (ref_dv,) = torch.autograd.grad(ref, ref_v, grad_out.double())
    assert torch.equal(dv.isnan().any(-1), ref_dv.isnan().any(-1))


@pytest.mark.parametrize("route", list(ROUTES))
def test_log_sum_exp_and_its_gradient_on_every_route(small_tiles: CpuBackend, route: str) -> None:
    small_tiles.tile_q = 16
    dtype, n_q = ROUTES[route]
    _skip_without_half_gemm(dtype)
    q, k, v = (t.requires_grad_() for t in _route_inputs(dtype, n_q, 33))
    kwargs: dict[str, object] = {"causal": "bottom_right", "mask": masks.sliding_window(90)}
    request = build_request(q, k, v, return_lse=True, **kwargs)  # type: ignore[arg-type]
    out, _, lse = get_backend("cpu").forward_lse(request)  # type: ignore[attr-defined]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = qkv.attention(*leaves, backend="reference", return_lse=True, **kwargs)  # type: ignore[arg-type]
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(out.double(), ref_out.detach(), atol=tol)
    assert torch.allclose(lse.double(), ref_lse.detach(), atol=tol)
    g = torch.Generator().manual_seed(34)
    w_out, w_lse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    got = torch.autograd.grad((out.float() * w_out).sum() + (lse.float() * w_lse).sum(), (q, k, v))
    want = torch.autograd.grad(
        (ref_out * w_out.double()).sum() + (ref_lse * w_lse.double()).sum(), leaves
    )
    for name, a, b in zip("qkv", got, want, strict=True):
        error = float((a.double() - b).abs().max())
        assert error <= (0.1 if dtype == torch.bfloat16 else 1e-4) * float(b.abs().max()), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_and_table_gradients_are_bitwise_the_same_on_any_thread_count(
    small_tiles: CpuBackend, dtype: torch.dtype
) -> None:
    # the float64 per-run accumulators on the float and half-precision backward alike
    _skip_without_half_gemm(dtype)
    small_tiles.tile_q, small_tiles.tile_kv = 8, 16
    g = torch.Generator().manual_seed(35)
    q = torch.randn(2, 4, 40, 8, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 2, 40, 8, generator=g).to(dtype).requires_grad_() for _ in range(2))
    bias = torch.randn(1, 4, 1, 40, generator=g).requires_grad_()
    rel = scores.RelativePositionBias(4, 6)
    with torch.no_grad():
        rel.table.normal_(generator=g)
    grad_out = torch.randn(2, 4, 40, 8, generator=g).to(dtype)

    def run(threads: int) -> list[Tensor]:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = qkv.attention(q, k, v, bias=bias, causal=True, backend="cpu")
            out2 = qkv.attention(q, k, v, bias=rel, causal=True, backend="cpu")
            loss = (out * grad_out).sum() + (out2 * grad_out).sum()
            grads = torch.autograd.grad(loss, (q, k, v, bias, rel.table))
        finally:
            torch.set_num_threads(previous)
        return [out.detach(), out2.detach(), *grads]

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        one, two, three = run(1), run(2), run(3)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for a, b, c in zip(one, two, three, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
