"""KVCache: the shape contract, views of the filled prefix, reset, and its errors."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from qkv.nn.kv_cache import KVCache

B, H, D, DV = 2, 3, 4, 5


def rand(*shape: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def test_update_appends_and_returns_views_of_the_prefix() -> None:
    cache = KVCache(B, H, 8, D, DV)
    assert len(cache) == 0 and cache.k.shape == (B, H, 8, D) and cache.v.shape == (B, H, 8, DV)
    k1, v1 = rand(B, H, 3, D, seed=1), rand(B, H, 3, DV, seed=2)
    k2, v2 = rand(B, H, 1, D, seed=3), rand(B, H, 1, DV, seed=4)
    cache.update(k1, v1)
    k_all, v_all = cache.update(k2, v2)
    assert len(cache) == 4
    torch.testing.assert_close(k_all, torch.cat((k1, k2), dim=2))
    torch.testing.assert_close(v_all, torch.cat((v1, v2), dim=2))
    assert k_all.data_ptr() == cache.k.data_ptr() and v_all.data_ptr() == cache.v.data_ptr()
    torch.testing.assert_close(cache.keys, k_all)


def test_reset_forgets_and_reuses_the_buffers() -> None:
    cache = KVCache(B, H, 4, D)
    cache.update(rand(B, H, 4, D, seed=1), rand(B, H, 4, D, seed=2))
    cache.reset()
    assert len(cache) == 0 and cache.keys.shape == (B, H, 0, D)
    k = rand(B, H, 2, D, seed=3)
    k_all, _ = cache.update(k, rand(B, H, 2, D, seed=4))
    torch.testing.assert_close(k_all, k)


def test_overflow_names_max_len_and_sizes() -> None:
    cache = KVCache(B, H, 5, D)
    cache.update(rand(B, H, 4, D, seed=1), rand(B, H, 4, D, seed=2))
    with pytest.raises(ValueError, match=r"4 cached \+ 2 new = 6 tokens exceed max_len \(5\)"):
        cache.update(rand(B, H, 2, D, seed=3), rand(B, H, 2, D, seed=4))
    assert len(cache) == 4  # a refused update changes nothing


def test_update_errors_name_the_argument() -> None:
    cache = KVCache(B, H, 5, D, DV)
    k, v = rand(B, H, 1, D, seed=1), rand(B, H, 1, DV, seed=2)
    with pytest.raises(ValueError, match=r"k must have shape \(B, Hkv, n, D\) = \(2, 3, n, 4\)"):
        cache.update(k[:, :2], v)
    with pytest.raises(ValueError, match=r"v must have shape \(B, Hkv, n, Dv\) = \(2, 3, n, 5\)"):
        cache.update(k, rand(B, H, 1, D, seed=3))
    with pytest.raises(ValueError, match=r"same number of new tokens"):
        cache.update(k, rand(B, H, 2, DV, seed=3))
    with pytest.raises(TypeError, match=r"cache's dtype torch.float32; got k torch.float64"):
        cache.update(k.double(), v)
    with pytest.raises(ValueError, match=r"KVCache is for inference"):
        cache.update(k.requires_grad_(), v)
    with pytest.raises(ValueError, match=r"max_len must be a positive int; got max_len=0"):
        KVCache(B, H, 0, D)
