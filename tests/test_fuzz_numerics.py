"""Numerical edge cases every CPU backend must agree on: fp16 range, Nk = 0, SDPA's CPU backward
at huge logits, and the documented rule for non-finite inputs (masked scores never matter)."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv import masks
from qkv.backends.sdpa import SdpaBackend
from qkv.request import build_request

BACKENDS = ["reference", "chunked", "sdpa", "cpu", "auto"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_product_past_65504_before_scaling_is_finite(backend: str) -> None:
    # q . k = 40 * 40 * 64 = 102,400 overflows float16 unscaled; scaled by 1/8 it is 12,800.
    q = torch.full((1, 2, 4, 64), 40.0, dtype=torch.float16)
    v = torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(0)).half()
    out = qkv.attention(q, q.clone(), v, backend=backend)
    # Uniform attention: every row is the mean of the values.
    expected = v.double().mean(dim=2, keepdim=True).expand(1, 2, 4, 8)
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", ["reference", "chunked", "auto"])
def test_float16_weights_past_65504_before_scaling_are_finite(backend: str) -> None:
    q = torch.full((1, 1, 3, 64), 40.0, dtype=torch.float16)
    v = torch.randn(1, 1, 3, 4).half()
    _, weights = qkv.attention(q, q.clone(), v, return_weights=True, backend=backend)
    expected = torch.full((1, 1, 3, 3), 1 / 3, dtype=torch.float64)
    torch.testing.assert_close(weights.double(), expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", ["reference", "chunked", "sdpa"])
def test_float16_values_summed_over_many_keys_do_not_overflow(backend: str) -> None:
    # Uniform attention over 512 keys of value 130: the un-normalised sum is 66,560.
    q = torch.zeros(1, 1, 4, 8, dtype=torch.float16)
    k = torch.randn(1, 1, 512, 8).half() * 0
    v = torch.full((1, 1, 512, 8), 130.0, dtype=torch.float16)
    out = qkv.attention(q, k, v, backend=backend)
    assert torch.equal(out, torch.full_like(out, 130.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_keys_give_zeros_even_for_huge_queries(backend: str, dtype: torch.dtype) -> None:
    q = torch.full((2, 2, 3, 8), 3e4, dtype=dtype)
    empty = torch.zeros(2, 2, 0, 8, dtype=dtype)
    for causal in (False, True):
        out = qkv.attention(q, empty, empty, causal=causal, backend=backend)
        assert out.shape == (2, 2, 3, 8) and torch.equal(out, torch.zeros_like(out))


def test_auto_keeps_huge_float32_logits_away_from_sdpa_cpu_backward() -> None:
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 2, 1000, 8, generator=g) * 1e4).requires_grad_()
    k = (torch.randn(1, 2, 1000, 8, generator=g) * 1e4).requires_grad_()
    v = torch.randn(1, 2, 1000, 8, generator=g).requires_grad_()
    # PyTorch's kernel itself gives NaN gradients here (what the guard is for).
    raw = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    raw_grads = torch.autograd.grad(raw.sum(), (q, k))
    assert not all(bool(torch.isfinite(g_).all()) for g_ in raw_grads)
    reason = SdpaBackend().supports(build_request(q, k, v))
    assert reason is not None and "2**24" in reason
    assert qkv.explain(q, k, v).chosen != "sdpa"
    out = qkv.attention(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(bool(torch.isfinite(g_).all()) for g_ in grads)
    # Without gradients (or at ordinary magnitudes) SDPA still serves.
    with torch.no_grad():
        assert SdpaBackend().supports(build_request(q, k, v)) is None
    small = build_request(q.detach().div(1e4).requires_grad_(), k.detach().div(1e4), v)
    assert SdpaBackend().supports(small) is None


def _nan_cases() -> list[tuple[str, dict[str, object], list[int]]]:
    """(name, what to change, which of the 6 query rows must be NaN)."""
    n = 6
    nan = float("nan")
    key_nan = {"k_rows": [5], "value": nan}
    return [
        ("NaN key masked by key_padding", {**key_nan, "mask": masks.key_padding([5])}, []),
        ("NaN key masked by a tensor", {**key_nan, "mask": torch.arange(n) < 5}, []),
        (
            "inf key masked by a tensor",
            {"k_rows": [5], "value": float("inf"), "mask": torch.arange(n) < 5},
            [],
        ),
        ("NaN key under causal", {**key_nan, "causal": True}, [5]),
        ("NaN key attended by all", {**key_nan}, [0, 1, 2, 3, 4, 5]),
        (
            "NaN queries in fully masked rows",
            {"q_rows": [4, 5], "value": nan, "mask": masks.query_padding([4])},
            [],
        ),
        (
            "NaN queries in fully masked rows (tensor)",
            {"q_rows": [4, 5], "value": nan, "mask": (torch.arange(n) < 4)[:, None].expand(n, n)},
            [],
        ),
        ("NaN query attended", {"q_rows": [2], "value": nan, "mask": masks.key_padding([5])}, [2]),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("name", "change", "nan_rows"), _nan_cases(), ids=[c[0] for c in _nan_cases()]
)
def test_masked_scores_never_matter(
    backend: str, name: str, change: dict, nan_rows: list[int]
) -> None:  # type: ignore[type-arg]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(3))
    q[:, :, change.get("q_rows", [])] = change["value"]  # type: ignore[index]
    k[:, :, change.get("k_rows", [])] = change["value"]  # type: ignore[index]
    out = qkv.attention(
        q,
        k,
        v,
        mask=change.get("mask"),
        causal=change.get("causal", False),
        backend=backend,  # type: ignore[arg-type]
    )
    rows = torch.isnan(out).any(-1)  # (B, H, N)
    expected = torch.zeros(6, dtype=torch.bool)
    expected[nan_rows] = True
    assert torch.equal(rows, expected.expand_as(rows)), name
    finite = ~expected
    assert torch.isfinite(out[:, :, finite]).all()


def test_cpu_kernel_row_of_nan_scores_in_its_first_tile_is_nan() -> None:
    # The kernel's row maximum propagates NaN: a row whose attended scores in the first visited
    # key tile are all NaN is NaN, not an empty (zero) row.
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 6, 8, generator=g) for _ in range(3))
    q[0, 0, 1] = float("nan")
    out = qkv.attention(q, k, v, backend="cpu")
    assert torch.isnan(out[0, 0, 1]).all()
    assert torch.isfinite(out[0, 0, [0, 2, 3, 4, 5]]).all()
    q, k, v = (torch.randn(1, 1, 300, 8, generator=g) for _ in range(3))
    k[0, 0, :256] = float("nan")  # the whole first key tile
    assert torch.isnan(qkv.attention(q, k, v, backend="cpu")).all()


@pytest.mark.parametrize("backend", ["cpu", "chunked"])
@pytest.mark.parametrize("where", ["first tile", "last tile", "one key"])
def test_tiled_nan_rows_match_reference_forward_and_backward(where: str, backend: str) -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 300, 8, generator=g, dtype=torch.float64) for _ in range(3))
    keys = {"first tile": slice(0, 256), "last tile": slice(256, 300), "one key": slice(7, 8)}
    k[0, 0, keys[where]] = float("nan")
    q[0, 1, 40] = float("inf")
    window = masks.sliding_window(20)  # rows far from the NaN keys stay finite
    results = {}
    for name in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = qkv.attention(*leaves, mask=window, backend=name)
        (dv,) = torch.autograd.grad(out.sum(), leaves[2])
        results[name] = (out.detach(), dv)
    out, dv = results[backend]
    ref_out, ref_dv = results["reference"]
    assert torch.equal(out.isnan(), ref_out.isnan())
    assert out.isnan().any() and (~out.isnan()).any()
    finite = ~ref_out.isnan()
    torch.testing.assert_close(out[finite], ref_out[finite])
    # dV: NaN exactly at the keys a NaN row attends; elsewhere the reference's gradient.
    i, j = torch.arange(300)[:, None], torch.arange(300)[None, :]
    attended = (j <= i) & (i - j <= 20)  # (Nq, Nk)
    nan_rows = ref_out.isnan().any(-1)  # (B, H, Nq)
    reached = (nan_rows[..., None] & attended[None, None]).any(-2)  # (B, H, Nk)
    assert torch.equal(dv.isnan().any(-1), reached)
    assert torch.equal(ref_dv.isnan().any(-1), reached)
    torch.testing.assert_close(dv[~reached], ref_dv[~reached])


def test_masked_out_nan_never_matters_on_the_cpu_kernel() -> None:
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 1, 300, 8, generator=g) for _ in range(3))
    k[0, 0, 260:] = float("nan")  # hidden by the padding, in a partly masked tile
    out = qkv.attention(q, k, v, mask=masks.key_padding([260]), backend="cpu")
    expected = qkv.attention(q, k, v, mask=masks.key_padding([260]), backend="reference")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_query_without_mask_makes_its_row_nan(backend: str) -> None:
    # PyTorch's CPU SDPA zero-fills a row whose scores are all NaN; qkv's rule makes it NaN.
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 6, 8, generator=g) for _ in range(3))
    q[0, 0, 1] = float("nan")
    out = qkv.attention(q, k, v, backend=backend)
    assert torch.isnan(out[0, 0, 1]).all()
    assert torch.isfinite(out[0, 0, [0, 2, 3, 4, 5]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_key_under_is_causal_reaches_exactly_the_rows_that_attend_it(
    backend: str, dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g).to(dtype) for _ in range(3))
    k[0, 0, 0] = float("nan")  # row 0 attends only key 0; every row attends it
    k[0, 1, 3] = float("inf")  # rows 3.. of head 1
    out = qkv.attention(q, k, v, causal=True, backend=backend)
    rows = out.isnan().any(-1)[0]  # (H, N)
    expected = torch.tensor([[True] * 6, [False] * 3 + [True] * 3])
    # inf * q can be -inf for a row (an attended -inf score is exp(-inf) = 0): that row stays
    # finite on every backend; the reference says which rows those are.
    ref = qkv.attention(q, k, v, causal=True, backend="reference").isnan().any(-1)[0]
    assert torch.equal(rows, ref)
    assert torch.equal(rows[0], expected[0]) and not rows[1, :3].any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("scale", [0.0, -0.5])
@pytest.mark.parametrize("causal", [True, "bottom_right"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_with_zero_or_negative_scale(
    backend: str, causal: object, scale: float, dtype: torch.dtype
) -> None:
    # PyTorch's CPU is_causal kernel gives NaN for N - 1 of N rows at scale 0.
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=g, dtype=torch.float64) for _ in range(3))
    expected = qkv.attention(q, k, v, causal=causal, scale=scale, backend="reference")
    out = qkv.attention(
        q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, scale=scale, backend=backend
    )
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_finite_check_is_one_reduction_and_sends_non_finite_calls_to_chunked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qkv.backends import sdpa

    calls: list[str] = []
    real = sdpa.chunked_attention
    monkeypatch.setattr(sdpa, "chunked_attention", lambda r: calls.append("chunked") or real(r))
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 1, 6, 8, generator=g) for _ in range(3))
    request = build_request(q, k, v, causal=True)
    SdpaBackend().forward(request)
    assert calls == []
    k[0, 0, 2] = float("-inf")
    SdpaBackend().forward(build_request(q, k, v, causal=True))
    assert calls == ["chunked"]
    # finite values whose float16 sum would overflow are summed in float32: still finite
    assert sdpa._finite(torch.full((1, 1, 8, 2), 6e4).half(), torch.zeros(1, 1, 1, 2).half())


@pytest.mark.parametrize(
    ("dtype", "base"),
    [(torch.float16, (250.0, 300.0)), (torch.bfloat16, (200.0, 215.0))],
    ids=["float16 logits 7.5e4", "bfloat16 logits 4.3e4"],
)
@pytest.mark.parametrize("backend", [*BACKENDS, "weights"])
def test_half_precision_logits_near_the_range_agree_on_every_backend(
    backend: str, dtype: torch.dtype, base: tuple[float, float]
) -> None:
    # Scaled logits 75,000 + 0.25 j (float16: past 65,504) or 43,000 + 0.25 j (bfloat16: its
    # spacing there is 256): every backend multiplies half inputs in float32, as fused kernels
    # do, so none gives inf - inf = NaN or rounds the logits to one value.
    N, D = 12, 8
    q = torch.zeros(1, 1, 3, D, dtype=torch.float64)
    q[..., 0], q[..., 1] = base[0], 1.0
    k = torch.zeros(1, 1, N, D, dtype=torch.float64)
    k[..., 0] = base[1]
    k[0, 0, :, 1] = 0.25 * torch.arange(N)
    v = torch.randn(1, 1, N, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
    expected, weights = qkv.attention(
        qh.double(), kh.double(), vh.double(), scale=1.0, return_weights=True, backend="reference"
    )
    if backend == "weights":
        got = qkv.attention_weights(qh, kh, vh, scale=1.0)
        torch.testing.assert_close(got.double(), weights, atol=1e-2, rtol=0)
        return
    out = qkv.attention(qh, kh, vh, scale=1.0, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=0)


def _trained_call(backend: str, threads: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(10)
    q = torch.randn(2, 4, 200, 16, generator=g).requires_grad_()
    k = torch.randn(2, 2, 200, 16, generator=g).requires_grad_()
    v = torch.randn(2, 2, 200, 16, generator=g).requires_grad_()
    bias = torch.randn(1, 4, 1, 200, generator=g).requires_grad_()
    grad_out = torch.randn(2, 4, 200, 16, generator=g)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = qkv.attention(q, k, v, bias=bias, causal=True, backend=backend)
        grads = torch.autograd.grad((out * grad_out).sum(), (q, k, v, bias))
    finally:
        torch.set_num_threads(previous)
    return [out.detach(), *grads]


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu", "auto"])
def test_deterministic_algorithms_give_the_same_bits_on_one_and_two_threads(backend: str) -> None:
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        if backend == "auto":
            q = torch.randn(1, 1, 8, 4, requires_grad=True)
            reason = SdpaBackend().supports(build_request(q, q, q))
            assert reason is not None and "use_deterministic_algorithms" in reason
        one, two = _trained_call(backend, 1), _trained_call(backend, 2)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_attention_weights_and_summary_follow_the_nan_rule() -> None:
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    q[0, 0, 1] = float("nan")  # row 1 of head 0 attends NaN scores
    k[0, :, 5] = float("nan")  # key 5 is masked out for every row
    mask = masks.key_padding([5])
    weights = qkv.attention_weights(q, k, v, mask=mask)
    expected = qkv.attention(q, k, v, mask=mask, return_weights=True, backend="reference")[1]
    assert torch.equal(weights.isnan(), expected.isnan())
    assert weights[0, 0, 1, :5].isnan().all() and weights[..., 5].eq(0).all()
    finite = ~expected.isnan()
    torch.testing.assert_close(weights[finite], expected[finite])
    summary = qkv.attention_summary(q, k, v, mask=mask)
    nan_rows = torch.zeros(1, 2, 6, dtype=torch.bool)
    nan_rows[0, 0, 1] = True
    assert torch.equal(summary.entropy.isnan(), nan_rows)


@pytest.mark.parametrize("backend", ["chunked", "cpu"])
def test_nan_row_reaches_weights_and_value_gradients(backend: str) -> None:
    # A NaN row's weights are NaN where it attends (0 where masked), as on the reference, and
    # its value gradient is NaN at the keys it attends (a zero gradient there was silent).
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 1, 40, 8, generator=g, dtype=torch.float64) for _ in range(3))
    k[0, 0, 20] = float("nan")  # rows 20..24 attend it, and four finite keys each
    mask = masks.sliding_window(4)
    i, j = torch.arange(40)[:, None], torch.arange(40)[None, :]
    attended = (j <= i) & (i - j <= 4)
    nan_rows = torch.zeros(40, 1, dtype=torch.bool)
    nan_rows[20:25] = True
    if backend == "chunked":
        weights = qkv.attention(q, k, v, mask=mask, return_weights=True, backend=backend)[1]
        ref = qkv.attention(q, k, v, mask=mask, return_weights=True, backend="reference")[1]
        for w in (weights, qkv.attention_weights(q, k, v, mask=mask), ref):
            # NaN where a NaN row attends, 0 where it does not
            assert torch.equal(w[0, 0].isnan(), nan_rows & attended)
            assert w[0, 0][~attended].eq(0).all()
    v = v.requires_grad_()
    out = qkv.attention(q, k, v, mask=mask, backend=backend)
    (dv,) = torch.autograd.grad(out.sum(), v)
    assert dv[0, 0, 16:25].isnan().all()
