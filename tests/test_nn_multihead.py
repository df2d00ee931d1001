"""MultiHeadAttention and Attention: against torch.nn.MultiheadAttention with the same weights,
against their own full recomputation when decoding with caches, and their errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from qkv import masks, scores
from qkv.nn.attention import Attention
from qkv.nn.kv_cache import KVCache
from qkv.nn.multihead import MultiHeadAttention
from qkv.nn.positional import RotaryEmbedding

F64 = torch.float64
B, NQ, NK, E, H = 2, 5, 7, 16, 4


def rand(*shape: int, seed: int, dtype: torch.dtype = F64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def random_keep(*shape: int, seed: int) -> Tensor:
    """A random bool mask, True = attend, where every row keeps key 0 (torch gives NaN for rows
    with nothing to attend; qkv's zeros there are tested elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(*shape, generator=g) < 0.6
    keep[..., 0] = True
    return keep


def torch_mha(
    *,
    kdim: int | None = None,
    vdim: int | None = None,
    bias: bool = True,
    batch_first: bool = True,
    seed: int = 0,
) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first)
    with torch.no_grad():
        for p in m.parameters():  # torch zeroes the biases; random ones test that they are copied
            p.copy_(torch.randn_like(p) * 0.5)
    return m.double().eval()


def qkv_mha(seed: int = 0, **kwargs: object) -> MultiHeadAttention:
    torch.manual_seed(seed)
    return MultiHeadAttention(E, H, **kwargs).double().eval()


# --- from_torch: same weights, same function ----------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("attn_mask", [False, True])
@pytest.mark.parametrize("average", [True, False])
def test_from_torch_self_attention(
    bias: bool, padding: bool, attn_mask: bool, average: bool
) -> None:
    m = torch_mha(bias=bias)
    mine = MultiHeadAttention.from_torch(m)
    assert m.in_proj_weight is not None  # the packed layout
    x = rand(B, NQ, E, seed=1)
    keep_keys = random_keep(B, NQ, seed=2) if padding else None
    keep = random_keep(NQ, NQ, seed=3) if attn_mask else None
    want, want_w = m(
        x,
        x,
        x,
        key_padding_mask=None if keep_keys is None else ~keep_keys,
        attn_mask=None if keep is None else ~keep,
        need_weights=True,
        average_attn_weights=average,
    )
    got, got_w = mine(
        x,
        key_padding_mask=keep_keys,
        attn_mask=keep,
        need_weights=True,
        average_attn_weights=average,
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-12)
    assert got_w.shape == ((B, NQ, NQ) if average else (B, H, NQ, NQ))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_from_torch_cross_attention_kdim_vdim(bias: bool, masked: bool) -> None:
    m = torch_mha(kdim=6, vdim=10, bias=bias)
    assert m.in_proj_weight is None  # the separate q/k/v_proj_weight layout
    mine = MultiHeadAttention.from_torch(m)
    x, key, value = rand(B, NQ, E, seed=1), rand(B, NK, 6, seed=2), rand(B, NK, 10, seed=3)
    keep_keys = random_keep(B, NK, seed=4) if masked else None
    keep = random_keep(NQ, NK, seed=5) if masked else None
    want, want_w = m(
        x,
        key,
        value,
        key_padding_mask=None if keep_keys is None else ~keep_keys,
        attn_mask=None if keep is None else ~keep,
        average_attn_weights=False,
    )
    got, got_w = mine(
        x,
        key,
        value,
        key_padding_mask=keep_keys,
        attn_mask=keep,
        need_weights=True,
        average_attn_weights=False,
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-12)


