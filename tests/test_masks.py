"""Each built-in mask and score modifier against an explicit double loop over (b, h, i, j)."""

from __future__ import annotations

import torch
from pytest import approx
from torch import Tensor

from qkv import masks, scores
from qkv.masks import index_grid


def evaluate(mask: masks.MaskFn, B: int, H: int, Nq: int, Nk: int) -> Tensor:
    out = mask(*index_grid(B, H, (0, Nq), (0, Nk)))
    return out.expand(B, H, Nq, Nk)


def by_loop(rule, B: int, H: int, Nq: int, Nk: int) -> Tensor:  # type: ignore[no-untyped-def]
    out = torch.zeros(B, H, Nq, Nk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(Nq):
                for j in range(Nk):
                    out[b, h, i, j] = bool(rule(b, h, i, j))
    return out


def test_causal_alignments() -> None:
    assert torch.equal(
        evaluate(masks.causal_top_left(), 1, 1, 3, 5),
        by_loop(lambda b, h, i, j: j <= i, 1, 1, 3, 5),
    )
    assert torch.equal(
        evaluate(masks.causal_bottom_right(3, 5), 1, 1, 3, 5),
        by_loop(lambda b, h, i, j: j <= i + 2, 1, 1, 3, 5),
    )


def test_sliding_window_both_sides() -> None:
    want = by_loop(lambda b, h, i, j: i - 3 <= j <= i + 1, 1, 1, 9, 9)
    assert torch.equal(evaluate(masks.sliding_window(3, 1), 1, 1, 9, 9), want)


def test_padding_from_lengths() -> None:
    lengths = torch.tensor([2, 5, 0])
    want = by_loop(lambda b, h, i, j: j < lengths[b], 3, 2, 4, 5)
    assert torch.equal(evaluate(masks.key_padding(lengths), 3, 2, 4, 5), want)
    want = by_loop(lambda b, h, i, j: i < lengths[b], 3, 2, 4, 5)
    assert torch.equal(evaluate(masks.query_padding(lengths), 3, 2, 4, 5), want)


def test_document_ids_per_batch_and_shared() -> None:
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 2]])
    want = by_loop(lambda b, h, i, j: ids[b, i] == ids[b, j], 2, 1, 6, 6)
    assert torch.equal(evaluate(masks.document(ids), 2, 1, 6, 6), want)
    shared = masks.document(ids[0])
    assert torch.equal(
        evaluate(shared, 2, 1, 6, 6), by_loop(lambda b, h, i, j: ids[0, i] == ids[0, j], 2, 1, 6, 6)
    )


def test_prefix_lm_int_and_per_batch() -> None:
    want = by_loop(lambda b, h, i, j: j < 3 or j <= i, 1, 1, 6, 6)
    assert torch.equal(evaluate(masks.prefix_lm(3), 1, 1, 6, 6), want)
    lengths = torch.tensor([1, 4])
    want = by_loop(lambda b, h, i, j: j < lengths[b] or j <= i, 2, 1, 6, 6)
    assert torch.equal(evaluate(masks.prefix_lm(lengths), 2, 1, 6, 6), want)


def test_composition_and_names() -> None:
    combined = masks.causal() & masks.sliding_window(2) | ~masks.key_padding([3])
    want = by_loop(lambda b, h, i, j: (j <= i and i - 2 <= j) or not j < 3, 1, 1, 6, 6)
    assert torch.equal(evaluate(combined, 1, 1, 6, 6), want)
    assert (
        repr(masks.causal() & masks.sliding_window(256))
        == "(causal() & sliding_window(left=256, right=0))"
    )
    assert repr(~masks.causal(offset=2)) == "~causal(offset=2)"


