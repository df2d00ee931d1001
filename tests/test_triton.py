"""The triton backend against the float64 reference, output and gradients.

Without a GPU the kernels run in triton's interpreter (``TRITON_INTERPRET=1``, set below before
triton is imported) on small CPU tensors, in float32 and float16: the interpreter computes
bfloat16 wrongly (its loads reinterpret the bits), so bfloat16 is only checked on CUDA. On a
CUDA machine the ``gpu`` tests run the full matrix (both half types, every mask kind, head dims
16..256) and the interpreter tests are skipped. Errors must stay within ``tests/gold.py``'s
bound: a small multiple of a plain same-dtype implementation's error.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import qkv  # noqa: E402
from gold import assert_within_control, naive_attention, random_inputs  # noqa: E402
from helpers import bias_grad, cast_bias, make_bias, make_mask  # noqa: E402
from qkv import masks, scores  # noqa: E402
from qkv.backends.block_mask import build_block_mask  # noqa: E402
from qkv.backends.triton import TritonBackend  # noqa: E402
from qkv.backends.triton.launch import triton_attention  # noqa: E402
from qkv.backends.triton.tuning import KernelConfig  # noqa: E402
from qkv.request import build_request  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
interpreter = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (CPU run)")
needs_gpu = pytest.mark.skipif(
    not CUDA or INTERPRET, reason="needs a CUDA device (compiled kernels)"
)
DEVICE = "cuda" if CUDA and not INTERPRET else "cpu"


def triton_mask(kind: str, B: int, Hq: int, Nq: int, Nk: int, seed: int) -> object:
    """This suite's masks, sized to the sequence (a window of an eighth, a fifth as prefix)."""
    if kind == "dense_empty_rows":  # a bool tensor with some rows that see nothing
        return make_mask(
            "dense", B, Nq, Nk, seed + 1, heads=Hq, dense_p=0.6, empty_every=4, device=DEVICE
        )
    return make_mask(
        kind, B, Nq, Nk, seed + 1, window=max(3, Nk // 8), documents=4, prefix=max(1, Nk // 5)
    )


def triton_bias(kind: str, Hq: int, Nq: int, Nk: int, seed: int, dtype: torch.dtype) -> object:
    """This suite's biases, on :data:`DEVICE` (a tensor in ``dtype``, requiring grad)."""
    bias = make_bias(kind, Hq, Nq, Nk, seed + 2, max_distance=8)
    if isinstance(bias, Tensor):  # broadcast over the batch: its gradient is summed over it
        return bias.to(DEVICE, dtype).requires_grad_(True)
    return bias.to(DEVICE) if isinstance(bias, torch.nn.Module) else bias


def per_run(bias: object, dtype: torch.dtype) -> object:
    return cast_bias(bias, dtype, tables_in_float64=False)


def check(
    dtype: torch.dtype,
    shape: tuple[int, int, int, int, int, int, int],
    *,
    mask: str = "none",
    bias: str = "none",
    causal: object = False,
    seed: int = 0,
    non_contiguous: bool = False,
) -> tuple[list[Tensor | None], Tensor]:
    """Run one case through the triton launcher, the float64 reference and the plain same-dtype
    control; assert the bound on out, dq, dk, dv (and the bias gradient). Returns the triton
    results and the dense mask."""
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    x = random_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, seed=seed, non_contiguous=non_contiguous)
    x.q, x.k, x.v = (t.to(DEVICE) for t in (x.q, x.k, x.v))
    mask_value = triton_mask(mask, B, Hq, Nq, Nk, seed)
    bias0 = triton_bias(bias, Hq, Nq, Nk, seed, torch.float64)
    options = {"mask": mask_value, "causal": causal}
    grad_out = torch.randn(B, Hq, Nq, Dv, generator=torch.Generator().manual_seed(seed))
    grad_out = grad_out.to(DEVICE, torch.float64)
    whole = build_request(x.q, x.k, x.k, **options)  # type: ignore[arg-type]
    tile = whole.mask_tile(whole.full_q, whole.full_kv)
    dense = torch.ones(B, Hq, Nq, Nk, dtype=torch.bool, device=DEVICE)
    dense = dense if tile is None else dense & tile

    def results(out: Tensor, y: object, b: object) -> list[Tensor | None]:
        out.backward(grad_out.to(out.dtype))
        return [out.detach(), y.q.grad, y.k.grad, y.v.grad, bias_grad(b)]  # type: ignore[attr-defined]

    y, b = x.to(dtype), per_run(bias0, dtype)
    got = results(triton_attention(build_request(y.q, y.k, y.v, bias=b, **options)), y, b)  # type: ignore[arg-type]
    y64, b64 = x.to(torch.float64), per_run(bias0, torch.float64)
    gold = qkv.attention(y64.q, y64.k, y64.v, bias=b64, backend="reference", **options)  # type: ignore[arg-type]
    want = results(gold, y64, b64)
    yc, bc = x.to(dtype), per_run(bias0, dtype)
    req = build_request(yc.q, yc.k, yc.v, bias=bc)  # type: ignore[arg-type]
    modify = None if bc is None else (lambda s: req.modify_scores(s, req.full_q, req.full_kv))
    ctrl = results(naive_attention(yc.q, yc.k, yc.v, dense, modify, req.scale), yc, bc)
    for name, g_, w, c in zip(("out", "dq", "dk", "dv", "dbias"), got, want, ctrl, strict=True):
        if w is None:
            continue
        assert g_ is not None, f"{name}: no gradient"
        assert g_.shape == w.shape, f"{name}: shape {tuple(g_.shape)} != {tuple(w.shape)}"
        assert_within_control(name, g_, w, c, dtype)
    return got, dense


