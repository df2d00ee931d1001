"""``auto`` on a decoder's decoding steps: a few new queries against a long key/value cache, as
:class:`~qkv.models.pretrained.LlamaDecoder` calls attention (SmolLM2-135M's heads: Hq = 9,
Hkv = 3, D = 64, float32, ``causal="bottom_right"``).

No timings here (the suite runs with ``QKV_AUTO_MEASURE=0``): what auto picks from its cost
model (the expectations follow benchmarks/decode_step.py's measurements on one thread), that
the pick and the compiled kernel's decoding route serve the calls, and that they give the
float64 reference's output. ``benchmarks/decode_step.py`` measures the same calls.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import qkv
import qkv.nn.multihead as multihead
from gold import assert_within_control, dense_mask_of, naive_attention
from helpers import load_benchmark
from qkv.backends import cost, get_backend, select_backend
from qkv.backends.cpu.backend import DECODE_ROWS, CpuBackend
from qkv.functional.attention import memory_estimate
from qkv.models.pretrained import LlamaConfig, LlamaDecoder
from qkv.models.pretrained.llama import key_mask
from qkv.nn.kv_cache import KVCache
from qkv.request import AttentionRequest, build_request

HQ, HKV, D = 9, 3, 64


def decoder_call(
    B: int, Nq: int, L: int, *, contiguous: bool, margin: int = 256
) -> tuple[Tensor, Tensor, Tensor]:
    """q ``(B, 9, Nq, 64)`` as the projection makes it (a transposed view) and k, v ``(B, 3, L,
    64)``: views of the first L slots of ``(B, 3, L + margin, 64)`` cache buffers, or contiguous.
    Left uninitialised: the cost model reads shapes and strides only."""
    q = torch.empty(B, Nq, HQ * D).unflatten(-1, (HQ, D)).transpose(1, 2)  # (B, Hq, Nq, D)
    if contiguous:
        return q, torch.empty(B, HKV, L, D), torch.empty(B, HKV, L, D)
    k, v = (torch.empty(B, HKV, L + margin, D)[:, :, :L] for _ in range(2))  # (B, Hkv, L, D)
    return q, k, v


def takes_the_decoding_route(request: AttentionRequest) -> bool:
    """The kernel decodes a call of one query tile with at most DECODE_ROWS rows (kernel.cpp's
    attention_forward: ``status.size(0) == 1 && Nq <= kDecodeRows``)."""
    census = get_backend("cpu").census(request)  # type: ignore[attr-defined]
    return request.q_len <= min(DECODE_ROWS, census.tile_q)


@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize(
    "B, Nq, L",
    [(1, 1, 8192), (1, 4, 8192), (1, 16, 8192), (8, 1, 8192), (8, 4, 8192), (8, 16, 2048)],
)
def test_auto_takes_the_kernels_decoding_route_for_long_caches(
    B: int, Nq: int, L: int, contiguous: bool
) -> None:
    # K and V read once per group of 3 query heads (a cache's views in place), split over key
    # chunks, against SDPA's once per query head: the kernel, as measured (B = 8, L = 8192,
    # Nq = 1, one thread: 10.5 ms against SDPA's 15.4)
    q, k, v = decoder_call(B, Nq, L, contiguous=contiguous)
    request = build_request(q, k, v, causal="bottom_right")
    selection = select_backend(request)
    assert selection.backend.name == "cpu", selection.costs
    assert get_backend("cpu").supports(request) is None
    assert takes_the_decoding_route(request)


@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize("L", [512, 2048])
@pytest.mark.parametrize("Nq", [1, 4])
def test_auto_keeps_short_caches_of_one_sequence_on_sdpa(Nq: int, L: int, contiguous: bool) -> None:
    # a few megabytes of K/V: the kernel's fixed costs outweigh what it saves on reading them
    q, k, v = decoder_call(1, Nq, L, contiguous=contiguous)
    request = build_request(q, k, v, causal="bottom_right")
    assert select_backend(request).backend.name == "sdpa"
    assert takes_the_decoding_route(request)  # the kernel could serve it, on its decoding route


def test_the_kernels_estimate_counts_the_copies_it_makes(monkeypatch: pytest.MonkeyPatch) -> None:
    rates = cost.device_rates(torch.device("cpu"))
    kernel = CpuBackend()
    q, k, v = decoder_call(2, 1, 1000, contiguous=False)
    views = build_request(q, k, v, causal="bottom_right")
    kv_bytes = 2 * k.numel() * 4
    # decoding reads a cache's views in place (dense rows per head); the tiled routes copy them
    assert cost.copy_seconds(views, torch.float32, rates, decoding=True) == 0.0
    assert cost.copy_seconds(views, torch.float32, rates, decoding=False) == pytest.approx(
        2 * kv_bytes / rates.memory_bytes_per_second  # q (one row per head) is contiguous
    )
    q, k, v = decoder_call(2, 1, 1000, contiguous=True)
    contiguous = build_request(q, k, v, causal="bottom_right")
    assert cost.cpu_seconds(kernel, views) == cost.cpu_seconds(kernel, contiguous)
    # K and V of (B, N, H, D) storage have no dense rows per head: copied even when decoding
    k_t, v_t = (torch.empty(2, 1000, HKV, D).transpose(1, 2) for _ in range(2))
    strided = build_request(q, k_t, v_t, causal="bottom_right")
    extra = cost.cpu_seconds(kernel, strided) - cost.cpu_seconds(kernel, contiguous)
    assert extra == pytest.approx(2 * kv_bytes / rates.memory_bytes_per_second)
    # bfloat16 inputs computed in float32 are converted (copied); read as they are on its GEMMs
    halves = build_request(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal="bottom_right")
    assert cost.copy_seconds(halves, torch.bfloat16, rates, decoding=True) == 0.0
    assert cost.copy_seconds(halves, torch.float32, rates, decoding=True) > 0.0
    # a copy over FRESH_COPY_BYTES lands in freshly mapped pages and pays for them too
    monkeypatch.setattr(cost, "FRESH_COPY_BYTES", kv_bytes // 4)
    fresh = cost.cpu_seconds(kernel, strided) - cost.cpu_seconds(kernel, contiguous)
    assert fresh == pytest.approx(extra + kv_bytes / cost.FRESH_PAGE_BYTES_PER_SECOND)


@pytest.mark.parametrize("backend", ["auto", "cpu", "sdpa"])
@pytest.mark.parametrize("Nq", [1, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_decoding_on_cache_views_matches_float64(backend: str, Nq: int, padded: bool) -> None:
    g = torch.Generator().manual_seed(7 + Nq)
    B, L = 2, 301
    cache = KVCache(B, HKV, L + 40, D, dtype=torch.float64)
    k, v = cache.update(
        torch.randn(B, HKV, L, D, generator=g, dtype=torch.float64),
        torch.randn(B, HKV, L, D, generator=g, dtype=torch.float64),
    )  # (B, Hkv, L, D) views
    q = torch.randn(B, Nq, HQ * D, generator=g, dtype=torch.float64).unflatten(-1, (HQ, D))
    q = q.transpose(1, 2)  # (B, Hq, Nq, D)
    kwargs: dict[str, object] = {"causal": "bottom_right"}
    if padded:  # row 1 left-padded by 37 tokens
        kwargs["mask"] = (torch.arange(L) >= torch.tensor([[0], [37]]))[:, None, None, :]
    gold = qkv.attention(q, k, v, backend="reference", **kwargs)  # type: ignore[arg-type]
    q32 = q.float()  # (B, Hq, Nq, D)
    k32, v32 = KVCache(B, HKV, L + 40, D).update(k.float(), v.float())  # views again
    out = qkv.attention(q32, k32, v32, backend=backend, **kwargs)  # type: ignore[arg-type]
    full = dense_mask_of(q32, k32, **kwargs)
    control = naive_attention(q32, k32, v32, full, None, q32.shape[-1] ** -0.5)
    assert_within_control(backend, out, gold, control, torch.float32)


def test_a_decoder_hands_every_layer_one_key_mask_and_none_without_padding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
        intermediate_size=48, max_positions=64,
    )  # fmt: skip
    model = LlamaDecoder(config).eval()
    seen: list[object] = []
    original = multihead.attention

    def spy(*args: object, **kwargs: object) -> Tensor:
        seen.append(kwargs.get("mask"))
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(multihead, "attention", spy)
    ids = torch.randint(3, 50, (2, 6))
    with torch.no_grad():
        model(ids, torch.ones(2, 6, dtype=torch.bool))
        assert seen == [None] * 3  # all real: no mask, the calls stay plain
        seen.clear()
        mask = torch.ones(2, 6, dtype=torch.bool)
        mask[1, :2] = False  # row 1 left-padded
        model(ids, mask)
    assert len(seen) == 3 and all(m is seen[0] for m in seen)  # one object: auto's memo serves
    first = seen[0]
    assert isinstance(first, Tensor) and torch.equal(first, mask[:, None, None, :])
    assert key_mask(None) is None


def test_the_decode_step_benchmark_prints_each_backend_and_autos_pick(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_benchmark("decode_step")
    argv = ["decode_step.py", "--batch", "2", "--queries", "1", "--contexts", "40", "--rounds"]
    argv += [
        "1",
        "--rotate-mib",
        "0.1",
        "--read-mib",
        "1",
        "--backends",
        "sdpa",
        "cpu",
        "--masks",
        "causal",
        "fresh",
    ]
    monkeypatch.setattr("sys.argv", argv)
    threads = torch.get_num_threads()
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert "interleaved rounds" in lines[0] and lines[1].split()[4:7] == ["sdpa", "cpu", "auto"]
    assert lines[-1].startswith("load average at the start")
    for line, kind in zip(lines[2:-1], ("causal", "fresh"), strict=True):
        cells = line.split()
        assert cells[:4] == [kind, "2", "1", "40"] and cells[7] in ("sdpa", "cpu")
        assert float(cells[8]) >= 1.0 and cells[10] in ("sdpa", "cpu") and float(cells[-1]) > 0


@pytest.mark.parametrize(
    ("causal", "Nq", "Nk", "hides"),
    [
        ("bottom_right", 1, 37, False),  # a decoding step sees the whole cache
        ("top_left", 5, 1, False),  # every query sees the one key
        ("bottom_right", 2, 37, True),
        ("top_left", 1, 2, True),
    ],
)
@pytest.mark.parametrize("scale", [None, -0.5, 0.0])
def test_a_causal_flag_that_hides_no_key_is_dropped_and_every_backend_agrees(
    causal: str, Nq: int, Nk: int, hides: bool, scale: float | None
) -> None:
    # the request keeps causal only where it hides a key, so a decoding step runs unmasked
    # everywhere (SDPA's is_causal would be top-left, and cannot take scale <= 0)
    from qkv.backends.sdpa import _sdpa_mask

    g = torch.Generator().manual_seed(23 + Nq + Nk)
    q = torch.randn(2, 6, Nq, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 3, Nk, 16, generator=g, dtype=torch.float64) for _ in range(2))
    request = build_request(q, k, v, causal=causal, scale=scale)
    assert (request.causal is not None) == hides
    if not hides:
        assert request.whole_mask is None and _sdpa_mask(request) == (None, False)
    offset = 0 if causal == "top_left" else Nk - Nq
    keep = torch.arange(Nk)[None, :] <= torch.arange(Nq)[:, None] + offset  # (Nq, Nk)
    scores = (
        q @ k.repeat_interleave(2, dim=1).transpose(-2, -1) * (16**-0.5 if scale is None else scale)
    )
    want = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v.repeat_interleave(2, dim=1)
    for backend in ("reference", "sdpa", "cpu", "chunked"):
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            got = qkv.attention(
                *(t.to(dtype) for t in (q, k, v)), causal=causal, scale=scale, backend=backend
            )
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol, msg=backend)


@pytest.mark.parametrize(
    "Hq, Hkv, Nq, D, Dv",
    [
        (8, 2, 1, 128, 128),  # 4 stacked rows: one row block
        (6, 2, 1, 64, 32),  # 3 rows: the remainder block alone
        (8, 2, 8, 32, 64),  # 32 rows (8 queries x 4 heads), causal within them
        (8, 2, 5, 128, 64),  # 20 rows: two row vectors, the second partial
        (16, 2, 7, 64, 64),  # 56 rows: four row vectors
        (2, 1, 3, 256, 256),  # 3 rows, the widest head
    ],
)
def test_bfloat16_decoding_matches_float64(Hq: int, Hkv: int, Nq: int, D: int, Dv: int) -> None:
    # the decoding route's bfloat16 loops (AVX512-BF16 dot products where the CPU has them):
    # 301 keys leave an odd last tile and blocks that are not multiples of 16; batch 1 is
    # left-padded, so its first tile has masked keys; one query row is NaN and only it is
    g = torch.Generator().manual_seed(D + Nq)
    B, L = 2, 301
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=torch.float64).bfloat16()
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64).bfloat16()
    v = torch.randn(B, Hkv, L, Dv, generator=g, dtype=torch.float64).bfloat16()
    q[1, Hq - 1, Nq - 1, 0] = float("nan")
    pad = (torch.arange(L) >= torch.tensor([[0], [37]]))[:, None, None, :]  # (B, 1, 1, L)
    kwargs: dict[str, object] = {"causal": "bottom_right", "mask": pad}
    request = build_request(q, k, v, **kwargs)  # type: ignore[arg-type]
    assert takes_the_decoding_route(request)
    out = qkv.attention(q, k, v, backend="cpu", **kwargs)  # type: ignore[arg-type]
    assert out[1, Hq - 1, Nq - 1].isnan().all() and out.isnan().sum() == Dv
    out[1, Hq - 1, Nq - 1] = 0
    q[1, Hq - 1, Nq - 1] = 0
    gold = qkv.attention(q.double(), k.double(), v.double(), backend="reference", **kwargs)  # type: ignore[arg-type]
    control = naive_attention(q, k, v, dense_mask_of(q, k, **kwargs), None, D**-0.5)
    gold[1, Hq - 1, Nq - 1] = control[1, Hq - 1, Nq - 1] = 0
    assert_within_control("cpu", out, gold, control, torch.bfloat16)


def test_a_half_precision_decoding_call_is_explained_as_decoded_without_copies() -> None:
    q = torch.randn(1, 8, 1, 64).bfloat16()  # (B, Hq, 1, D)
    k, v = (torch.randn(1, 2, 4096, 64).bfloat16() for _ in range(2))  # (B, Hkv, Nk, D)
    text = str(qkv.explain(q, k, v, backend="cpu", causal="bottom_right"))
    assert "computes: decoding:" in text, text
    # K and V are read as they are: no float32 copies counted (those alone would be 2x kv)
    kv_bytes = 2 * k.numel() * k.element_size()
    assert memory_estimate(get_backend("cpu"), build_request(q, k, v)) < kv_bytes / 2
    # the same call with a long query block runs on the tiled route, which converts them
    q_long = torch.randn(1, 8, 512, 64).bfloat16()
    assert memory_estimate(get_backend("cpu"), build_request(q_long, k, v)) > kv_bytes