def test_dense_tensor_as_mask_function() -> None:
    dense = torch.rand(2, 1, 4, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    assert torch.equal(evaluate(masks.dense(dense), 2, 3, 4, 6), dense.expand(2, 3, 4, 6))


def test_plain_callable_becomes_composable() -> None:
    def even_keys(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return kv % 2 == 0

    m = masks.mask_function(even_keys) & masks.causal()
    assert repr(m) == "(even_keys & causal())"
    assert torch.equal(
        evaluate(m, 1, 1, 4, 4), by_loop(lambda b, h, i, j: j % 2 == 0 and j <= i, 1, 1, 4, 4)
    )


def test_alibi_matches_paper_on_causal_part() -> None:
    slopes = scores.alibi_slopes(8)
    assert torch.allclose(slopes, torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    s = torch.randn(1, 8, 5, 5, dtype=torch.float64)
    got = scores.alibi(8)(s, *index_grid(1, 8, (0, 5), (0, 5)))
    for h in range(8):
        for i in range(5):
            for j in range(i + 1):
                assert got[0, h, i, j].item() == approx(
                    s[0, h, i, j].item() + slopes[h].item() * (j - i)
                )


def test_alibi_slopes_non_power_of_two() -> None:
    slopes = scores.alibi_slopes(12)
    assert slopes.shape == (12,)
    assert torch.equal(slopes[:8], scores.alibi_slopes(8))
    assert torch.allclose(slopes[8:], scores.alibi_slopes(16)[0::2][:4])


def test_softcap_bounds_and_identity_near_zero() -> None:
    s = torch.randn(2, 2, 3, 3, dtype=torch.float64) * 100
    capped = scores.softcap(5.0)(s, *index_grid(2, 2, (0, 3), (0, 3)))
    assert capped.abs().max() <= 5.0
    assert (capped.abs() < s.abs()).all()
    small = torch.full((1,), 1e-4, dtype=torch.float64)
    assert scores.softcap(5.0)(small, *index_grid(1, 1, (0, 1), (0, 1))).item() == approx(1e-4)


def test_relative_bias_lookup_and_chain_additivity() -> None:
    rel = scores.RelativePositionBias(2, max_distance=2)
    with torch.no_grad():
        rel.table.copy_(torch.arange(10, dtype=torch.float32).view(2, 5))
    got = rel(torch.zeros(()), *index_grid(1, 2, (0, 4), (0, 4)))
    want = by_loop(lambda b, h, i, j: 0, 1, 2, 4, 4).float()
    for h in range(2):
        for i in range(4):
            for j in range(4):
                want[0, h, i, j] = h * 5 + max(-2, min(2, j - i)) + 2
    assert torch.equal(got, want)
    assert scores.chain(scores.alibi(2), rel).additive
    assert not scores.chain(rel, scores.softcap(3.0)).additive


# --- tile classification ---------------------------------------------------------------------


def true_states(mask: masks.MaskFn, B: int, Nq: int, Nk: int, tq: int, tk: int) -> Tensor:
    """Tile states by evaluating every entry: (nQ, nK) int8, over every batch entry."""
    dense = evaluate(mask, B, 1, Nq, Nk)
    out = torch.empty(-(-Nq // tq), -(-Nk // tk), dtype=torch.int8)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            tile = dense[:, :, i * tq : (i + 1) * tq, j * tk : (j + 1) * tk]
            out[i, j] = (
                masks.FULL if tile.all() else masks.EMPTY if not tile.any() else masks.PARTIAL
            )
    return out


def bounds(n: int, tile: int) -> Tensor:
    return torch.tensor([*range(0, n, tile), n])


def classification_cases(seed: int) -> list[tuple[masks.MaskFn, bool]]:
    """(mask, whether its classification is exact) over two batch entries, 23 x 29 positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.sort(torch.randint(0, 4, (2, 29), generator=g), dim=-1).values
    shuffled = ids[:, torch.randperm(29, generator=g)]
    key_lengths = torch.randint(0, 30, (2,), generator=g)
    query_lengths = torch.randint(0, 24, (2,), generator=g)
    window = masks.sliding_window(5, 2, offset=3)
    return [
        (masks.causal(), True),
        (masks.causal_bottom_right(23, 29), True),
        (window, True),
        (masks.key_padding(key_lengths), True),
        (masks.query_padding(query_lengths), True),
        (masks.document(ids[:, :23], ids), True),
        (masks.document(shuffled[:, :23], shuffled), False),
        (masks.prefix_lm(key_lengths), False),
        (masks.prefix_lm(7), False),
        (window & masks.causal(), False),
        (masks.key_padding(key_lengths) | masks.causal(offset=-4), False),
        (~window, True),
        (masks.document(ids[:, :23], ids) & ~masks.causal(offset=-2), False),
    ]


def test_built_in_masks_classify_tiles_from_index_ranges() -> None:
    # FULL and EMPTY must be true of every entry of the tile in every batch entry; for the
    # exact classifiers PARTIAL must be, too; the others may only err towards PARTIAL.
    for seed in range(3):
        for mask, exact in classification_cases(seed):
            for tq, tk in ((4, 8), (5, 3), (23, 29), (1, 7)):
                got = masks.classify_tiles(mask, bounds(23, tq), bounds(29, tk))
                want = true_states(mask, 2, 23, 29, tq, tk)
                assert got.shape == want.shape and got.dtype == torch.int8, mask
                assert not (got == masks.UNKNOWN).any(), mask
                decided = got != masks.PARTIAL
                assert torch.equal(got[decided], want[decided]), (mask, tq, tk)
                if exact:
                    assert torch.equal(got, want), (mask, tq, tk)


def test_user_mask_functions_are_unknown_and_combinations_keep_what_is_known() -> None:
    def near(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (q - kv).abs() < 3

    q_bounds, kv_bounds = bounds(16, 4), bounds(16, 4)
    assert (masks.classify_tiles(near, q_bounds, kv_bounds) == masks.UNKNOWN).all()
    both = masks.classify_tiles(masks.causal() & near, q_bounds, kv_bounds)
    causal = masks.classify_tiles(masks.causal(), q_bounds, kv_bounds)
    # Tiles causal hides stay EMPTY; the rest must be evaluated.
    assert torch.equal(both == masks.EMPTY, causal == masks.EMPTY)
    assert torch.equal(both == masks.UNKNOWN, causal != masks.EMPTY)
    either = masks.classify_tiles(masks.causal() | near, q_bounds, kv_bounds)
    assert torch.equal(either == masks.FULL, causal == masks.FULL)
