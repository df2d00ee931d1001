"""Length-bucketed, seeded batch sampling (no tokenizer needed)."""

from __future__ import annotations

import random

import pytest

from qkv.data import BucketBatchSampler, PairDataset, collate_pairs


def test_bucket_sampler_is_seeded_complete_and_groups_lengths() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(1_000)]
    sampler = BucketBatchSampler(lengths, batch_size=32, seed=7, pool_size=256)
    batches = list(sampler)
    assert batches == list(BucketBatchSampler(lengths, batch_size=32, seed=7, pool_size=256))
    assert sorted(i for b in batches for i in b) == list(range(1_000))
    assert all(len(b) <= 32 for b in batches)

    # Bucketing pads far less than batching in random order.
    def padded(batches: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    order = list(range(1_000))
    rng.shuffle(order)
    unbucketed = [order[i : i + 32] for i in range(0, 1_000, 32)]
    assert padded(batches) < 1.2 * sum(lengths) < 0.7 * padded(unbucketed)
    sampler.set_epoch(1)
    assert list(sampler) != batches
    assert list(BucketBatchSampler(lengths, batch_size=32, seed=8, pool_size=256)) != batches


def test_bucket_sampler_token_budget_and_replicas() -> None:
    lengths = [5] * 10 + [50] * 10 + [500]
    budget = BucketBatchSampler(lengths, batch_size=100, max_tokens=100, shuffle=False)
    batches = budget.batches()
    assert all(len(b) * max(lengths[i] for i in b) <= 100 for b in batches if len(b) > 1)
    assert [20] in batches  # longer than the budget: a batch of its own
    ranks = [
        BucketBatchSampler(lengths, batch_size=3, seed=1, num_replicas=2, rank=r).batches()
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1])
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler(lengths, batch_size=3, num_replicas=2, rank=2)


def test_collate_pads_without_a_tokenizer() -> None:
    data = PairDataset([[5, 6, 2], [7, 2]], [[1, 8, 2], [1, 9, 9, 9, 2]])
    batch = collate_pairs([data[1], data[0]])
    assert batch.source.tolist() == [[7, 2, 0], [5, 6, 2]]
    assert batch.target_lengths.tolist() == [5, 3]
    assert batch.index.tolist() == [1, 0]
    assert data.lengths() == [3, 5]
    with pytest.raises(ValueError, match="must align"):
        PairDataset([[1]], [])
