"""qkv.approx: each approximation against its own defining formula in float64, its exact
limits, gradients, causality, padding and argument errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import qkv
from qkv import approx, masks

F64 = torch.float64


def _qkv(B=2, Hq=4, Hkv=2, Nq=11, Nk=11, D=8, Dv=6, seed=0, dtype=F64, size=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=dtype) * size
    k = torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype) * size
    v = torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=dtype)
    return q, k, v


def _padding(B=2, Nk=11, lengths=(11, 7)) -> Tensor:
    return torch.arange(Nk)[None, :] < torch.tensor(lengths)[:B, None]  # (B, Nk)


def _visible(Nq: int, Nk: int, causal, keep: Tensor | None, b: int) -> Tensor:
    """(Nq, Nk) bool: which keys query i of batch row b sees."""
    see = torch.ones(Nq, Nk, dtype=torch.bool)
    if causal:
        offset = Nk - Nq if causal == "bottom_right" else 0
        see &= torch.arange(Nk)[None, :] <= torch.arange(Nq)[:, None] + offset
    if keep is not None:
        see &= keep[b][None, :]
    return see


def _naive_kernel(phi_q_fn, phi_k_fn, q, k, v, causal=False, keep=None) -> Tensor:
    """out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j), explicitly per row."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    out = torch.zeros(B, Hq, Nq, v.shape[-1], dtype=F64)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            see = _visible(Nq, Nk, causal, keep, b)
            fq, fk = phi_q_fn(q[b, h], b, h), phi_k_fn(k[b, g], b, g)
            for i in range(Nq):
                w = (fk @ fq[i]) * see[i]
                if w.sum() > 0:
                    out[b, h, i] = (w[:, None] * v[b, g]).sum(0) / w.sum()
    return out


# --- linear attention ----------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
@pytest.mark.parametrize("Nq,Nk", [(11, 11), (5, 11)])
def test_linear_attention_matches_its_formula(causal, Nq, Nk):
    q, k, v = _qkv(Nq=Nq, Nk=Nk)
    keep = _padding(Nk=Nk, lengths=(Nk, Nk - 3))
    out = approx.linear_attention(q, k, v, mask=keep, causal=causal, chunk_size=4)
    phi = lambda x, b, h: torch.nn.functional.elu(x) + 1  # noqa: E731
    gold = _naive_kernel(phi, phi, q, k, v, causal, keep)
    torch.testing.assert_close(out, gold, rtol=1e-10, atol=1e-12)


def test_linear_attention_chunk_size_does_not_change_the_result():
    q, k, v = _qkv(Nq=37, Nk=37)
    a = approx.linear_attention(q, k, v, causal=True, chunk_size=1)
    b = approx.linear_attention(q, k, v, causal=True, chunk_size=64)
    torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_linear_attention_float32_close_to_float64():
    q, k, v = _qkv()
    gold = approx.linear_attention(q, k, v, causal=True)
    out = approx.linear_attention(q.float(), k.float(), v.float(), causal=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), gold, rtol=1e-5, atol=1e-5)


# --- Performer -----------------------------------------------------------------------------