def test_from_torch_per_head_mask_and_sequence_first() -> None:
    """A (B * H, Nq, Nk) torch mask is our (B, H, Nq, Nk); batch_first=False only changes
    torch's input layout, never ours."""
    m = torch_mha(batch_first=False)
    mine = MultiHeadAttention.from_torch(m)
    x, memory = rand(B, NQ, E, seed=1), rand(B, NK, E, seed=2)
    keep = random_keep(B, H, NQ, NK, seed=3)
    want, _ = m(
        x.transpose(0, 1),
        memory.transpose(0, 1),
        memory.transpose(0, 1),
        attn_mask=~keep.flatten(0, 1),
    )
    got, _ = mine(x, memory, attn_mask=keep)
    torch.testing.assert_close(got, want.transpose(0, 1), rtol=1e-12, atol=1e-12)


def test_from_torch_keeps_dtype_and_mode() -> None:
    m = torch_mha().float().train()
    mine = MultiHeadAttention.from_torch(m)
    assert mine.training and mine.q_proj.weight.dtype == torch.float32
    assert mine.dropout == m.dropout
    torch.testing.assert_close(mine.k_proj.weight, m.in_proj_weight[E : 2 * E])
    torch.testing.assert_close(mine.v_proj.bias, m.in_proj_bias[2 * E :])


@pytest.mark.parametrize("option", ["add_bias_kv", "add_zero_attn"])
def test_from_torch_refuses_appended_keys(option: str) -> None:
    m = nn.MultiheadAttention(E, H, **{option: True})
    with pytest.raises(ValueError, match=option):
        MultiHeadAttention.from_torch(m)


# --- KV cache: decoding token by token equals the full causal computation ------------------------


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_cached_decoding_equals_full_causal(rope: bool, num_kv_heads: int) -> None:
    mha = qkv_mha(num_kv_heads=num_kv_heads, rope=rope)
    N = 9
    x = rand(B, N, E, seed=1)
    with torch.no_grad():
        full, _ = mha(x, causal=True)
        cache = mha.make_kv_cache(B, N)
        steps = [mha(x[:, :3], causal=True, kv_cache=cache)[0]]  # prefill 3 tokens
        steps += [mha(x[:, t : t + 1], causal=True, kv_cache=cache)[0] for t in range(3, N)]
    assert len(cache) == N
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-12, atol=1e-12)


def test_cached_decoding_with_padding_and_weights() -> None:
    """key_padding_mask covers the whole cache; the weights of a step cover it too."""
    mha = qkv_mha(num_kv_heads=2)
    x = rand(B, 6, E, seed=1)
    keep = random_keep(B, 6, seed=2)
    with torch.no_grad():
        full, full_w = mha(x, causal=True, key_padding_mask=keep, need_weights=True)
        cache = mha.make_kv_cache(B, 6)
        outs, ws = [], []
        for t in range(6):
            out, w = mha(
                x[:, t : t + 1],
                causal=True,
                kv_cache=cache,
                key_padding_mask=keep[:, : t + 1],
                need_weights=True,
            )
            outs.append(out)
            ws.append(nn.functional.pad(w, (0, 6 - t - 1)))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(ws, 1), full_w, rtol=1e-12, atol=1e-12)


def test_cached_decoding_with_position_functions_needs_their_offset() -> None:
    """ALiBi and a sliding window see step-local query indices; built with offset=len(cache)
    they reproduce the full computation, and without it they do not."""
    mha = qkv_mha(num_kv_heads=2)
    N = 7
    x = rand(B, N, E, seed=1)
    with torch.no_grad():
        full, _ = mha(x, causal=True, attn_mask=masks.sliding_window(2), bias=scores.alibi(H))
        cache, stale = mha.make_kv_cache(B, N), mha.make_kv_cache(B, N)
        steps, unshifted = [], []
        for t in range(N):
            L = len(cache)
            out, _ = mha(
                x[:, t : t + 1],
                causal=True,
                kv_cache=cache,
                attn_mask=masks.sliding_window(2, offset=L),
                bias=scores.alibi(H, offset=L),
            )
            steps.append(out)
            out, _ = mha(x[:, t : t + 1], causal=True, kv_cache=stale, bias=scores.alibi(H))
            unshifted.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-12, atol=1e-12)
    without_window, _ = mha(x, causal=True, bias=scores.alibi(H))
    assert (torch.cat(unshifted, 1) - without_window).abs().max() > 1e-3


