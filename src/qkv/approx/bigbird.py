r"""BigBird-style block-sparse patterns as :mod:`qkv.masks` mask functions (exact on a subset).

Zaheer et al., "Big Bird: Transformers for Longer Sequences" (NeurIPS 2020). The sequence is cut
into blocks of ``block_size`` tokens; a query block attends to

- a window of ``window_blocks`` blocks centred on itself (local),
- the first ``global_blocks`` blocks, which also attend to everything (global),
- ``random_blocks`` further blocks drawn per query block from a seeded generator (random).

Unlike the kernel approximations, the attention over the kept pairs is exact: the pattern is a
:class:`~qkv.masks.MaskFn` with a tile classifier, so :func:`qkv.attention` runs it on the exact
kernels and a tiled backend skips whole tiles outside it. The approximation is which pairs are
dropped. A window covering the whole sequence is exact attention.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qkv import masks
from qkv.approx._common import check_positive
from qkv.functional.attention import attention
from qkv.masks import MaskFn
from qkv.request import CausalArg

__all__ = [
    "bigbird_attention",
    "bigbird_blocks",
    "bigbird_mask",
    "bigbird_rows",
    "local_attention",
    "local_rows",
    "pattern_rows",
]


def bigbird_blocks(
    num_blocks: int,
    *,
    window_blocks: int = 3,
    global_blocks: int = 1,
    random_blocks: int = 2,
    seed: int = 0,
) -> Tensor:
    """The block layout: bool ``(nb, nb)``, True where query block ``i`` attends key block ``j``.

    Args:
        num_blocks: ``nb``.
        window_blocks: blocks of the local window, odd (itself and ``(w - 1) / 2`` each side).
        global_blocks: leading blocks that attend and are attended everywhere (0 for none).
        random_blocks: extra blocks per non-global query block, drawn without replacement among
            those not already attended (fewer if not enough remain).
        seed: of the random blocks.
    """
    name = "bigbird_blocks"
    check_positive(name, "num_blocks", num_blocks)
    check_positive(name, "window_blocks", window_blocks)
    if window_blocks % 2 == 0:
        raise ValueError(f"{name}: window_blocks must be odd; got window_blocks={window_blocks}")
    for what, value in (("global_blocks", global_blocks), ("random_blocks", random_blocks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: {what} must be an int >= 0; got {what}={value!r}")
    i = torch.arange(num_blocks)
    table = (i[:, None] - i[None, :]).abs() <= window_blocks // 2  # (nb, nb)
    table[:global_blocks, :] = True
    table[:, :global_blocks] = True
    generator = torch.Generator().manual_seed(seed)
    for row in range(global_blocks, num_blocks):
        free = (~table[row]).nonzero().flatten()
        chosen = free[torch.randperm(free.numel(), generator=generator)[:random_blocks]]
        table[row, chosen] = True
    return table


def bigbird_mask(
    seq_len: int,
    *,
    block_size: int = 64,
    window_blocks: int = 3,
    global_blocks: int = 1,
    random_blocks: int = 2,
    seed: int = 0,
) -> MaskFn:
    """A BigBird pattern over ``seq_len`` positions as a mask function (see
    :func:`bigbird_blocks` for the arguments). Positions past ``seq_len`` follow the last
    block. Tiles are classified from the block table by 2-d prefix sums, ``O(tiles)``."""
    check_positive("bigbird_mask", "seq_len", seq_len)
    check_positive("bigbird_mask", "block_size", block_size)
    nb = -(-seq_len // block_size)
    table = bigbird_blocks(
        nb,
        window_blocks=window_blocks,
        global_blocks=global_blocks,
        random_blocks=random_blocks,
        seed=seed,
    )
    on = torch.zeros(nb + 1, nb + 1, dtype=torch.long)
    on[1:, 1:] = table.long().cumsum(0).cumsum(1)  # on[i, j] = blocks on in [0, i) x [0, j)

    def pattern(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        lookup = table.to(q.device)
        return lookup[(q // block_size).clamp(max=nb - 1), (kv // block_size).clamp(max=nb - 1)]

    def tiles(q_bounds: Tensor, kv_bounds: Tensor) -> Tensor:
        q_lo = (q_bounds[:-1] // block_size).clamp(max=nb - 1)[:, None]
        q_hi = ((q_bounds[1:] - 1) // block_size).clamp(max=nb - 1)[:, None] + 1
        k_lo = (kv_bounds[:-1] // block_size).clamp(max=nb - 1)[None, :]
        k_hi = ((kv_bounds[1:] - 1) // block_size).clamp(max=nb - 1)[None, :] + 1
        count = on[q_hi, k_hi] - on[q_lo, k_hi] - on[q_hi, k_lo] + on[q_lo, k_lo]  # (nQ, nK)
        area = (q_hi - q_lo) * (k_hi - k_lo)
        state = torch.full(count.shape, masks.PARTIAL, dtype=torch.int8)
        state[count == area] = masks.FULL
        state[count == 0] = masks.EMPTY
        return state

    name = (
        f"bigbird(block_size={block_size}, window_blocks={window_blocks}, "
        f"global_blocks={global_blocks}, random_blocks={random_blocks}, seed={seed})"
    )
    return MaskFn(pattern, name, tiles)


def _right_padded_lengths(mask: Tensor) -> Tensor | None:
    """``(B,)`` lengths when ``mask (B, 1, 1, Nk)`` is True exactly on a prefix of each row."""
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.dtype != torch.bool:
        return None
    rows = mask[:, 0, 0, :]  # (B, Nk)
    lengths = rows.sum(dim=-1)
    prefix = torch.arange(rows.shape[-1], device=rows.device)[None, :] < lengths[:, None]
    return lengths.cpu() if torch.equal(prefix, rows) else None


def _with_user_mask(pattern: MaskFn, mask: Tensor | masks.MaskFunction | None) -> MaskFn:
    if mask is None:
        return pattern
    if isinstance(mask, Tensor):
        if mask.ndim == 2:  # (B, Nk) key padding, as every qkv.approx method takes it
            mask = mask[:, None, None, :]
        lengths = _right_padded_lengths(mask)
        if lengths is not None:  # index arithmetic and tile skipping instead of a lookup
            return masks.key_padding(lengths) & pattern
        return masks.dense(mask, "mask") & pattern
    return masks.mask_function(mask) & pattern


def bigbird_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | masks.MaskFunction | None = None,
    causal: CausalArg = False,
    block_size: int = 64,
    window_blocks: int = 3,
    global_blocks: int = 1,
    random_blocks: int = 2,
    seed: int = 0,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Exact attention restricted to a BigBird pattern (:func:`bigbird_mask`).

    Args:
        q: ``(B, Hq, Nq, D)``; k ``(B, Hkv, Nk, D)``; v ``(B, Hkv, Nk, Dv)`` (any GQA ratio).
        mask: a key padding mask ``(B, Nk)`` (as the other approximations take it), or any
            :func:`qkv.attention` mask of 4 dims or a mask function; combined by logical and.
        causal: as :func:`qkv.attention`, combined with the pattern.
        block_size, window_blocks, global_blocks, random_blocks, seed: the pattern, over
            ``max(Nq, Nk)`` positions.
        backend: the :func:`qkv.attention` backend.

    Returns:
        ``(B, Hq, Nq, Dv)``.
    """
    if not isinstance(q, Tensor) or not isinstance(k, Tensor) or q.ndim != 4 or k.ndim != 4:
        raise TypeError("bigbird_attention: q and k must be 4-d tensors (B, H, N, D)")
    pattern = bigbird_mask(
        max(q.shape[2], k.shape[2]),
        block_size=block_size,
        window_blocks=window_blocks,
        global_blocks=global_blocks,
        random_blocks=random_blocks,
        seed=seed,
    )
    return attention(
        q, k, v, mask=_with_user_mask(pattern, mask), causal=causal, scale=scale, backend=backend
    )


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | masks.MaskFunction | None = None,
    causal: CausalArg = False,
    window: int = 128,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Exact attention within ``window`` tokens on each side (``qkv.masks.sliding_window``;
    with ``causal``, only the ``window`` before). A window of ``N - 1`` or more is exact
    attention.

    Args:
        q, k, v, causal, scale, backend: as :func:`qkv.attention`.
        mask: as :func:`bigbird_attention`'s.
        window: keys at distance ``<= window`` are attended.

    Returns:
        ``(B, Hq, Nq, Dv)``.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"local_attention: window must be an int >= 0; got window={window!r}")
    pattern = masks.sliding_window(window, window)
    return attention(
        q, k, v, mask=_with_user_mask(pattern, mask), causal=causal, scale=scale, backend=backend
    )


def pattern_rows(pattern: MaskFn, q: Tensor, k: Tensor, keep: Tensor | None) -> Tensor:
    """Exact softmax rows ``(B, H, Nq, Nk)`` over the pairs ``pattern`` allows (and ``keep
    (B, Nk)``, True = real key): what ``local`` and ``bigbird`` compute."""
    s = q.shape[-1] ** -0.5
    b, h, qi, ki = masks.index_grid(1, 1, (0, q.shape[2]), (0, k.shape[2]))
    allowed = pattern(b, h, qi, ki)
    if keep is not None:
        allowed = allowed & keep[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) * s).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1)


def local_rows(q: Tensor, k: Tensor, knob: int, keep: Tensor | None) -> Tensor:
    """The rows of ``local`` with ``window=knob``."""
    return pattern_rows(masks.sliding_window(knob, knob), q, k, keep)


def bigbird_rows(q: Tensor, k: Tensor, knob: int, keep: Tensor | None) -> Tensor:
    """The rows of ``bigbird`` with ``block_size=knob``."""
    pattern = bigbird_mask(max(q.shape[2], k.shape[2]), block_size=knob)
    return pattern_rows(pattern, q, k, keep)
