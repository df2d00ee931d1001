"""``return_lse=True``: each row's log-sum-exp, on every backend that serves it, with gradients;
and masks and score functions restricted to a block (what context parallelism runs)."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv import masks as M
from qkv import scores as S
from qkv.mask_core import EMPTY, FULL, classify_tiles

LSE_BACKENDS = ["reference", "chunked", "cpu"]


def _inputs(nq: int = 7, nk: int = 9, hq: int = 4, hkv: int = 2, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, hq, nq, 8, generator=g, dtype=dtype)
    k = torch.randn(2, hkv, nk, 8, generator=g, dtype=dtype)
    v = torch.randn(2, hkv, nk, 5, generator=g, dtype=dtype)
    return q, k, v


def _gold_lse(q, k, mask: torch.Tensor | None) -> torch.Tensor:
    """log-sum-exp of the scaled scores, written out in float64."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)
    scores = q.double() @ kk.transpose(-2, -1) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("backend", LSE_BACKENDS)
def test_lse_is_the_log_sum_exp_and_minus_inf_on_empty_rows(backend: str) -> None:
    q, k, v = _inputs()
    mask = M.key_padding([9, 0]) & M.causal(1)  # batch entry 1 attends nothing
    out, lse = qkv.attention(q, k, v, mask=mask, return_lse=True, backend=backend)
    dense = mask.tile(2, 4, (0, 7), (0, 9))
    gold = _gold_lse(q, k, dense.expand(2, 4, 7, 9))
    assert lse.shape == (2, 4, 7) and lse.dtype == torch.float64
    assert torch.equal(lse[1], torch.full_like(lse[1], float("-inf")))
    torch.testing.assert_close(lse[0], gold[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out, qkv.attention(q, k, v, mask=mask, backend="reference"))


@pytest.mark.parametrize("backend", LSE_BACKENDS)
def test_lse_gradients_match_autograd_through_the_formula(backend: str) -> None:
    q, k, v = _inputs()
    mask = M.sliding_window(2, 1) & M.key_padding([9, 0])
    bias = S.chain(S.alibi(4), S.softcap(3.0))
    weights = torch.randn(2, 4, 7, dtype=torch.float64)
    grads = []
    for name in ("reference", backend):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = qkv.attention(*leaves, mask=mask, bias=bias, return_lse=True, backend=name)
        finite = torch.where(torch.isfinite(lse), lse, 0.0)
        (out.sin().sum() + (finite * weights).sum()).backward()
        grads.append([t.grad for t in leaves])
        assert all(torch.isfinite(t.grad).all() for t in leaves)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_lse_gradcheck_on_the_chunked_backend() -> None:
    q, k, v = (t.requires_grad_() for t in _inputs(nq=3, nk=4, hq=2, hkv=1))

    def fn(q, k, v):
        return qkv.attention(q, k, v, causal=True, return_lse=True, backend="chunked")

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_lse_is_float32_for_half_inputs() -> None:
    q, k, v = _inputs(dtype=torch.bfloat16)
    _, lse = qkv.attention(q, k, v, return_lse=True, backend="chunked")
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse, _gold_lse(q, k, None).float(), rtol=0, atol=2e-2)


def test_weights_and_lse_together() -> None:
    q, k, v = _inputs()
    _, weights, lse = qkv.attention(
        q, k, v, causal=True, return_weights=True, return_lse=True, backend="chunked"
    )
    assert weights.shape == (2, 4, 7, 9) and lse.shape == (2, 4, 7)


@pytest.mark.parametrize("backend", ["sdpa"])
def test_a_backend_without_the_lse_refuses_it_with_a_reason(backend: str) -> None:
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="log-sum-exp"):
        qkv.attention(q, k, v, return_lse=True, backend=backend)
    assert "log-sum-exp" in str(qkv.explain(q, k, v, return_lse=True))


# --- blocks ----------------------------------------------------------------------------------------

DOC_IDS = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3], [0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3]])