# --- CPU, interpreter ----------------------------------------------------------------------------

# (B, Hq, Hkv, Nq, Nk, D, Dv): ragged lengths (not multiples of the 32-wide interpreter tiles),
# Nq != Nk both ways, GQA and MQA, head dims that are not powers of two, Dv != D.
SMALL = (2, 4, 2, 45, 70, 32, 32)
CPU_CASES = [
    (torch.float32, SMALL, "none", "none", False),
    (torch.float16, SMALL, "none", "none", False),
    (torch.float16, (1, 4, 1, 70, 45, 16, 24), "none", "none", "top_left"),
    (torch.float16, SMALL, "none", "none", "bottom_right"),
    (torch.float32, (1, 2, 2, 70, 45, 32, 32), "none", "none", "bottom_right"),
    (torch.float16, SMALL, "sliding_window", "none", "top_left"),
    (torch.float16, SMALL, "document", "none", False),
    (torch.float32, SMALL, "key_padding", "none", False),
    (torch.float16, (1, 2, 1, 40, 40, 24, 24), "prefix_lm", "none", False),
    (torch.float32, SMALL, "none", "tensor", False),
    (torch.float16, SMALL, "none", "alibi", "top_left"),
    (torch.float32, (1, 2, 2, 40, 50, 16, 16), "none", "relative", False),
    (torch.float16, SMALL, "none", "softcap", False),
    (torch.float32, (1, 2, 1, 36, 40, 80, 48), "sliding_window", "softcap", "bottom_right"),
]


@interpreter
@pytest.mark.parametrize(
    ("dtype", "shape", "mask", "bias", "causal"),
    CPU_CASES,
    ids=lambda v: (
        str(v).removeprefix("torch.") if not isinstance(v, tuple) else "x".join(map(str, v))
    ),
)
def test_interpreter_matches_float64_reference(
    dtype: torch.dtype, shape: tuple[int, ...], mask: str, bias: str, causal: object
) -> None:
    check(
        dtype,
        shape,
        mask=mask,
        bias=bias,
        causal=causal,
        seed=CPU_CASES.index((dtype, shape, mask, bias, causal)),
    )  # type: ignore[arg-type]


@interpreter
def test_non_contiguous_inputs() -> None:
    check(torch.float16, (2, 2, 1, 33, 40, 16, 16), causal="top_left", non_contiguous=True, seed=7)


@interpreter
def test_fully_masked_rows_are_zero_with_zero_gradients() -> None:
    got, dense = check(torch.float16, (1, 2, 1, 40, 36, 16, 16), mask="dense_empty_rows", seed=5)
    empty = ~dense.any(-1)  # (B, Hq, Nq)
    assert empty.any()
    out, dq = got[0], got[1]
    assert dq is not None
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.equal(dq[empty], torch.zeros_like(dq[empty]))