def test_rope_scores_depend_only_on_relative_positions() -> None:
    """Shifting a whole sequence (by 3 masked-out cache slots) leaves a RoPE module's output
    unchanged; without RoPE the module is position-free, so this is RoPE's property."""
    mha = qkv_mha(rope=True)
    x = rand(B, 5, E, seed=1)
    with torch.no_grad():
        plain, _ = mha(x, causal=True)
        cache = mha.make_kv_cache(B, 8)
        mha(rand(B, 3, E, seed=2), kv_cache=cache)  # three tokens at positions 0, 1, 2
        keep = torch.ones(B, 8, dtype=torch.bool)
        keep[:, :3] = False  # ... never attended
        shifted, _ = mha(x, causal=True, kv_cache=cache, key_padding_mask=keep)
        no_rope = MultiHeadAttention(E, H).double().eval()
        no_rope.load_state_dict(mha.state_dict())
        differs, _ = no_rope(x, causal=True)
    torch.testing.assert_close(shifted, plain, rtol=1e-12, atol=1e-12)
    assert (differs - plain).abs().max() > 1e-3  # RoPE did change the function


def test_cross_attention_cache_via_project_kv() -> None:
    mha = qkv_mha(kdim=6, vdim=10)
    x, key, value = rand(B, NQ, E, seed=1), rand(B, NK, 6, seed=2), rand(B, NK, 10, seed=3)
    keep = random_keep(B, NK, seed=4)
    with torch.no_grad():
        full, _ = mha(x, key, value, key_padding_mask=keep)
        kv = mha.project_kv(key, value)
        assert kv[0].shape == (B, H, NK, E // H) and kv[1].shape == (B, H, NK, E // H)
        steps = [mha(x[:, t : t + 1], key_value=kv, key_padding_mask=keep)[0] for t in range(NQ)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-12, atol=1e-12)


# --- grouped heads, weights, masks, dropout ----------------------------------------------------


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_grouped_heads_equal_repeated_heads(num_kv_heads: int) -> None:
    """GQA with Hkv heads == MHA whose key/value heads are copies, head h using h // (Hq / Hkv)."""
    gqa = qkv_mha(num_kv_heads=num_kv_heads)
    assert gqa.k_proj.weight.shape == (num_kv_heads * E // H, E)
    mha = qkv_mha()
    mha.load_state_dict(
        {
            name: (
                t.unflatten(0, (num_kv_heads, -1))
                .repeat_interleave(H // num_kv_heads, 0)
                .flatten(0, 1)
                if name.startswith(("k_proj", "v_proj"))
                else t
            )
            for name, t in gqa.state_dict().items()
        }
    )
    x, memory = rand(B, NQ, E, seed=1), rand(B, NK, E, seed=2)
    keep = random_keep(B, NK, seed=3)
    got, got_w = gqa(
        x, memory, key_padding_mask=keep, need_weights=True, average_attn_weights=False
    )
    want, want_w = mha(
        x, memory, key_padding_mask=keep, need_weights=True, average_attn_weights=False
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-12)


def test_need_weights_average_and_none() -> None:
    mha = qkv_mha(num_kv_heads=2)
    x = rand(B, NQ, E, seed=1)
    out, none = mha(x)
    out_avg, avg = mha(x, need_weights=True)
    out_head, per_head = mha(x, need_weights=True, average_attn_weights=False)
    assert none is None
    torch.testing.assert_close(out_avg, out)
    torch.testing.assert_close(out_head, out)
    torch.testing.assert_close(avg, per_head.mean(dim=1))
    torch.testing.assert_close(per_head.sum(-1), torch.ones(B, H, NQ, dtype=F64))


def test_attn_mask_function_and_causal_agree_with_tensor() -> None:
    mha = qkv_mha()
    x = rand(B, NQ, E, seed=1)
    keep = random_keep(B, NQ, seed=2)
    tril = torch.ones(NQ, NQ, dtype=torch.bool).tril()
    want, _ = mha(x, attn_mask=tril, key_padding_mask=keep)
    by_function, _ = mha(x, attn_mask=masks.causal(), key_padding_mask=keep)
    by_flag, _ = mha(x, causal=True, key_padding_mask=keep)
    torch.testing.assert_close(by_function, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(by_flag, want, rtol=1e-12, atol=1e-12)
    assert (mha(x)[0] - want).abs().max() > 1e-3


def test_bias_score_function_passes_through() -> None:
    """ALiBi as a score function equals its dense bias tensor written out."""
    mha = qkv_mha()
    x = rand(B, NQ, E, seed=1)
    i = torch.arange(NQ)
    distance = (i[:, None] - i[None, :]).abs().to(F64)  # (Nq, Nk)
    dense = -scores.alibi_slopes(H).to(F64)[:, None, None] * distance  # (H, Nq, Nk)
    by_function, _ = mha(x, bias=scores.alibi(H))
    by_tensor, _ = mha(x, bias=dense)
    torch.testing.assert_close(by_function, by_tensor, rtol=1e-12, atol=1e-12)
    assert (mha(x)[0] - by_tensor).abs().max() > 1e-3


def test_fully_masked_row_gives_bias_only_not_nan() -> None:
    mha = qkv_mha()
    x = rand(B, NQ, E, seed=1)
    keep = torch.ones(NQ, NQ, dtype=torch.bool)
    keep[2] = False
    out, _ = mha(x, attn_mask=keep)
    torch.testing.assert_close(out[:, 2], mha.out_proj.bias.expand(B, E))


def test_dropout_only_in_training() -> None:
    mha = qkv_mha(dropout=0.5)
    plain = qkv_mha(dropout=0.0)
    x = rand(B, NQ, E, seed=1)
    torch.testing.assert_close(mha(x)[0], plain(x)[0])  # eval: no dropout, same weights
    mha.train()
    torch.manual_seed(0)
    first = mha(x)[0]
    second = mha(x)[0]
    assert (first - plain(x)[0]).abs().max() > 1e-3
    assert (first - second).abs().max() > 1e-3


def test_gradients_reach_every_projection() -> None:
    mha = qkv_mha(num_kv_heads=2, rope=True)
    mha(rand(B, NQ, E, seed=1), causal=True)[0].square().sum().backward()
    for name, p in mha.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_module_float32_matches_float64() -> None:
    mha = qkv_mha(num_kv_heads=2, rope=True)
    x = rand(B, NQ, E, seed=1)
    gold, _ = mha(x, causal=True)
    got, _ = mha.float()(x.float(), causal=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), gold, rtol=1e-5, atol=1e-5)


# --- Attention, the single-head module -------------------------------------------------------


def test_attention_module_is_the_formula() -> None:
    torch.manual_seed(0)
    attn = Attention(E, bias=True).double()
    x, y = rand(B, NQ, E, seed=1), rand(B, NK, E, seed=2)
    keep = random_keep(B, NQ, NK, seed=3)
    q, k, v = attn.q_proj(x), attn.k_proj(y), attn.v_proj(y)
    s = (q @ k.transpose(1, 2) / math.sqrt(E)).masked_fill(~keep, float("-inf"))
    weights = s.softmax(-1)
    want = attn.out_proj(weights @ v)
    got, got_w = attn(x, y, mask=keep, need_weights=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_w, weights, rtol=1e-12, atol=1e-12)
    self_out, none = attn(x, causal=True)
    want_self, _ = attn(x, x, x, mask=torch.ones(NQ, NQ, dtype=torch.bool).tril())
    assert none is None
    torch.testing.assert_close(self_out, want_self, rtol=1e-12, atol=1e-12)


def test_attention_module_errors() -> None:
    with pytest.raises(ValueError, match="dim"):
        Attention(0)
    attn = Attention(8)
    with pytest.raises(ValueError, match=r"query must have shape \(B, N, dim\) with dim=8"):
        attn(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"mask must have shape \(Nq, Nk\) or \(B, Nq, Nk\)"):
        attn(torch.randn(2, 3, 8), mask=torch.ones(1, 1, 1, 3, 3, dtype=torch.bool))


# --- errors name the argument ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"embed_dim": 10, "num_heads": 4},
            r"embed_dim \(10\) must be divisible by num_heads \(4\)",
        ),
        (
            {"embed_dim": 16, "num_heads": 4, "num_kv_heads": 3},
            r"num_heads \(4\) must be divisible by num_kv_heads \(3\)",
        ),
        ({"embed_dim": 16, "num_heads": 0}, r"num_heads must be a positive int; got num_heads=0"),
        ({"embed_dim": 16, "num_heads": 4, "kdim": -1}, r"kdim must be a positive int"),
        ({"embed_dim": 16, "num_heads": 4, "dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"embed_dim": 12, "num_heads": 4, "rope": True}, r"rope needs an even head dim .* 3"),
        (
            {"embed_dim": 16, "num_heads": 4, "rope": RotaryEmbedding(8)},
            r"rope.head_dim \(8\) must equal the head dim .* \(4\)",
        ),
    ],
)
def test_constructor_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(**kwargs)


def test_forward_errors_name_the_argument() -> None:
    mha = qkv_mha()
    x = rand(B, NQ, E, seed=1)
    with pytest.raises(ValueError, match=r"query must have shape \(B, N, embed_dim\).*2-d"):
        mha(x[0])
    with pytest.raises(ValueError, match=r"query's last dim \(8\) must equal embed_dim \(16\)"):
        mha(x[..., :8])
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Nk\) = \(2, 5\)"):
        mha(x, key_padding_mask=torch.ones(B, NQ + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool tensor"):
        mha(x, key_padding_mask=torch.ones(B, NQ))
    with pytest.raises(TypeError, match=r"attn_mask must be a bool tensor .* bias="):
        mha(x, attn_mask=torch.zeros(NQ, NQ))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(Nq, Nk\) = \(5, 5\)"):
        mha(x, attn_mask=torch.ones(B * H, NQ, NQ, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"value was given without key"):
        mha(x, value=x)
    with pytest.raises(ValueError, match=r"key's last dim \(6\) must equal kdim \(16\)"):
        mha(x, rand(B, NK, 6, seed=2))
    with pytest.raises(ValueError, match=r"key and value must share B and Nk"):
        mha(x, rand(B, NK, E, seed=2), rand(B, NK + 1, E, seed=3))
    with pytest.raises(ValueError, match=r"kv_cache caches self-attention"):
        mha(x, x, kv_cache=mha.make_kv_cache(B, 8))
    with pytest.raises(ValueError, match=r"key_value's k must have shape \(B, Hkv, Nk, D\)"):
        mha(x, key_value=(rand(B, H, NK, 3, seed=2), rand(B, H, NK, 4, seed=3)))
    with pytest.raises(ValueError, match=r"not both"):
        mha(x, x, key_value=mha.project_kv(x))


def test_forward_errors_for_module_options() -> None:
    cross = qkv_mha(kdim=6, vdim=10)
    x = rand(B, NQ, E, seed=1)
    with pytest.raises(ValueError, match=r"kdim == vdim == embed_dim; got embed_dim=16, kdim=6"):
        cross(x)
    with pytest.raises(ValueError, match=r"value is required when vdim \(10\) differs from kdim"):
        cross(x, rand(B, NK, 6, seed=2))
    with pytest.raises(ValueError, match=r"rope .* self-attention only"):
        qkv_mha(rope=True)(x, x)
    cache = KVCache(B, H, 4, E // H, dtype=F64)
    with torch.no_grad(), pytest.raises(ValueError, match=r"max_len \(4\)"):
        qkv_mha()(x, kv_cache=cache)
    with pytest.raises(ValueError, match=r"KVCache is for inference"):
        qkv_mha()(x, kv_cache=qkv_mha().make_kv_cache(B, 8))
