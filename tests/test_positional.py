"""Positional encodings: RoPE (functional and module), sinusoidal, learned; against formulas
written out in float64, and RoPE's defining properties."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import qkv.scores
from qkv.functional.rotary import apply_rotary, rotary_frequencies, rotate_half
from qkv.nn.positional import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    alibi_slopes,
)

F64 = torch.float64


def rand(*shape: int, seed: int, dtype: torch.dtype = F64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def rope_by_complex_numbers(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Independent gold: pair (i, i + D/2) is the complex number x_i + j x_{i+D/2}, multiplied
    by exp(j p theta_i), theta_i = base^(-2i/D)."""
    D = x.shape[-1]
    theta = torch.tensor([base ** (-2 * i / D) for i in range(D // 2)], dtype=F64)
    z = torch.complex(x[..., : D // 2], x[..., D // 2 :])
    z = z * torch.polar(torch.ones_like(theta), positions.to(F64)[:, None] * theta)
    return torch.cat((z.real, z.imag), dim=-1)


# --- functional RoPE -------------------------------------------------------------------------


def test_frequencies_against_the_formula() -> None:
    cos, sin = rotary_frequencies(6, 5, base=100.0, dtype=F64)
    assert cos.shape == sin.shape == (5, 6)
    for p in range(5):
        for i in range(3):
            angle = p * 100.0 ** (-2 * i / 6)
            for col in (i, i + 3):
                assert cos[p, col].item() == pytest.approx(math.cos(angle), abs=1e-15)
                assert sin[p, col].item() == pytest.approx(math.sin(angle), abs=1e-15)
    pos = torch.tensor([[3, 0], [4, 1]])
    cos2, _ = rotary_frequencies(6, pos, base=100.0, dtype=F64)
    assert cos2.shape == (2, 2, 6)
    torch.testing.assert_close(cos2[1, 0], cos[4])


def test_apply_rotary_against_complex_rotation() -> None:
    x = rand(2, 3, 7, 8, seed=1)
    cos, sin = rotary_frequencies(8, 20, dtype=F64)
    got = apply_rotary(x, cos, sin, offset=5)
    torch.testing.assert_close(got, rope_by_complex_numbers(x, torch.arange(5, 12)))
    assert (got - x).abs().max() > 1e-2


def test_rotate_half_is_a_quarter_turn() -> None:
    x = rand(4, 6, seed=1)
    torch.testing.assert_close(rotate_half(rotate_half(x)), -x)
    torch.testing.assert_close((x * rotate_half(x)).sum(-1), torch.zeros(4, dtype=F64))


def test_scores_depend_only_on_relative_position() -> None:
    D = 16
    q, k = rand(1, 1, 1, D, seed=1), rand(1, 1, 1, D, seed=2)
    cos, sin = rotary_frequencies(D, 64, dtype=F64)

    def score(m: int, n: int) -> float:
        qm = apply_rotary(q, cos, sin, offset=m)
        kn = apply_rotary(k, cos, sin, offset=n)
        return float((qm * kn).sum())

    for delta in (0, 3, -5):
        base_score = score(20, 20 - delta)
        for m in (5, 11, 40):
            assert score(m, m - delta) == pytest.approx(base_score, abs=1e-12)
    assert abs(score(10, 7) - score(10, 4)) > 1e-3  # and it does depend on the distance


def test_rotation_preserves_norm_and_position_zero_is_identity() -> None:
    x = rand(2, 3, 9, 8, seed=1)
    cos, sin = rotary_frequencies(8, 9, dtype=F64)
    rotated = apply_rotary(x, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rotated[:, :, 0], x[:, :, 0])


def test_offset_equals_explicit_positions() -> None:
    x = rand(2, 3, 4, 8, seed=1)
    cos, sin = rotary_frequencies(8, 16, dtype=F64)
    by_offset = apply_rotary(x, cos, sin, offset=6)
    by_positions = apply_rotary(x, cos, sin, positions=torch.arange(6, 10))
    torch.testing.assert_close(by_positions, by_offset)
    per_row = torch.stack([torch.arange(6, 10), torch.arange(0, 4)])  # (B, N)
    mixed = apply_rotary(x, cos, sin, positions=per_row)
    torch.testing.assert_close(mixed[0], by_offset[0])
    torch.testing.assert_close(mixed[1], apply_rotary(x, cos, sin)[1])


def test_half_precision_input_keeps_its_dtype() -> None:
    x = rand(1, 2, 5, 8, seed=1, dtype=torch.float32)
    cos, sin = rotary_frequencies(8, 5)
    got = apply_rotary(x.half(), cos, sin)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), apply_rotary(x, cos, sin), rtol=2e-3, atol=2e-3)


def test_rotary_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"head_dim must be even .* head_dim=7"):
        rotary_frequencies(7, 4)
    with pytest.raises(ValueError, match=r"base must be > 0"):
        rotary_frequencies(8, 4, base=0.0)
    cos, sin = rotary_frequencies(8, 4)
    with pytest.raises(ValueError, match=r"head_dim must be even .* head_dim=7"):
        apply_rotary(torch.randn(1, 1, 2, 7), cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match=r"x must have shape \(B, H, N, D\)"):
        apply_rotary(torch.randn(2, 8), cos, sin)
    with pytest.raises(ValueError, match=r"tables' dim \(8\) must equal x's head dim D \(6\)"):
        apply_rotary(torch.randn(1, 1, 2, 6), cos, sin)
    with pytest.raises(ValueError, match=r"cover 4 positions .* \(offset=3, N=2\)"):
        apply_rotary(torch.randn(1, 1, 2, 8), cos, sin, offset=3)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 4\)"):
        apply_rotary(torch.randn(1, 1, 2, 8), cos, sin, positions=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"either offset or positions"):
        apply_rotary(torch.randn(1, 1, 2, 8), cos, sin, offset=1, positions=torch.tensor([0, 1]))


# --- RotaryEmbedding -------------------------------------------------------------------------


def test_rotary_module_grows_and_matches_functional() -> None:
    rope = RotaryEmbedding(8, base=500.0, max_positions=4)
    q, k = rand(2, 4, 3, 8, seed=1), rand(2, 2, 3, 8, seed=2)
    q_rot, k_rot = rope(q, k, offset=10)  # positions 10..12, past the 4 precomputed
    torch.testing.assert_close(q_rot, rope_by_complex_numbers(q, torch.arange(10, 13), 500.0))
    torch.testing.assert_close(k_rot, rope_by_complex_numbers(k, torch.arange(10, 13), 500.0))
    assert rope.tables(13, device=q.device, dtype=F64)[0].shape[0] >= 13
    assert dict(rope.state_dict()) == {}  # a cache, not state


def test_rotary_module_float32_tables_for_half_inputs() -> None:
    rope = RotaryEmbedding(8).half()  # .half() must not round the tables
    cos, _ = rope.tables(4, device=torch.device("cpu"), dtype=torch.float16)
    assert cos.dtype == torch.float32
    x = rand(1, 1, 4, 8, seed=1, dtype=torch.float32)
    assert rope.rotate(x.half()).dtype == torch.float16


def test_tables_grown_in_inference_mode_still_serve_training() -> None:
    """Decoding under inference_mode grows the cached tables; training afterwards must still
    backpropagate through them (autograd refuses to save inference tensors)."""
    rope, pe = RotaryEmbedding(8, max_positions=2), SinusoidalPositionalEncoding(8, max_len=2)
    with torch.inference_mode():
        rope.rotate(rand(1, 1, 6, 8, seed=1))
        pe(rand(1, 6, 8, seed=2))
    assert rope.tables(6, device=torch.device("cpu"), dtype=F64)[0].shape[0] >= 6
    assert pe.pe.shape[0] >= 6
    x = rand(1, 2, 6, 8, seed=3).requires_grad_()
    rope.rotate(x).square().sum().backward()
    y = rand(1, 6, 8, seed=4).requires_grad_()
    (pe(y) * y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_rotary_module_errors() -> None:
    with pytest.raises(ValueError, match=r"head_dim=5"):
        RotaryEmbedding(5)
    with pytest.raises(ValueError, match=r"max_positions"):
        RotaryEmbedding(8, max_positions=0)
    with pytest.raises(ValueError, match=r"offset must be an int >= 0; got offset=-1"):
        RotaryEmbedding(8).rotate(torch.randn(1, 1, 2, 8), offset=-1)


# --- sinusoidal and learned ------------------------------------------------------------------


@pytest.mark.parametrize("dim", [6, 7])
def test_sinusoidal_against_the_formula(dim: int) -> None:
    pe = SinusoidalPositionalEncoding(dim, max_len=16)
    x = rand(2, 5, dim, seed=1)
    added = pe(x, offset=3) - x  # (B, N, dim)
    for n in range(5):
        p = 3 + n
        for c in range(dim):
            angle = p / 10000 ** ((c - c % 2) / dim)
            want = math.sin(angle) if c % 2 == 0 else math.cos(angle)
            assert added[0, n, c].item() == pytest.approx(want, abs=1e-6)
    torch.testing.assert_close(added[0], added[1])


def test_sinusoidal_offset_growth_state_and_dtype() -> None:
    pe = SinusoidalPositionalEncoding(8, max_len=4)
    x = rand(1, 10, 8, seed=1)
    whole = pe(x)  # grows past max_len=4
    assert pe.pe.shape[0] >= 10
    torch.testing.assert_close(pe(x[:, 6:], offset=6), whole[:, 6:])
    assert "pe" not in pe.state_dict()
    assert pe(x.float()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, dim\) with dim=8"):
        pe(torch.randn(2, 3, 5))


def test_learned_embedding_adds_rows_and_refuses_past_max_len() -> None:
    torch.manual_seed(0)
    emb = LearnedPositionalEmbedding(6, 4).double()
    x = rand(2, 3, 4, seed=1)
    torch.testing.assert_close(emb(x, offset=2) - x, emb.weight[2:5].expand(2, 3, 4))
    assert "weight" in emb.state_dict()
    emb(x).sum().backward()
    assert emb.weight.grad is not None
    torch.testing.assert_close(emb.weight.grad[:3], torch.full((3, 4), 2.0, dtype=F64))
    torch.testing.assert_close(emb.weight.grad[3:], torch.zeros(3, 4, dtype=F64))
    with pytest.raises(
        ValueError, match=r"positions 4 .. 6 \(offset=4, N=3\) exceed max_len \(6\)"
    ):
        emb(x, offset=4)
    with pytest.raises(ValueError, match=r"max_len must be a positive int"):
        LearnedPositionalEmbedding(0, 4)


def test_alibi_slopes_reexported() -> None:
    assert alibi_slopes is qkv.scores.alibi_slopes
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