def _dropout_case(dtype: torch.dtype, seed: int) -> None:
    """Dropout: the kept weights are read off an identity V (out = P * Z / (1 - p)); a second call
    with the same seed and random V must equal the float64 formula with that keep-mask, output
    and gradients."""
    B, H, Nq, Nk, p = 1, 2, 24, 32, 0.3
    x = random_inputs(B, H, H, Nq, Nk, 32, seed=seed)
    q, k = (t.to(DEVICE) for t in (x.q, x.k))
    eye = torch.eye(Nk, dtype=torch.float64, device=DEVICE).expand(B, H, Nk, Nk)
    revealed = triton_attention(
        build_request(q.to(dtype), k.to(dtype), eye.to(dtype), dropout_p=p), dropout_seed=seed
    ).double()  # (B, H, Nq, Nk) = P * Z / (1 - p)
    keep = revealed != 0
    assert 0.5 < keep.float().mean().item() < 0.9  # about 1 - p of the weights are kept
    v = x.v.to(DEVICE)
    grad_out = torch.randn(B, H, Nq, 32, dtype=torch.float64, device=DEVICE)
    y = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = triton_attention(build_request(*y, dropout_p=p), dropout_seed=seed)
    out.backward(grad_out.to(dtype))
    z = [t.detach().requires_grad_(True) for t in (q, k, v)]
    probs = torch.softmax(z[0] @ z[1].transpose(-2, -1) / 32**0.5, dim=-1)
    want = (probs * keep / (1 - p)) @ z[2]
    want.backward(grad_out)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip([out, *(t.grad for t in y)], [want, *(t.grad for t in z)], strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(a.double(), b.detach(), rtol=tol, atol=tol)


@interpreter
def test_dropout_matches_formula_with_its_keep_mask() -> None:
    _dropout_case(torch.float32, seed=3)


@interpreter
def test_block_mask_reused_across_calls() -> None:
    # A block mask built at other tile sizes is summarised again at the kernel's, once.
    N = 64
    bm = build_block_mask(
        masks.sliding_window(9), q_len=N, kv_len=N, causal=True, tile_q=16, tile_kv=16
    )
    x = random_inputs(1, 2, 2, N, N, 16, seed=9).to(torch.float32, requires_grad=False)
    first = triton_attention(build_request(x.q, x.k, x.v, mask=bm))
    second = triton_attention(build_request(x.q, x.k, x.v, mask=bm))
    want = qkv.attention(
        x.q, x.k, x.v, mask=masks.sliding_window(9), causal=True, backend="reference"
    )
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(first, second)


def _decode_case(dtype: torch.dtype, Nq: int, causal: object, bias: object, Nk: int) -> None:
    x = random_inputs(2, 8, 2, Nq, Nk, 32, seed=Nq).to(dtype, requires_grad=False)
    q, k, v = (t.to(DEVICE) for t in (x.q, x.k, x.v))
    with torch.no_grad():
        got = triton_attention(build_request(q, k, v, causal=causal, bias=bias), decode=True)  # type: ignore[arg-type]
        want = qkv.attention(
            q.double(), k.double(), v.double(), causal=causal, bias=bias, backend="reference"
        )  # type: ignore[arg-type]
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@interpreter
@pytest.mark.parametrize(
    ("Nq", "causal", "bias"),
    [(1, False, None), (3, "bottom_right", None), (2, "bottom_right", scores.softcap(3.0))],
    ids=["one-token", "three-tokens-causal", "softcap"],
)
def test_decoding_kernel(Nq: int, causal: object, bias: object) -> None:
    _decode_case(torch.float32, Nq, causal, bias, Nk=300)


def test_backend_reasons_off_cuda_and_for_unsupported_options() -> None:
    backend = TritonBackend()
    x = random_inputs(1, 2, 2, 4, 4, 16).to(torch.float16, requires_grad=False)
    reason = backend.supports(build_request(x.q, x.k, x.v))
    assert reason is not None and "CUDA" in reason
    backend._allow_cpu = True
    assert backend.supports(build_request(x.q, x.k, x.v)) is None
    assert "return_weights" in str(
        backend.supports(build_request(x.q, x.k, x.v, return_weights=True))
    )
    odd = scores.ScoreMod(lambda s, b, h, q, kv: s * 2, "double")
    assert "neither additive" in str(backend.supports(build_request(x.q, x.k, x.v, bias=odd)))
    y = x.to(torch.float32, requires_grad=False)
    assert "float32" in str(backend.supports(build_request(y.q, y.k, y.v)))


def test_backend_refuses_launch_grids_and_offsets_the_kernels_cannot_take() -> None:
    backend = TritonBackend()
    backend._allow_cpu = True
    # B * Hq programs on the grid's second axis: at most 65535 (K/V broadcast, no memory).
    q = torch.zeros(1, 1, 1, 16, dtype=torch.float16)
    for B, served in ((65535, True), (65536, False)):
        qq = q.expand(B, 1, 1, 16)
        reason = backend.supports(build_request(qq, qq, qq))
        assert (reason is None) == served, reason
        if not served:
            assert "B * Hq = 65536 * 1" in str(reason) and "65535" in str(reason)
    # An additive score function materialised as an (Hq, Nq, Nk) bias past 32-bit offsets.
    for n, served in ((8000, True), (8200, False)):
        x = torch.zeros(1, 32, n, 16, dtype=torch.float16)
        reason = backend.supports(build_request(x, x[:, :1], x[:, :1], bias=scores.alibi(32)))
        assert (reason is None) == served, reason
        if not served:
            assert f"a bias of {32 * n * n} elements" in str(reason)


@interpreter
def test_auto_dispatches_to_the_triton_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    # The registered backend, allowed CPU tensors, is what auto runs for a half-precision call
    # (on CUDA it serves them without being asked).
    from qkv.backends import get_backend
    from qkv.backends.triton import launch

    monkeypatch.setattr(get_backend("triton"), "_allow_cpu", True)
    ran: list[bool] = []
    original = launch.triton_attention

    def spy(request: object) -> Tensor:
        ran.append(True)
        return original(request)  # type: ignore[arg-type]

    monkeypatch.setattr(launch, "triton_attention", spy)
    x = random_inputs(1, 4, 2, 40, 40, 32, seed=21).to(torch.float16, requires_grad=False)
    window = masks.sliding_window(7)
    assert qkv.explain(x.q, x.k, x.v, mask=window, causal=True).chosen == "triton"
    got = qkv.attention(x.q, x.k, x.v, mask=window, causal=True)
    want = qkv.attention(
        x.q.double(), x.k.double(), x.v.double(), mask=window, causal=True, backend="reference"
    )
    assert ran == [True]
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)