MASKS = {
    "causal": lambda: M.causal(),
    "causal_offset": lambda: M.causal(-2),
    "window": lambda: M.sliding_window(3, 1),
    "key_padding": lambda: M.key_padding([9, 4]),
    "query_padding": lambda: M.query_padding([5, 11]),
    "prefix_lm": lambda: M.prefix_lm([3, 6]),
    "document": lambda: M.document(DOC_IDS),
    "dense": lambda: M.dense(
        torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1)) > 0.4
    ),
    "or_not": lambda: M.sliding_window(1) | ~M.causal(),
    "and_document": lambda: M.causal() & M.document(DOC_IDS),
    "own": lambda: M.mask_function(lambda b, h, q, kv: (q * 3 + kv) % 4 != 1),
}
BLOCKS = [((0, 5), (0, 12)), ((5, 12), (0, 5)), ((3, 9), (6, 12)), ((8, 12), (2, 7))]


@pytest.mark.parametrize("name", sorted(MASKS))
def test_a_mask_block_is_the_mask_on_that_block(name: str) -> None:
    mask = MASKS[name]()
    for q_range, kv_range in BLOCKS:
        part = mask.block(q_range, kv_range)
        nq, nk = q_range[1] - q_range[0], kv_range[1] - kv_range[0]
        local = part.tile(2, 3, (0, nq), (0, nk)).expand(2, 3, nq, nk)
        whole = mask.tile(2, 3, q_range, kv_range).expand(2, 3, nq, nk)
        assert torch.equal(local, whole), (name, q_range, kv_range)
        state = int(classify_tiles(part, torch.tensor([0, nq]), torch.tensor([0, nk]))[0, 0])
        if state == EMPTY:
            assert not whole.any()
        if state == FULL:
            assert whole.all()
        part.check_call(2, 3, nq, nk)


@pytest.mark.parametrize("name", ["causal", "window", "key_padding", "prefix_lm", "document"])
def test_a_described_mask_block_stays_on_the_cpu_kernel(name: str) -> None:
    mask = MASKS[name]()
    q, k, v = _inputs(nq=12, nk=12, hq=2, hkv=2)
    gold = qkv.attention(q, k, v, mask=mask, backend="reference")
    q_range, kv_range = (4, 11), (0, 12)
    part = mask.block(q_range, kv_range)
    out = qkv.attention(q[:, :, 4:11], k, v, mask=part, backend="cpu")
    torch.testing.assert_close(out, gold[:, :, 4:11], rtol=0, atol=1e-12)


def _relative() -> S.RelativePositionBias:
    table = S.RelativePositionBias(3, max_distance=4, offset=1)
    with torch.no_grad():
        table.table.copy_(torch.randn(3, 9, generator=torch.Generator().manual_seed(2)))
    return table


SCORES = {
    "alibi": lambda: S.alibi(3, offset=2),
    "softcap": lambda: S.softcap(1.5),
    "relative": _relative,
    "chain": lambda: S.chain(S.alibi(3), S.softcap(2.0)),
    "own": lambda: S.ScoreMod(lambda s, b, h, q, kv: s + 0.1 * (q - 2 * kv), "own"),
    "plain_callable": lambda: lambda s, b, h, q, kv: s * (1 + (q % 2)),
}


@pytest.mark.parametrize("name", sorted(SCORES))
def test_a_score_function_block_is_the_function_on_that_block(name: str) -> None:
    mod = SCORES[name]()
    scores = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    whole = mod(scores, *M.index_grid(2, 3, (0, 12), (0, 12)))
    for q_range, kv_range in BLOCKS:
        part = S.block_score(mod, q_range, kv_range)
        nq, nk = q_range[1] - q_range[0], kv_range[1] - kv_range[0]
        tile = scores[:, :, q_range[0] : q_range[1], kv_range[0] : kv_range[1]]
        local = part(tile, *M.index_grid(2, 3, (0, nq), (0, nk)))
        expected = whole[:, :, q_range[0] : q_range[1], kv_range[0] : kv_range[1]]
        torch.testing.assert_close(local, expected, rtol=0, atol=1e-12)
    if name in ("alibi", "relative", "chain", "softcap"):
        assert type(S.block_score(mod, (4, 8), (0, 4))) is type(mod)  # still on the kernels


def test_a_relative_bias_block_shares_its_table() -> None:
    mod = _relative()
    assert S.block_score(mod, (3, 6), (0, 2)).table is mod.table  # type: ignore[attr-defined]


def test_an_alibi_block_keeps_an_offset_far_beyond_its_size() -> None:
    part = S.alibi(2).block((1000, 1004), (0, 4))
    assert part.for_call(1, 2, 4, 4).offset == 1000