def test_orthogonal_features_rows_are_orthogonal_within_a_block():
    w = approx.orthogonal_features(20, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert w.shape == (20, 8)
    for start in (0, 8):
        block = w[start : start + 8]
        gram = block @ block.T
        off = gram - torch.diag(torch.diagonal(gram))
        assert off.abs().max() < 1e-10


@pytest.mark.parametrize("causal", [False, True])
def test_performer_matches_its_formula(causal):
    q, k, v = _qkv(size=0.5)
    keep = _padding()
    w = approx.orthogonal_features(16, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    s = 8**-0.25  # sqrt of the default scale D^-1/2

    def phi(x, b, h):  # exp(W x - |x|^2 / 2) / sqrt(M), no stabiliser
        x = x * s
        return torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(16)

    out = approx.performer_attention(q, k, v, projection=w, mask=keep, causal=causal)
    gold = _naive_kernel(phi, phi, q, k, v, causal, keep)
    torch.testing.assert_close(out, gold, rtol=1e-9, atol=1e-11)


def _relative_error(out: Tensor, gold: Tensor) -> float:
    return float((out - gold).norm() / gold.norm())


def test_performer_error_falls_as_features_grow():
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, Nq=48, Nk=48, D=16, size=0.5)
    gold = qkv.attention(q, k, v)
    errors = {}
    for m in (16, 1024):
        runs = []
        for seed in range(6):
            w = approx.orthogonal_features(
                m, 16, generator=torch.Generator().manual_seed(seed), dtype=F64
            )
            runs.append(_relative_error(approx.performer_attention(q, k, v, projection=w), gold))
        errors[m] = sum(runs) / len(runs)
    # 64x the features: the Monte Carlo error should fall about 8x; ask for 3x (the
    # estimator is heavy-tailed, exp of a Gaussian, so few draws scatter widely).
    assert errors[1024] < errors[16] / 3, errors


def test_performer_module_redraws_in_training_only():
    module = approx.PerformerAttention(8, num_features=16, redraw_interval=2).double()
    q, k, v = _qkv()
    first = module.projection.clone()
    module.train()
    module(q, k, v)
    module(q, k, v)
    assert torch.equal(module.projection, first)  # two calls: not yet
    module(q, k, v)
    assert not torch.equal(module.projection, first)  # the third call redrew
    drawn = module.projection.clone()
    module.eval()
    a, b = module(q, k, v), module(q, k, v)
    assert torch.equal(module.projection, drawn) and torch.equal(a, b)


def test_performer_does_not_overflow_on_large_scores():
    q, k, v = _qkv(size=6.0, dtype=torch.float32)
    w = approx.orthogonal_features(64, 8, generator=torch.Generator().manual_seed(0))
    out = approx.performer_attention(q, k, v, projection=w)
    assert torch.isfinite(out).all()


# --- Nystrom -------------------------------------------------------------------------------


def _naive_nystrom(q, k, v, m, keep=None):
    """Xiong et al.'s formula with explicit segments and torch.linalg.pinv, per (b, h)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    s = D**-0.5
    out = torch.zeros(B, Hq, Nq, v.shape[-1], dtype=F64)
    for b in range(B):
        real = keep[b] if keep is not None else torch.ones(Nk, dtype=torch.bool)
        for h in range(Hq):
            g = h // (Hq // Hkv)
            ql = torch.stack([q[b, h, i * Nq // m : (i + 1) * Nq // m].mean(0) for i in range(m)])
            segs = [torch.arange(i * Nk // m, (i + 1) * Nk // m) for i in range(m)]
            segs = [seg[real[seg]] for seg in segs]
            kl = torch.stack([k[b, g, seg].mean(0) for seg in segs if len(seg)])
            f = torch.softmax(q[b, h] @ kl.T * s, -1)
            a = torch.softmax(ql @ kl.T * s, -1)
            scores = (ql @ k[b, g].T * s).masked_fill(~real[None, :], float("-inf"))
            c = torch.softmax(scores, -1)
            out[b, h] = f @ torch.linalg.pinv(a) @ (c @ v[b, g])
    return out


@pytest.mark.parametrize("padded", [False, True])
def test_nystrom_matches_its_formula(padded):
    q, k, v = _qkv(Nq=13, Nk=17)
    keep = _padding(Nk=17, lengths=(17, 9)) if padded else None
    out = approx.nystrom_attention(q, k, v, mask=keep, num_landmarks=4, pinv_iterations=None)
    torch.testing.assert_close(out, _naive_nystrom(q, k, v, 4, keep), rtol=1e-8, atol=1e-10)


def test_nystrom_with_a_landmark_per_token_is_exact():
    q, k, v = _qkv(Nq=12, Nk=12)
    out = approx.nystrom_attention(q, k, v, num_landmarks=12, pinv_iterations=None)
    torch.testing.assert_close(out, qkv.attention(q, k, v), rtol=1e-8, atol=1e-9)


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    q, k, _ = _qkv(Nq=8, Nk=8, size=0.5)
    a = torch.softmax(q[0, 0] @ k[0, 0].T, -1)
    exact = torch.linalg.pinv(a)
    assert (approx.iterative_pinv(a, 30) - exact).abs().max() < 1e-8
    assert (approx.iterative_pinv(a, 2) - exact).abs().max() > 1e-6  # it is an iteration


def test_nystrom_default_pinv_is_close_with_enough_landmarks():
    q, k, v = _qkv(Nq=64, Nk=64, size=0.5)
    gold = qkv.attention(q, k, v)
    few = _relative_error(approx.nystrom_attention(q, k, v, num_landmarks=4), gold)
    many = _relative_error(approx.nystrom_attention(q, k, v, num_landmarks=32), gold)
    assert many < few


# --- Linformer -----------------------------------------------------------------------------


def test_linformer_matches_its_formula():
    q, k, v = _qkv(Nq=9, Nk=11)
    keep = _padding()
    module = approx.LinformerAttention(max_len=16, rank=5).double()
    out = module(q, k, v, mask=keep)
    e, f = module.key_projection.detach()[:, :11], module.value_projection.detach()[:, :11]
    gold = torch.zeros_like(out)
    for b in range(2):
        for h in range(4):
            g = h // 2
            kk, vv = k[b, g] * keep[b][:, None], v[b, g] * keep[b][:, None]
            p = torch.softmax(q[b, h] @ (e @ kk).T / math.sqrt(8), -1)
            gold[b, h] = p @ (f @ vv)
    torch.testing.assert_close(out, gold, rtol=1e-10, atol=1e-12)


def test_linformer_with_identity_projections_is_exact():
    q, k, v = _qkv()
    eye = torch.eye(11, dtype=F64)
    out = approx.linformer_attention(q, k, v, key_projection=eye, value_projection=eye)
    torch.testing.assert_close(out, qkv.attention(q, k, v), rtol=1e-10, atol=1e-12)


def test_linformer_share_kv_uses_one_parameter():
    module = approx.LinformerAttention(max_len=8, rank=2, share_kv=True)
    assert module.value_projection is module.key_projection
    assert sum(p.numel() for p in module.parameters()) == 16


# --- BigBird and local windows -------------------------------------------------------------


def test_bigbird_blocks_layout():
    table = approx.bigbird_blocks(8, window_blocks=3, global_blocks=1, random_blocks=2, seed=3)
    assert table[0].all() and table[:, 0].all()  # global
    for i in range(8):
        for j in range(max(0, i - 1), min(8, i + 2)):
            assert table[i, j]  # window
    # each non-global row: window (<= 3) + global column + exactly 2 random blocks
    for i in range(1, 8):
        window = {j for j in range(max(0, i - 1), min(8, i + 2))} | {0}
        assert int(table[i].sum()) == len(window) + 2
    again = approx.bigbird_blocks(8, window_blocks=3, global_blocks=1, random_blocks=2, seed=3)
    assert torch.equal(table, again)


def test_bigbird_mask_evaluates_the_block_table():
    mask = approx.bigbird_mask(37, block_size=5, random_blocks=1, seed=2)
    table = approx.bigbird_blocks(8, random_blocks=1, seed=2)
    b, h, qi, ki = masks.index_grid(1, 1, (0, 37), (0, 37))
    dense = mask(b, h, qi, ki)[0, 0]
    for i in range(37):
        for j in range(37):
            assert bool(dense[i, j]) == bool(table[i // 5, j // 5])


def test_bigbird_tile_classes_agree_with_the_mask():
    mask = approx.bigbird_mask(64, block_size=8, random_blocks=2, seed=1)
    bounds = torch.tensor([0, 5, 16, 24, 40, 41, 64])
    states = masks.classify_tiles(mask, bounds, bounds)
    b, h, qi, ki = masks.index_grid(1, 1, (0, 64), (0, 64))
    dense = mask(b, h, qi, ki)[0, 0]
    seen = set()
    for i in range(6):
        for j in range(6):
            tile = dense[bounds[i] : bounds[i + 1], bounds[j] : bounds[j + 1]]
            state = int(states[i, j])
            seen.add(state)
            if state == masks.FULL:
                assert tile.all()
            elif state == masks.EMPTY:
                assert not tile.any()
            else:
                assert state == masks.PARTIAL and tile.any() and not tile.all()
    assert {masks.FULL, masks.EMPTY} <= seen


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_attention_is_exact_attention_under_its_mask(causal):
    q, k, v = _qkv(Nq=40, Nk=40)
    keep = _padding(Nk=40, lengths=(40, 33))
    out = approx.bigbird_attention(q, k, v, mask=keep, causal=causal, block_size=8, seed=1)
    pattern = approx.bigbird_mask(40, block_size=8, seed=1)
    b, h, qi, ki = masks.index_grid(1, 1, (0, 40), (0, 40))
    dense = pattern(b, h, qi, ki) & keep[:, None, None, :]
    gold = qkv.attention(q, k, v, mask=dense, causal=causal, backend="reference")
    torch.testing.assert_close(out, gold, rtol=1e-12, atol=1e-12)
    chunked = approx.bigbird_attention(
        q, k, v, mask=keep, causal=causal, block_size=8, seed=1, backend="chunked"
    )
    torch.testing.assert_close(chunked, gold, rtol=1e-10, atol=1e-12)


def test_windows_covering_the_sequence_are_exact_attention():
    q, k, v = _qkv(Nq=30, Nk=30)
    gold = qkv.attention(q, k, v)
    torch.testing.assert_close(approx.local_attention(q, k, v, window=29), gold)
    whole = approx.bigbird_attention(q, k, v, block_size=4, window_blocks=15, random_blocks=0)
    torch.testing.assert_close(whole, gold)
    narrow = approx.local_attention(q, k, v, window=3)
    assert (narrow - gold).abs().max() > 1e-3  # a narrow window is an approximation


# --- gradients, causality, padding ---------------------------------------------------------


def _tiny(seed=0):
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, Nq=5, Nk=5, D=4, Dv=3, seed=seed, size=0.5)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


_W4 = approx.orthogonal_features(6, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
_E = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=F64)

METHODS = {
    "linear": lambda q, k, v, **kw: approx.linear_attention(q, k, v, chunk_size=2, **kw),
    "performer": lambda q, k, v, **kw: approx.performer_attention(
        q, k, v, projection=_W4, chunk_size=2, **kw
    ),
    "nystrom": lambda q, k, v, **kw: approx.nystrom_attention(q, k, v, num_landmarks=2, **kw),
    "linformer": lambda q, k, v, **kw: approx.linformer_attention(
        q, k, v, key_projection=_E, value_projection=_E.flip(0), **kw
    ),
    "bigbird": lambda q, k, v, **kw: approx.bigbird_attention(
        q, k, v, block_size=1, random_blocks=1, **kw
    ),
}
CAUSAL = ["linear", "performer", "bigbird"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_gradcheck(name):
    q, k, v = _tiny()
    assert torch.autograd.gradcheck(lambda *t: METHODS[name](*t), (q, k, v))


@pytest.mark.parametrize("name", CAUSAL)
def test_gradcheck_causal(name):
    q, k, v = _tiny(1)
    assert torch.autograd.gradcheck(lambda *t: METHODS[name](*t, causal=True), (q, k, v))


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_never_reads_the_future(name):
    q, k, v = _qkv(Nq=12, Nk=12, D=4, size=0.5)
    w = approx.orthogonal_features(8, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    fns = {
        "linear": lambda q, k, v: approx.linear_attention(q, k, v, causal=True, chunk_size=5),
        "performer": lambda q, k, v: approx.performer_attention(
            q, k, v, projection=w, causal=True, chunk_size=5
        ),
        "bigbird": lambda q, k, v: approx.bigbird_attention(q, k, v, causal=True, block_size=2),
    }
    before = fns[name](q, k, v)
    t = 7
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t] += 3.0
    v2[:, :, t] -= 2.0
    after = fns[name](q, k2, v2)
    torch.testing.assert_close(after[:, :, :t], before[:, :, :t], rtol=0, atol=1e-14)
    assert (after[:, :, t:] - before[:, :, t:]).abs().max() > 1e-6


@pytest.mark.parametrize("name", sorted(METHODS))
def test_padded_keys_are_never_read(name):
    q, k, v = _qkv(B=2, Hq=2, Hkv=1, Nq=5, Nk=5, D=4, Dv=3)
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]])
    before = METHODS[name](q, k, v, mask=keep)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 3:] = 9.0
    v2[1, :, 3:] = -9.0
    after = METHODS[name](q, k2, v2, mask=keep)
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_row_with_no_key_is_zero_not_nan(name):
    q, k, v = _qkv(B=2, Hq=2, Hkv=1, Nq=5, Nk=5, D=4, Dv=3)
    keep = torch.tensor([[True] * 5, [False] * 5])
    out = METHODS[name](q, k, v, mask=keep)
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0


def test_approximations_are_not_exact_backends():
    names = set(qkv.available_backends())
    assert not names & {"linear", "performer", "nystrom", "linformer", "bigbird", "local"}


# --- errors --------------------------------------------------------------------------------


def test_bad_arguments_name_the_argument():
    q, k, v = _qkv()
    per_query = torch.ones(2, 1, 11, 11, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask must be a key padding mask"):
        approx.linear_attention(q, k, v, mask=per_query)
    with pytest.raises(TypeError, match="mask functions need the exact kernels"):
        approx.linear_attention(q, k, v, mask=masks.causal())
    with pytest.raises(ValueError, match=r"mask must have shape \(B, Nk\) = \(2, 11\)"):
        approx.nystrom_attention(q, k, v, mask=torch.ones(2, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal"):
        approx.nystrom_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="causal"):
        approx.LinformerAttention(16, 4).double()(q, k, v, causal=True)
    with pytest.raises(ValueError, match="causal must be"):
        approx.linear_attention(q, k, v, causal="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        approx.linear_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="num_landmarks"):
        approx.nystrom_attention(q, k, v, num_landmarks=0)
    with pytest.raises(ValueError, match=r"projection must have shape \(M, D\) with D = 8"):
        approx.performer_attention(q, k, v, projection=torch.randn(4, 5, dtype=F64))
    with pytest.raises(ValueError, match="exceeds max_len"):
        approx.LinformerAttention(max_len=8, rank=2).double()(q, k, v)
    with pytest.raises(ValueError, match=r"Hq \(3\) must be a multiple of key/value heads"):
        approx.linear_attention(q[:, :3], k, v)
    with pytest.raises(TypeError, match=r"q must be a torch\.Tensor"):
        approx.linear_attention([1], k, v)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window_blocks must be odd"):
        approx.bigbird_mask(64, window_blocks=2)
    with pytest.raises(ValueError, match="unknown attention='fast'"):
        approx.make_attention("fast", head_dim=8)
    with pytest.raises(ValueError, match="bad attention_options"):
        approx.make_attention("linear", head_dim=8, num_features=3)
