"""The backend registry, `auto` selection and `explain`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import Tensor

import qkv
from qkv import backends, masks, scores
from qkv.request import AttentionRequest


def inputs() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, 2, 4, 8, generator=g),
        torch.randn(1, 2, 6, 8, generator=g),
        torch.randn(1, 2, 6, 8, generator=g),
    )


def test_auto_prefers_sdpa_and_falls_back_to_reference() -> None:
    q, k, v = inputs()
    assert qkv.explain(q, k, v).chosen == "sdpa"
    explanation = qkv.explain(q, k, v, return_weights=True)
    assert explanation.chosen == "reference"
    assert "SDPA does not return the attention probabilities" in str(explanation)
    assert "sdpa" in explanation.reasons and explanation.reasons["sdpa"] is not None


def test_explain_names_the_call() -> None:
    q, k, v = inputs()
    text = str(
        qkv.explain(
            q,
            k,
            v,
            causal="bottom_right",
            mask=qkv.masks.sliding_window(2),
            bias=scores.softcap(4.0),
        )
    )
    assert "q (1, 2, 4, 8)" in text and "causal=bottom_right" in text
    assert "sliding_window(left=2, right=0)" in text and "softcap(4.0)" in text


class DoubledReference:
    """A user backend: the reference output times two, to prove it ran."""

    name = "doubled"

    def __init__(self) -> None:
        self.calls = 0

    def supports(self, request: AttentionRequest) -> str | None:
        return None if request.causal is None else "this toy backend knows no causal masks"

    def forward(self, request: AttentionRequest) -> tuple[Tensor, Tensor | None]:
        self.calls += 1
        out, weights = backends.get_backend("reference").forward(request)
        return out * 2, weights


def test_user_backend_registration_named_and_auto() -> None:
    q, k, v = inputs()
    toy = DoubledReference()
    qkv.register_backend(toy)
    try:
        want = qkv.attention(q, k, v, backend="reference")
        torch.testing.assert_close(qkv.attention(q, k, v, backend="doubled"), want * 2)
        assert qkv.explain(q, k, v).chosen == "sdpa"  # not in auto unless asked
        qkv.register_backend(toy, auto_priority=0, replace=True)
        assert qkv.explain(q, k, v).chosen == "doubled"
        assert qkv.explain(q, k, v, causal=True).chosen == "sdpa"
        assert (
            qkv.explain(q, k, v, causal=True).reasons["doubled"]
            == "this toy backend knows no causal masks"
        )
        with pytest.raises(ValueError, match="already registered"):
            qkv.register_backend(toy)
        with pytest.raises(ValueError, match="this toy backend knows no causal masks"):
            qkv.attention(q, k, v, causal=True, backend="doubled")
        assert toy.calls == 1
    finally:
        backends.unregister_backend("doubled")
    assert "doubled" not in qkv.available_backends() and "doubled" not in backends.AUTO_ORDER


def test_register_rejects_non_backends() -> None:
    with pytest.raises(
        TypeError, match=r"backend must have name, supports\(\) and forward\(\); got object"
    ):
        qkv.register_backend(object())  # type: ignore[arg-type]


# --- the auto policy -------------------------------------------------------------------------


def chosen(B: int, H: int, N: int, D: int, **kwargs: object) -> qkv.Explanation:
    g = torch.Generator().manual_seed(N)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    return qkv.explain(q, k, v, **kwargs)  # type: ignore[arg-type]


def test_auto_keeps_small_training_calls_on_sdpa() -> None:
    # B=64, N=20, D=32 batches with padding: SDPA is the fastest there (benchmarks/small_calls.py)
    lengths = torch.randint(1, 21, (64,), generator=torch.Generator().manual_seed(1))
    padding = (torch.arange(20) < lengths[:, None])[:, None, None, :]
    for kwargs in (
        {},
        {"causal": True},
        {"mask": masks.key_padding(lengths)},
        {"mask": padding},
        {"mask": padding, "causal": True},
    ):
        explanation = chosen(64, 8, 20, 32, **kwargs)
        assert explanation.chosen == "sdpa", explanation
        assert "could serve, estimated" in str(explanation)


def test_auto_keeps_long_plain_calls_on_sdpa() -> None:
    for kwargs in ({}, {"causal": True}):
        assert chosen(1, 8, 4096, 64, **kwargs).chosen == "sdpa"


#: The tiled backends: the compiled CPU kernel where it is built and serves the call, else chunked.
TILED = ("cpu", "chunked")


def test_auto_takes_chunked_where_the_mask_skips_most_tiles() -> None:
    n = 8192
    ids = torch.arange(n) * 16 // n
    for mask in (masks.sliding_window(255), masks.document(ids)):
        explanation = chosen(1, 8, n, 64, mask=mask)
        assert explanation.chosen in TILED, explanation
        assert explanation.costs[explanation.chosen] * 5 < explanation.costs["sdpa"]


def test_auto_counts_the_tiles_a_mask_tensor_hides() -> None:
    # Padding given as a tensor: keys past 900 of 4096 hide most tiles, as its mask-function
    # form would (benchmarks/small_calls.py: chunked about 4x faster than SDPA there).
    keys = torch.arange(4096)
    short, long = (keys < 900)[None, None, None, :], (keys < 4000)[None, None, None, :]
    assert chosen(1, 8, 4096, 64, mask=short).chosen in TILED
    assert chosen(1, 8, 4096, 64, mask=masks.key_padding([900])).chosen in TILED
    # the kernel's price follows the tiles the tensor hides; SDPA's does not
    few, most = chosen(1, 8, 4096, 64, mask=short).costs, chosen(1, 8, 4096, 64, mask=long).costs
    assert few["cpu"] < 0.35 * most["cpu"]
    assert few["sdpa"] == pytest.approx(most["sdpa"], rel=0.01)


def test_auto_remembers_a_call_and_reprices_a_mask_edited_in_place() -> None:
    from qkv.backends.registry import select_backend
    from qkv.request import build_request

    keys = torch.arange(4096)
    mask = (keys < 900)[None, None, None, :].clone()
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 8, 4096, 64, generator=g) for _ in range(3))
    first = select_backend(build_request(q, k, v, mask=mask))
    again = select_backend(build_request(q.clone(), k, v, mask=mask))
    assert again is first and first.backend.name in TILED  # same signature: not priced again
    mask[..., :4000] = True  # the same tensor, now hiding almost nothing
    repriced = select_backend(build_request(q, k, v, mask=mask))
    assert repriced is not first and repriced.costs["cpu"] > 3 * first.costs["cpu"]
    window = masks.sliding_window(255)
    assert select_backend(build_request(q, k, v, mask=window)) is not first


def test_tile_states_of_a_mask_tensor_match_a_loop() -> None:
    from qkv.backends.block_mask import tile_bounds

    g = torch.Generator().manual_seed(3)
    nq, nk, tq, tk = 37, 53, 8, 16
    mask = torch.rand(2, 3, nq, nk, generator=g) > 0.97
    mask[:, :, :, 40:] = False  # whole key tiles hidden
    mask[:, :, :8, :16] = True  # one tile shown entirely
    for m in (mask, mask[:, :1, :1], mask[:1, :, :1]):
        got = masks.dense(m).classify(tile_bounds(nq, tq), tile_bounds(nk, tk))
        full = m.expand(2, 3, nq, nk)
        for i in range(got.shape[0]):
            for j in range(got.shape[1]):
                block = full[:, :, i * tq : (i + 1) * tq, j * tk : (j + 1) * tk]
                want = (
                    masks.EMPTY if not block.any() else masks.FULL if block.all() else masks.PARTIAL
                )
                assert int(got[i, j]) == want, (i, j)
        assert bool((got[:, -1] == masks.EMPTY).all())


def test_auto_takes_chunked_where_a_dense_mask_would_exceed_the_memory_limit() -> None:
    # A mask function without a tile classifier skips nothing, so on time alone SDPA wins; at
    # N=16384 its dense mask needs more than MEMORY_LIMIT_BYTES.
    def near(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (q - kv).abs() < 1000

    assert chosen(1, 8, 2048, 64, mask=near).chosen == "sdpa"
    explanation = chosen(1, 8, 16384, 64, mask=near)
    assert explanation.chosen == "chunked"
    assert "over auto's 1 GiB limit" in str(explanation)
    assert explanation.memory["sdpa"] is not None
    assert explanation.memory["sdpa"] > backends.MEMORY_LIMIT_BYTES


def test_auto_weights_small_on_reference_large_on_chunked() -> None:
    assert chosen(2, 4, 50, 16, return_weights=True).chosen == "reference"
    large = chosen(1, 8, 8192, 64, return_weights=True)
    assert large.chosen == "chunked"
    assert "reference: could serve, but needs" in str(large)


class CheapToy(DoubledReference):
    """A user backend with a cost estimate lower than every built-in one."""

    name = "cheap"

    def cost_estimate(self, request: AttentionRequest) -> float:
        return 0.0


def test_user_backend_with_a_cost_estimate_competes_on_it() -> None:
    q, k, v = inputs()
    toy = CheapToy()
    qkv.register_backend(toy, auto_priority=len(backends.AUTO_ORDER))  # last in line
    try:
        assert qkv.explain(q, k, v).chosen == "cheap"
        torch.testing.assert_close(
            qkv.attention(q, k, v), qkv.attention(q, k, v, backend="reference") * 2
        )
    finally:
        backends.unregister_backend("cheap")
    assert qkv.explain(q, k, v).chosen == "sdpa"


# --- the triton backend in the auto order --------------------------------------------------------


def half_inputs(dtype: torch.dtype = torch.float16) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(t.to(dtype) for t in inputs())  # type: ignore[return-value]


def test_triton_is_registered_first_in_auto_and_gives_its_reason_off_cuda() -> None:
    assert "triton" in qkv.available_backends()
    assert backends.AUTO_ORDER[0] == "triton"
    assert isinstance(backends.get_backend("triton"), backends.TritonBackend)
    pytest.importorskip("triton")  # without it, its reason is that (the test below)
    explanation = qkv.explain(*half_inputs())
    assert explanation.chosen == "sdpa"
    reason = explanation.reasons["triton"]
    assert reason is not None and "CUDA" in reason
    assert f"triton: {reason}" in str(explanation)
    with pytest.raises(ValueError, match="backend 'triton' cannot serve this call: runs on CUDA"):
        qkv.attention(*half_inputs(), backend="triton")


def test_auto_takes_triton_first_wherever_it_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    # What happens on CUDA, played on the CPU by letting the backend accept CPU tensors (only
    # the decision is computed here; tests/test_triton.py runs the kernels through auto).
    pytest.importorskip("triton")
    monkeypatch.setattr(backends.get_backend("triton"), "_allow_cpu", True)
    for dtype in (torch.float16, torch.bfloat16):
        explanation = qkv.explain(*half_inputs(dtype), causal=True)
        assert explanation.chosen == "triton", explanation
        assert explanation.passed_over["sdpa"] == "could serve, but triton comes first"
    # It gives no cost estimate; its memory stays O(N) with a mask function, which would rule
    # out SDPA's dense mask here.
    n = 16384
    q = torch.empty(1, 8, n, 64, dtype=torch.float16)
    assert qkv.explain(q, q, q, mask=lambda b, h, qi, kv: (qi - kv).abs() < 1000).chosen == "triton"
    # Unless it would need more than the memory limit: ALiBi materialized as a float32
    # (Hq, Nq, Nk) bias is 4.3 GiB here, so the tiled chunked backend is taken.
    q = torch.empty(1, 8, 12000, 64, dtype=torch.float16)
    over = qkv.explain(q, q, q, bias=scores.alibi(8), causal=True)
    assert over.chosen in TILED, over
    assert "over auto's 1 GiB limit" in over.passed_over["triton"]
    small = torch.empty(1, 8, 1024, 64, dtype=torch.float16)
    assert qkv.explain(small, small, small, bias=scores.alibi(8)).chosen == "triton"
    # Where it refuses, auto's cost model decides among the others as before.
    assert "float32" in str(qkv.explain(*inputs()).reasons["triton"])
    assert qkv.explain(*inputs()).chosen == "sdpa"
    weights = qkv.explain(*half_inputs(), return_weights=True)
    assert weights.chosen == "reference" and "return_weights" in str(weights.reasons["triton"])


def test_triton_not_installed_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from qkv.backends.triton import support

    monkeypatch.setattr(support, "triton_installed", lambda: False)
    monkeypatch.setattr(backends.get_backend("triton"), "_allow_cpu", True)
    explanation = qkv.explain(*half_inputs())
    assert explanation.chosen == "sdpa"
    assert "triton is not installed" in str(explanation.reasons["triton"])


def test_import_and_dispatch_do_not_import_triton() -> None:
    code = (
        "import sys, torch, qkv\n"
        "q = torch.randn(1, 2, 8, 16, dtype=torch.float16)\n"
        "qkv.explain(q, q, q, bias=qkv.scores.softcap(5.0))\n"
        "qkv.attention(q, q, q)\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
