"""The chunked backend: float64 conformance across tiles, skipped tiles, memory, block masks.

Tiles are shrunk to ``4 x 8`` positions (the ``small_tiles`` fixture), so sequences of a few dozen
positions cross many tiles and tile boundaries (lengths tile - 1, tile, tile + 1, primes, 1).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import qkv
from gold import (
    Inputs,
    assert_within_control,
    dense_mask_of,
    max_error,
    naive_attention,
    random_inputs,
)
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
from qkv.backends import get_backend
from qkv.backends.block_mask import EMPTY, FULL, PARTIAL, TILE_SIZES, BlockMask
from qkv.backends.chunked import (
    ChunkedBackend,
    TileCounters,
    build_block_mask,
    chunked_attention,
    default_tile_sizes,
)
from qkv.request import build_request

TILE_Q, TILE_KV = 4, 8


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> Iterator[ChunkedBackend]:
    """The registered chunked backend with 4 x 8 tiles and fresh counters."""
    backend = get_backend("chunked")
    assert isinstance(backend, ChunkedBackend)
    monkeypatch.setattr(backend, "tile_q", TILE_Q)
    monkeypatch.setattr(backend, "tile_kv", TILE_KV)
    monkeypatch.setattr(backend, "counters", TileCounters())
    yield backend


def readable(value: object) -> str:
    return str(value).removeprefix("torch.")


def compare(
    x: Inputs,
    dtype: torch.dtype,
    seed: int,
    *,
    bias: object = None,
    **kwargs: object,
) -> list[Tensor | None]:
    """Run chunked, the float64 reference and the plain same-dtype control on the same inputs and
    assert the output and every gradient are within the control's error bound. Returns chunked's
    [out, dq, dk, dv, dbias]."""
    B, Hq, Nq, Dv = x.q.shape[0], x.q.shape[1], x.q.shape[2], x.v.shape[3]
    grad_out = torch.randn(
        B, Hq, Nq, Dv, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    dense = dense_mask_of(x.q, x.k, **kwargs)

    def run(fn: Callable[..., Tensor], inputs: Inputs, b: object) -> list[Tensor | None]:
        out = fn(inputs.q, inputs.k, inputs.v, b)
        out.backward(grad_out.to(out.dtype))
        return [out.detach(), inputs.q.grad, inputs.k.grad, inputs.v.grad, bias_grad(b)]

    def chunked(q: Tensor, k: Tensor, v: Tensor, b: object) -> Tensor:
        return qkv.attention(q, k, v, bias=b, backend="chunked", **kwargs)  # type: ignore[arg-type]

    def gold(q: Tensor, k: Tensor, v: Tensor, b: object) -> Tensor:
        return qkv.attention(q, k, v, bias=b, backend="reference", **kwargs)  # type: ignore[arg-type]

    def control(q: Tensor, k: Tensor, v: Tensor, b: object) -> Tensor:
        req = build_request(q, k, v, bias=b)  # type: ignore[arg-type]
        modify = None if b is None else (lambda s: req.modify_scores(s, req.full_q, req.full_kv))
        return naive_attention(q, k, v, dense, modify, req.scale)

    got = run(chunked, x.to(dtype), cast_bias(bias, dtype))
    want = run(gold, x.to(torch.float64), cast_bias(bias, torch.float64))
    ctrl = run(control, x.to(dtype), cast_bias(bias, dtype))
    for name, g, w, c in zip(("out", "dq", "dk", "dv", "dbias"), got, want, ctrl, strict=True):
        if w is None:
            continue
        assert g is not None, f"{name}: no gradient"
        assert c is not None
        assert_within_control(name, g, w, c, dtype)
    # Rows with nothing to attend: zero output and zero dQ, exactly.
    empty = ~dense.any(-1)  # (B, Hq, Nq)
    assert got[0] is not None and got[1] is not None
    assert torch.equal(got[0][empty], torch.zeros_like(got[0][empty]))
    assert torch.equal(got[1][empty], torch.zeros_like(got[1][empty]))
    return got


# --- conformance -------------------------------------------------------------------------------

CASES = list(itertools.product(DTYPES, CAUSAL, MASKS))


@pytest.mark.parametrize(("dtype", "causal", "mask_kind"), CASES, ids=readable)
def test_matches_float64_reference(dtype: torch.dtype, causal: object, mask_kind: str) -> None:
    case = CASES.index((dtype, causal, mask_kind))
    B, Hq, Hkv, Nq, Nk, D, Dv, non_contiguous = SHAPES[case % len(SHAPES)]
    x = random_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, seed=case, non_contiguous=non_contiguous)
    compare(x, dtype, case, mask=tiled_mask(mask_kind, B, Nq, Nk, case), causal=causal)


BIAS_CASES = list(itertools.product(DTYPES, BIASES, ["none", "window"]))


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
    got = compare(x, dtype, case, bias=make_bias(bias_kind, Hq, Nq, Nk, case), **options)
    if bias_kind in ("tensor", "relative", "relative_softcap"):
        assert got[4] is not None


def test_default_tile_sizes_cross_tiles_in_float32(small_tiles: ChunkedBackend) -> None:
    small_tiles.tile_q = small_tiles.tile_kv = None  # the shipped sizes
    tile_q, tile_kv = default_tile_sizes("cpu", torch.float32)
    x = random_inputs(1, 4, 2, tile_q + 1, 2 * tile_kv + 3, 16, seed=7)
    compare(x, torch.float32, 7, causal="bottom_right", mask=masks.sliding_window(tile_kv))
    assert small_tiles.counters.skipped > 0


def test_bias_tensor_that_broadcasts_gets_a_summed_gradient() -> None:
    x = random_inputs(2, 4, 2, 11, 19, 8, seed=3)
    bias = torch.randn(1, 4, 1, 19, dtype=torch.float64)  # one bias per head and key
    got = compare(x, torch.float32, 3, bias=bias, causal=True)
    assert got[4] is not None and got[4].shape == (1, 4, 1, 19)


def test_learnable_tensor_behind_a_graph_gets_its_gradient() -> None:
    # The score function reads `table`, computed from the leaf `param` before the call: the
    # gradient must reach `param` through that graph, tile after tile.
    x = random_inputs(1, 2, 1, 9, 13, 4, seed=8).to(torch.float64)
    param = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)

    def loss(backend: str) -> Tensor:
        table = param.tanh() * 2
        bias = scores.ScoreMod(
            lambda s, b, h, qi, ki: s + table[h, (ki - qi).clamp(-3, 3) + 3], "t"
        )
        out = qkv.attention(x.q, x.k, x.v, bias=bias, causal="bottom_right", backend=backend)
        return out.square().sum()

    (want,) = torch.autograd.grad(loss("reference"), param)
    (got,) = torch.autograd.grad(loss("chunked"), param)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@st.composite
def tiled_calls(draw: st.DrawFn) -> tuple[dict[str, object], tuple[int, int]]:
    """Random shapes, tile sizes, masks (tensor or function) and biases, in float64."""
    B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Hq = Hkv * draw(st.integers(1, 3))
    Nq, Nk = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    call: dict[str, object] = {
        "q": torch.randn(B, Hq, Nq, 4, generator=g, dtype=torch.float64, requires_grad=True),
        "k": torch.randn(B, Hkv, Nk, 4, generator=g, dtype=torch.float64, requires_grad=True),
        "v": torch.randn(B, Hkv, Nk, 3, generator=g, dtype=torch.float64, requires_grad=True),
        "causal": draw(st.sampled_from(CAUSAL)),
    }
    kind = draw(st.sampled_from(["none", "tensor", "window", "padding"]))
    if kind == "tensor":
        call["mask"] = torch.rand(B, 1, Nq, Nk, generator=g) < draw(st.floats(0.0, 1.0))
    elif kind == "window":
        call["mask"] = masks.sliding_window(draw(st.integers(0, 6)), draw(st.integers(0, 6)))
    elif kind == "padding":
        call["mask"] = masks.key_padding(torch.randint(0, Nk + 1, (B,), generator=g))
    if draw(st.booleans()):
        call["bias"] = torch.randn(1, Hq, Nq, Nk, generator=g, dtype=torch.float64) * 3
    return call, (draw(st.integers(1, 6)), draw(st.integers(1, 6)))


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tiled_calls())
def test_random_calls_and_tile_sizes_match_reference(
    small_tiles: ChunkedBackend, drawn: tuple[dict[str, object], tuple[int, int]]
) -> None:
    call, (small_tiles.tile_q, small_tiles.tile_kv) = drawn
    results = []
    for backend in ("chunked", "reference"):
        out = qkv.attention(**call, backend=backend)  # type: ignore[arg-type]
        grads = torch.autograd.grad(out, [call["q"], call["k"], call["v"]], torch.ones_like(out))
        results.append([out, *grads])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# --- gradcheck -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"causal": "bottom_right"},
        {"causal": True, "mask": masks.sliding_window(2)},
        {"mask": masks.key_padding([0, 6])},  # batch 0 fully masked
        {"bias": scores.softcap(1.5), "mask": masks.prefix_lm(3)},
    ],
    ids=["plain", "causal_bottom_right", "window", "fully_masked_batch", "softcap_prefix"],
)
def test_gradcheck(options: dict[str, object]) -> None:
    x = random_inputs(2, 4, 2, 5, 9, 4, 3, seed=11).to(torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: qkv.attention(q, k, v, backend="chunked", **options),  # type: ignore[arg-type]
        (x.q, x.k, x.v),
    )


def test_gradcheck_learnable_bias_tensor_and_table() -> None:
    x = random_inputs(1, 2, 1, 5, 9, 4, seed=5).to(torch.float64)
    bias = torch.randn(1, 2, 5, 9, dtype=torch.float64, requires_grad=True)
    table = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)

    def fn(q: Tensor, b: Tensor, t: Tensor) -> Tensor:
        rel = scores.ScoreMod(lambda s, bb, h, qi, ki: s + t[h, (ki - qi).clamp(-3, 3) + 3], "rel")
        capped = scores.chain(rel, scores.softcap(2.0))
        return qkv.attention(
            q, x.k, x.v, mask=masks.sliding_window(3, 1), bias=capped, backend="chunked"
        ) + qkv.attention(q, x.k, x.v, bias=b, causal=True, backend="chunked")

    assert torch.autograd.gradcheck(fn, (x.q, bias, table))


def test_gradcheck_with_dropout_from_a_fixed_seed() -> None:
    # With the seed fixed the dropped call is a deterministic function; its backward must
    # regenerate exactly the keep-masks forward used.
    x = random_inputs(2, 2, 1, 6, 10, 4, seed=2).to(torch.float64)

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        request = build_request(q, k, v, causal=True, dropout_p=0.4)
        out, _ = chunked_attention(request, tile_q=TILE_Q, tile_kv=TILE_KV, dropout_seed=1234)
        return out

    assert torch.autograd.gradcheck(fn, (x.q, x.k, x.v))


# --- work skipped --------------------------------------------------------------------------------


def tiles_visited(N: int, **options: object) -> TileCounters:
    backend = get_backend("chunked")
    assert isinstance(backend, ChunkedBackend)
    backend.counters.reset()
    x = random_inputs(1, 2, 2, N, N, 4, seed=0).to(torch.float32)
    qkv.attention(x.q, x.k, x.v, backend="chunked", **options).sum().backward()  # type: ignore[arg-type]
    return copy.copy(backend.counters)


def test_masked_tiles_are_skipped() -> None:
    N = 64  # 16 query tiles x 8 key tiles
    none = tiles_visited(N)
    assert (none.forward, none.backward, none.skipped, none.masked) == (128, 128, 0, 0)

    causal = tiles_visited(N, causal=True)
    # Query tile i (rows 4i..4i+3) needs key tiles 0..floor((4i+3)/8): 72 of 128.
    assert causal.forward == causal.backward == sum((4 * i + 3) // 8 + 1 for i in range(16)) == 72
    assert causal.skipped == 128 - 72
    # Only the diagonal tiles evaluate the mask (forward and backward): the rest are FULL.
    assert causal.masked == 2 * 16

    # A sliding window of W keys: O(N * W) tiles. Query tile i needs keys 4i - 8 .. 4i + 3,
    # two key tiles (one for the first two query tiles): 30 of 128, and doubling N adds 32.
    window = masks.sliding_window(8)
    short, long = tiles_visited(N, mask=window), tiles_visited(2 * N, mask=window)
    assert (short.forward, long.forward) == (30, 62)


def test_block_mask_is_evaluated_once_per_call_and_shared_across_batch_and_heads() -> None:
    seen: list[tuple[int, ...]] = []

    def recording(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        out = (q - kv).abs() <= 2
        seen.append(tuple(out.shape))
        return out

    x = random_inputs(3, 4, 2, 32, 32, 4, seed=1).to(torch.float32)
    qkv.attention(x.q, x.k, x.v, mask=recording, causal=True, backend="chunked")
    # A mask that ignores b and h is evaluated with those dims broadcast (size 1), never
    # expanded to B x H.
    assert all(shape[:2] == (1, 1) for shape in seen)
    assert seen[0][-2:] == (2, 3)  # the call check: a bool tensor of the broadcast shape
    assert seen[1][-2:] == (1, 1)  # the probe that learns that b and h are not read
    seen = seen[2:]
    # The summary: one strip of 4 query rows per query tile, over the key tiles causal leaves
    # (8, 8, 16, 16, 24, 24, 32, 32 keys): 640 of the 1024 pairs.
    assert [s[-1] for s in seen[:8]] == [8, 8, 16, 16, 24, 24, 32, 32]
    # Then only the PARTIAL tiles, one 4 x 8 tile each.
    assert all(s[-2:] == (TILE_Q, TILE_KV) for s in seen[8:])
    assert len(seen) - 8 == get_backend("chunked").counters.masked  # type: ignore[attr-defined]


def test_block_mask_built_once_and_reused() -> None:
    seen: list[tuple[int, ...]] = []

    def counting(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        out = (q - kv <= 5) & (kv <= q)
        seen.append(tuple(out.shape[-2:]))
        return out

    N = 40
    bm = build_block_mask(counting, q_len=N, kv_len=N, tile_q=TILE_Q, tile_kv=TILE_KV)
    assert isinstance(bm, BlockMask)
    assert bm.status.shape == (10, 5)
    assert set(bm.status.unique().tolist()) <= {EMPTY, PARTIAL, FULL}
    assert bm.visited_tiles < bm.num_tiles / 2
    x = random_inputs(2, 2, 1, N, N, 4, seed=4).to(torch.float64)
    seen.clear()
    out = qkv.attention(x.q, x.k, x.v, mask=bm, backend="chunked")
    # One evaluation per PARTIAL tile, and none of a whole strip: the summary was not rebuilt.
    # (The 2 x 2 calls check that the mask ignores b and h, as a summary built for batch=1
    # assumes; the 2 x 3 one is the call check.)
    assert [s for s in seen if s not in ((2, 2), (2, 3))] == [(TILE_Q, TILE_KV)] * bm.partial_tiles
    # A BlockMask is a mask function: every backend accepts it and agrees.
    want = qkv.attention(x.q, x.k, x.v, mask=bm, backend="reference")
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        want, qkv.attention(x.q, x.k, x.v, mask=counting, backend="reference")
    )


def test_built_in_masks_are_summarised_without_evaluating_them() -> None:
    # The classifier of a built-in mask, attached to a function that must never run: building
    # the summary only does index arithmetic, and agrees with evaluating the real mask.
    def never(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        raise AssertionError("the mask was evaluated")

    N = 96
    ids = torch.arange(N) * 5 // N
    for real in (
        masks.sliding_window(10, 3),
        masks.document(ids) & masks.causal(),
        masks.prefix_lm(12) | masks.key_padding([40]),
    ):
        hinted = masks.MaskFn(never, "never", real.tiles)
        got = build_block_mask(hinted, q_len=N, kv_len=N, tile_q=TILE_Q, tile_kv=TILE_KV)
        plain = masks.MaskFn(real.fn, "plain")  # no classifier: evaluated tile by tile
        want = build_block_mask(plain, q_len=N, kv_len=N, tile_q=TILE_Q, tile_kv=TILE_KV)
        assert torch.equal(got.status, want.status), real
        assert 0 < got.visited_tiles < got.num_tiles  # some work is skipped, not all


def test_block_mask_picture_and_causal_summary() -> None:
    bm = build_block_mask(None, q_len=8, kv_len=8, causal=True, tile_q=2, tile_kv=2)
    assert bm.to_string() == "+...\n#+..\n##+.\n###+"
    right = build_block_mask(None, q_len=4, kv_len=8, causal="bottom_right", tile_q=2, tile_kv=2)
    assert right.to_string() == "##+.\n###+"
    assert "visited=7/8" in repr(right)


def test_block_mask_that_does_not_fit_is_refused() -> None:
    x = random_inputs(2, 2, 1, 8, 8, 4, seed=0).to(torch.float32, requires_grad=False)
    wrong_length = build_block_mask(masks.sliding_window(2), q_len=8, kv_len=9)
    with pytest.raises(ValueError, match="built for q_len=8, kv_len=9"):
        qkv.attention(x.q, x.k, x.v, mask=wrong_length, backend="chunked")
    per_batch = build_block_mask(masks.key_padding([3, 8]), q_len=8, kv_len=8, batch=1)
    with pytest.raises(ValueError, match="depends on the batch index"):
        qkv.attention(x.q, x.k, x.v, mask=per_batch, backend="chunked")
    per_batch = build_block_mask(masks.key_padding([3, 8]), q_len=8, kv_len=8, batch=2)
    torch.testing.assert_close(
        qkv.attention(x.q, x.k, x.v, mask=per_batch, backend="chunked"),
        qkv.attention(x.q, x.k, x.v, mask=masks.key_padding([3, 8]), backend="reference"),
    )


# --- memory --------------------------------------------------------------------------------------


def test_saves_only_linear_memory_for_backward() -> None:
    # Everything autograd keeps between forward and backward: q, k, v, out and the log-sum-exp,
    # O(N * D), even with a learnable bias; the reference keeps O(N^2).
    N, D = 256, 8
    x = random_inputs(1, 2, 2, N, N, D, seed=0).to(torch.float32)
    rel = scores.RelativePositionBias(2, max_distance=16)
    saved: list[int] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = qkv.attention(x.q, x.k, x.v, bias=rel, causal=True, backend="chunked")
    # (+ a few elements the score function's 2 x 2 probe keeps for its own tiny graph)
    assert sum(saved) <= 4 * x.q.numel() + 2 * N + 64
    out.sum().backward()
    assert rel.table.grad is not None and rel.table.grad.abs().sum() > 0

    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        qkv.attention(x.q, x.k, x.v, bias=rel, causal=True, backend="reference")
    assert max(saved) >= 2 * N * N


# --- rows, dtypes, dropout, weights --------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=readable)
def test_fully_masked_rows_and_tiles_give_zeros_and_zero_gradients(dtype: torch.dtype) -> None:
    x = random_inputs(2, 2, 1, 12, 16, 4, seed=6).to(dtype)
    # Queries 8..11 see nothing: a whole query tile is skipped. Queries 0..3 of batch 0 see
    # nothing either, while batch 1's do: a tile computed with all of batch 0's rows masked.
    mask = masks.mask_function(lambda b, h, q, kv: (q < 8) & ((b == 1) | (q >= 4)))
    out = qkv.attention(x.q, x.k, x.v, mask=mask, backend="chunked")
    out.backward(torch.ones_like(out))
    for grad in (x.q.grad, x.k.grad, x.v.grad):
        assert grad is not None and torch.isfinite(grad).all()
    assert x.q.grad is not None
    for b, rows in ((0, slice(0, 4)), (0, slice(8, 12)), (1, slice(8, 12))):
        assert torch.equal(out[b, :, rows], torch.zeros_like(out[b, :, rows]))
        assert torch.equal(x.q.grad[b, :, rows], torch.zeros_like(x.q.grad[b, :, rows]))
    assert torch.isfinite(out).all()


def test_no_keys_at_all_gives_zeros() -> None:
    q = torch.randn(1, 2, 3, 4)
    k = v = torch.randn(1, 2, 0, 4)
    out = qkv.attention(q, k, v, backend="chunked")
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=readable)
def test_half_types_keep_float32_statistics(
    dtype: torch.dtype, small_tiles: ChunkedBackend
) -> None:
    # A long row of equal scores across 512 key tiles: every weight is 1/N. Accumulated in half
    # precision the sum would drift; with float32 statistics the output is the mean of V.
    small_tiles.tile_q, small_tiles.tile_kv = 1, 8
    N = 4096
    q = torch.zeros(1, 1, 1, 16, dtype=dtype)
    k = torch.zeros(1, 1, N, 16, dtype=dtype)
    v = torch.randn(1, 1, N, 8).to(dtype)
    out, weights = qkv.attention(q, k, v, return_weights=True, backend="chunked")
    assert weights.float().sum().item() == pytest.approx(1.0, abs=2e-3)
    torch.testing.assert_close(out.float(), v.float().mean(dim=2, keepdim=True), atol=2e-3, rtol=0)


def test_dropout_is_reproducible_and_changes_with_the_seed() -> None:
    x = random_inputs(2, 4, 2, 9, 13, 4, seed=9).to(torch.float32, requires_grad=False)
    torch.manual_seed(5)
    a = qkv.attention(x.q, x.k, x.v, dropout_p=0.5, causal=True, backend="chunked")
    torch.manual_seed(5)
    b = qkv.attention(x.q, x.k, x.v, dropout_p=0.5, causal=True, backend="chunked")
    c = qkv.attention(x.q, x.k, x.v, dropout_p=0.5, causal=True, backend="chunked")
    assert torch.equal(a, b) and not torch.equal(a, c)
    request = build_request(x.q, x.k, x.v, dropout_p=0.5)
    d, _ = chunked_attention(request, tile_q=TILE_Q, tile_kv=TILE_KV, dropout_seed=7)
    e, _ = chunked_attention(request, tile_q=TILE_Q, tile_kv=TILE_KV, dropout_seed=7)
    assert torch.equal(d, e)


@pytest.mark.parametrize("causal", CAUSAL, ids=readable)
@pytest.mark.parametrize("mask_kind", ["none", "sliding_window", "dense"])
def test_weights_equal_the_reference_weights(causal: object, mask_kind: str) -> None:
    B, Hq, Hkv, Nq, Nk = 2, 4, 2, 11, 19
    x = random_inputs(B, Hq, Hkv, Nq, Nk, 8, seed=12).to(torch.float64, requires_grad=False)
    options = {"causal": causal, "mask": tiled_mask(mask_kind, B, Nq, Nk, 3)}
    bias = scores.alibi(Hq)
    out, weights = qkv.attention(
        x.q, x.k, x.v, bias=bias, return_weights=True, backend="chunked", **options
    )
    want_out, want = qkv.attention(
        x.q, x.k, x.v, bias=bias, return_weights=True, backend="reference", **options
    )
    torch.testing.assert_close(weights, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    # Before dropout, as the reference.
    _, dropped = qkv.attention(
        x.q, x.k, x.v, return_weights=True, dropout_p=0.5, backend="chunked", **options
    )
    _, plain = qkv.attention(x.q, x.k, x.v, return_weights=True, backend="chunked", **options)
    torch.testing.assert_close(dropped, plain)


def test_default_tile_sizes_per_device_and_dtype() -> None:
    for dtype in DTYPES:
        assert default_tile_sizes("cpu", dtype) == TILE_SIZES[("cpu", dtype)]
        assert default_tile_sizes(torch.device("cuda"), dtype) == TILE_SIZES[("cuda", dtype)]


def test_inference_under_no_grad_matches_reference() -> None:
    x = random_inputs(1, 4, 1, 17, 23, 8, seed=13, non_contiguous=True).to(torch.float32)
    with torch.no_grad():
        out = qkv.attention(x.q, x.k, x.v, causal="bottom_right", backend="chunked")
    assert not out.requires_grad
    want = qkv.attention(x.q.double(), x.k.double(), x.v.double(), causal="bottom_right")
    assert max_error(out, want) < 1e-5