def test_softcap_lookalike_is_not_taken_for_softcap() -> None:
    fake = scores.ScoreMod(lambda s, b, h, q, kv: torch.tanh(s), "softcap(5.0)")
    backend = TritonBackend()
    backend._allow_cpu = True
    x = random_inputs(1, 1, 1, 4, 4, 16).to(torch.float16, requires_grad=False)
    assert backend.supports(build_request(x.q, x.k, x.v, bias=fake)) is not None
    assert backend.supports(build_request(x.q, x.k, x.v, bias=scores.softcap(5.0))) is None


def test_kernel_config_validation() -> None:
    with pytest.raises(ValueError, match="block_m"):
        KernelConfig(48, 64)
    with pytest.raises(ValueError, match="num_warps"):
        KernelConfig(64, 64, num_warps=3)


# --- CUDA ----------------------------------------------------------------------------------------

GPU_SHAPES = [
    (2, 8, 2, 300, 300, 64, 64),
    (1, 4, 4, 257, 513, 128, 128),
    (2, 4, 1, 513, 200, 64, 64),
]
GPU_MASKS = ["none", "sliding_window", "document", "key_padding", "prefix_lm", "dense_empty_rows"]
GPU_CASES = [
    (dtype, causal, mask)
    for dtype in (torch.float16, torch.bfloat16)
    for causal in (False, "top_left", "bottom_right")
    for mask in GPU_MASKS
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(("dtype", "causal", "mask"), GPU_CASES, ids=str)
def test_gpu_masks(dtype: torch.dtype, causal: object, mask: str) -> None:
    i = GPU_CASES.index((dtype, causal, mask))
    check(dtype, GPU_SHAPES[i % len(GPU_SHAPES)], mask=mask, causal=causal, seed=i)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", ["tensor", "alibi", "softcap", "relative"])
def test_gpu_biases(dtype: torch.dtype, bias: str) -> None:
    check(
        dtype,
        (2, 4, 2, 200, 333, 64, 64),
        bias=bias,
        causal="bottom_right",
        mask="sliding_window",
        seed=3,
    )


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("head_dim", [16, 32, 80, 96, 128, 192, 256])
def test_gpu_head_dims(head_dim: int) -> None:
    check(torch.bfloat16, (1, 4, 2, 300, 260, head_dim, head_dim), causal="top_left", seed=head_dim)


@pytest.mark.gpu
@needs_gpu
def test_gpu_non_contiguous_and_dv() -> None:
    check(
        torch.float16, (2, 6, 3, 190, 260, 64, 32), causal="top_left", non_contiguous=True, seed=4
    )


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_dropout(dtype: torch.dtype) -> None:
    _dropout_case(dtype, seed=11)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("Nq", "causal"), [(1, False), (4, "bottom_right")])
def test_gpu_decoding(dtype: torch.dtype, Nq: int, causal: object) -> None:
    _decode_case(dtype, Nq, causal, None, Nk=5000)


@pytest.mark.gpu
@needs_gpu
def test_gpu_auto_picks_triton() -> None:
    q = torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16)
    assert qkv.explain(q, q, q, causal=True).chosen == "triton"
    want = qkv.attention(q.double(), q.double(), q.double(), causal=True, backend="reference")
    torch.testing.assert_close(
        qkv.attention(q, q, q, causal=True).double(), want, rtol=2e-2, atol=2e-2
    )


@interpreter
@pytest.mark.slow
def test_multihead_kv_cache_decodes_through_the_triton_backend() -> None:
    # The KV-cache path of MultiHeadAttention needs no hook of its own: a cached step is a call
    # with a few queries, causal="bottom_right" and no grad, which the backend sends to the
    # split-KV kernel. Registered here under another name, with CPU tensors allowed.
    from qkv.backends import register_backend, unregister_backend
    from qkv.backends.triton import launch
    from qkv.nn import MultiHeadAttention

    backend = TritonBackend()
    backend._allow_cpu = True
    backend.name = "triton_interpreted"
    register_backend(backend)
    decoded: list[bool] = []
    original = launch._decode

    def spy(request: object, softcap: object) -> Tensor:
        decoded.append(True)
        return original(request, softcap)  # type: ignore[arg-type]

    launch._decode = spy  # type: ignore[assignment]
    try:
        torch.manual_seed(0)
        mha = MultiHeadAttention(64, num_heads=4, num_kv_heads=2, backend=backend.name).half()
        x = torch.randn(1, 260, 64).half()
        cache = mha.make_kv_cache(batch_size=1, max_len=260)
        with torch.no_grad():
            mha(x[:, :258], causal=True, kv_cache=cache)  # prefill: the flash kernels
            steps = [mha(x[:, t : t + 1], causal=True, kv_cache=cache)[0] for t in (258, 259)]
            mha.backend = "reference"
            full, _ = mha(x, causal=True)  # the whole sequence at once, reference backend
    finally:
        launch._decode = original  # type: ignore[assignment]
        unregister_backend(backend.name)
    assert len(decoded) == 2
    for t, step in zip((258, 259), steps, strict=True):
        torch.testing.assert_close(step.float(), full[:, t : t + 1].float(), rtol=2e-2, atol=2e-2)


@interpreter
def test_forced_decoding_refuses_what_it_cannot_compute() -> None:
    x = random_inputs(1, 4, 2, 2, 40, 16).to(torch.float32, requires_grad=False)
    request = build_request(x.q, x.k, x.v, bias=scores.alibi(4))
    with pytest.raises(ValueError, match="decoding kernel cannot serve"):
        triton_attention(request, decode=True)
