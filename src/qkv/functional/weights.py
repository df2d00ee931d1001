"""Attention weights on demand: selected heads and query rows, and per-row summaries.

``qkv.attention(..., return_weights=True)`` hands back the whole ``(B, Hq, Nq, Nk)`` matrix,
which at long lengths is the one thing that does not fit. These functions materialize only what
is asked for, streaming over key tiles as the chunked backend does (Milakov & Gimelshein, 2018,
"Online normalizer calculation for softmax"):

1. a first pass over the key tiles keeps the running row maximum and sum of the selected rows,
   giving their exact log-sum-exp ``lse``;
2. a second pass recomputes each tile's scores and turns them into probabilities
   ``exp(s - lse)``: written out (:func:`attention_weights`), or folded into per-row summaries
   (:func:`attention_summary`: the entropy ``lse - sum_j p_j s_j`` and a running top-k).

Extra memory is ``O(B * H' * R * (Nk + D))`` for ``H'`` heads and ``R`` rows of weights, and
``O(B * H * Nq * k)`` plus one tile for summaries: never ``O(Nq * Nk)``. Masks, biases, score
functions and both causal alignments are applied exactly as in :func:`qkv.attention`, from the
absolute head and position indices; the results are the probabilities before dropout, detached.

Notation: ``B`` batch, ``Hq`` query heads, ``Hkv`` key/value heads, ``Nq``/``Nk`` lengths,
``H'`` selected heads, ``R`` selected rows, ``Tk`` key tile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from qkv.request import AttentionRequest, BiasArg, CausalArg, MaskArg, build_request, stats_dtype

__all__ = ["AttentionSummary", "attention_summary", "attention_weights"]

Selection = int | slice | Sequence[int] | Tensor | None
#: Key positions per streamed tile, and query rows per block in summaries: one score tile of
#: ``B * H' * ROW_BLOCK * KEY_TILE`` float32 values (8 MiB for B * H' = 8).
KEY_TILE = 1024
ROW_BLOCK = 256


@dataclass(frozen=True)
class AttentionSummary:
    """Per-row summaries of the attention probabilities.

    Attributes:
        entropy: ``(B, H', R)`` entropy ``-sum_j p_j log p_j`` of each row, in nats (0 for a row
            with nothing to attend).
        top_weights: ``(B, H', R, k)`` the ``k`` largest probabilities of each row, descending.
        top_indices: ``(B, H', R, k)`` int64 key positions of those probabilities; ``-1`` where
            the weight is 0 (a row with fewer than ``k`` attended keys).
        heads: ``(H',)`` the query heads summarised.
        rows: ``(R,)`` the query positions summarised.
    """

    entropy: Tensor
    top_weights: Tensor
    top_indices: Tensor
    heads: Tensor
    rows: Tensor


@dataclass(frozen=True)
class _Rows:
    """The selected part of one request: scores for heads ``heads`` and query rows ``rows``."""

    request: AttentionRequest
    heads: Tensor  # (H',) int64
    rows: Tensor  # (R,) int64

    @cached_property
    def queries(self) -> Tensor:
        """The selected queries ``(B, H', R, D)``: rows first, so only they are copied."""
        return self.request.q[:, :, self.rows][:, self.heads]

    def scores(self, kv_range: tuple[int, int]) -> Tensor:
        """Masked, modified scaled scores ``(B, H', R, Tk)`` in the stats dtype."""
        r = self.request
        k = r.k[:, :, kv_range[0] : kv_range[1]][:, self.heads // r.group_size]  # (B, H', Tk, D)
        sd = stats_dtype(r.dtype)  # half inputs multiplied in float32, as every backend does
        s = (self.queries.to(sd) * r.scale) @ k.to(sd).transpose(-2, -1)  # (B, H', R, Tk)
        b = torch.arange(r.batch, device=r.device).view(-1, 1, 1, 1)
        h = self.heads.view(1, -1, 1, 1)
        i = self.rows.view(1, 1, -1, 1)
        j = torch.arange(*kv_range, device=r.device).view(1, 1, 1, -1)
        if r.bias is not None:
            s = s + self._gather(r.bias, kv_range).to(s.dtype)
        if r.score_mod is not None:
            s = r.score_mod(s, b, h, i, j)
        mask = None if r.whole_mask is None else r.evaluate_mask(b, h, i, j)
        return s if mask is None else s.masked_fill(~mask, float("-inf"))

    def _gather(self, t: Tensor, kv_range: tuple[int, int]) -> Tensor:
        """The selected heads, rows and key columns of a 4-d tensor broadcastable to
        ``(B, Hq, Nq, Nk)``, leaving its size-1 (broadcast) dims alone."""
        if t.shape[1] > 1:
            t = t[:, self.heads]
        if t.shape[2] > 1:
            t = t[:, :, self.rows]
        return t[..., kv_range[0] : kv_range[1]] if t.shape[3] > 1 else t

    def tiles(self) -> list[tuple[int, int]]:
        n = self.request.kv_len
        return [(lo, min(lo + KEY_TILE, n)) for lo in range(0, n, KEY_TILE)]

    def log_sum_exp(self) -> Tensor:
        """Pass 1: the exact ``lse (B, H', R, 1)`` of the selected rows (``+inf`` where nothing
        is attended, so that ``exp(s - lse)`` is 0 there)."""
        r = self.request
        shape = (r.batch, self.heads.numel(), self.rows.numel(), 1)
        dtype = stats_dtype(r.dtype)
        row_max = torch.full(shape, float("-inf"), dtype=dtype, device=r.device)
        total = torch.zeros(shape, dtype=dtype, device=r.device)
        for kv_range in self.tiles():
            s = self.scores(kv_range)
            new_max = torch.maximum(row_max, s.amax(dim=-1, keepdim=True))
            safe = new_max.clamp(min=torch.finfo(dtype).min)  # exp(-inf - -inf) would be NaN
            total = total * (row_max - safe).exp() + (s - safe).exp().sum(dim=-1, keepdim=True)
            row_max = new_max
        # +inf where nothing is attended; NaN (kept) where an attended score is NaN
        return torch.where((total > 0) | total.isnan(), row_max + total.log(), float("inf"))


def _index(selection: Selection, size: int, what: str, device: torch.device) -> Tensor:
    """``selection`` as a 1-d int64 tensor of indices in ``[0, size)``; None selects all.

    A slice is read as Python reads it on a sequence of ``size`` items (negative bounds count
    from the end, out-of-range bounds are clipped), so ``rows=slice(0, 5)`` means the first five.
    """
    expected = "an int, a slice, a range, a sequence of ints or a 1-d integer tensor"
    if selection is None:
        return torch.arange(size, device=device)
    if isinstance(selection, slice):
        selection = range(*selection.indices(size))
    if isinstance(selection, range | list | tuple) and len(selection) == 0:
        # An empty selection selects nothing, as indexing does (``slice(6, 2)``, ``[]``).
        return torch.empty(0, dtype=torch.long, device=device)
    try:
        index = torch.as_tensor(selection, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{what} must be {expected}; got {type(selection).__name__}") from None
    if index.dtype.is_floating_point or index.dtype == torch.bool or index.ndim > 1:
        raise TypeError(
            f"{what} must be {expected}; got a {index.dtype} tensor of shape {tuple(index.shape)}"
        )
    index = index.long().reshape(-1)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise ValueError(f"{what} must lie in [0, {size}); got {index.tolist()}")
    return index


def _select(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: Selection,
    rows: Selection,
    mask: MaskArg,
    bias: BiasArg,
    causal: CausalArg,
    scale: float | None,
) -> _Rows:
    request = build_request(q, k, v, mask=mask, bias=bias, causal=causal, scale=scale)
    return _Rows(
        request,
        _index(heads, request.q_heads, "heads", request.device),
        _index(rows, request.q_len, "rows", request.device),
    )


@torch.no_grad()
def attention_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    heads: Selection = None,
    rows: Selection = None,
    mask: MaskArg = None,
    bias: BiasArg = None,
    causal: CausalArg = False,
    scale: float | None = None,
) -> Tensor:
    """The attention probabilities of selected heads and query rows only.

    Args:
        q, k, v: as in :func:`qkv.attention` (``v`` is validated, not read).
        heads: query heads to return (an int, a slice or range, ints, or a 1-d integer
            tensor); None = all.
        rows: query positions to return, in the same forms (``slice(0, 5)`` = the first
            five); None = all.
        mask, bias, causal, scale: as in :func:`qkv.attention`.

    Returns:
        ``(B, H', R, Nk)`` probabilities (before dropout) in the input dtype, detached: equal to
        ``qkv.attention(..., return_weights=True)[1][:, heads][:, :, rows]``. Rows with nothing
        to attend are zeros.

    Raises:
        TypeError, ValueError: as :func:`qkv.attention`, and for heads or rows out of range.
    """
    part = _select(q, k, v, heads, rows, mask, bias, causal, scale)
    lse = part.log_sum_exp()
    r = part.request
    out = q.new_zeros(r.batch, part.heads.numel(), part.rows.numel(), r.kv_len)
    for kv_range in part.tiles():
        scores = part.scores(kv_range)
        # A masked key weighs 0 even in a NaN row (lse NaN): masked scores never matter.
        weights = torch.exp(scores - lse).masked_fill_(scores == float("-inf"), 0.0)
        out[..., kv_range[0] : kv_range[1]] = weights
    return out


@torch.no_grad()
def attention_summary(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    top_k: int = 5,
    heads: Selection = None,
    rows: Selection = None,
    mask: MaskArg = None,
    bias: BiasArg = None,
    causal: CausalArg = False,
    scale: float | None = None,
) -> AttentionSummary:
    """Per-row entropy and top-k keys of the attention probabilities, in ``O(N)`` memory.

    Args:
        q, k, v: as in :func:`qkv.attention` (``v`` is validated, not read).
        top_k: how many of the largest weights per row to keep, ``1 <= top_k <= Nk``.
        heads, rows: as in :func:`attention_weights`; None = all.
        mask, bias, causal, scale: as in :func:`qkv.attention`.

    Returns:
        An :class:`AttentionSummary`; entropy and weights in the statistics dtype (float32 for
        half-precision inputs).

    Raises:
        TypeError, ValueError: as :func:`attention_weights`, and for ``top_k`` out of range.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= k.shape[-2]:
        raise ValueError(f"top_k must be an int in [1, Nk = {k.shape[-2]}]; got {top_k!r}")
    whole = _select(q, k, v, heads, rows, mask, bias, causal, scale)
    blocks = [
        _summarize_rows(_Rows(whole.request, whole.heads, whole.rows[lo : lo + ROW_BLOCK]), top_k)
        for lo in range(0, whole.rows.numel(), ROW_BLOCK)
    ]
    if not blocks:  # no rows selected
        empty = _summarize_rows(whole, top_k)
        blocks = [empty]
    entropy, weights, indices = (torch.cat(parts, dim=2) for parts in zip(*blocks, strict=True))
    return AttentionSummary(entropy, weights, indices, whole.heads, whole.rows)


def _summarize_rows(part: _Rows, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Entropy ``(B, H', R)`` and top-k weights and indices ``(B, H', R, k)`` of one block of
    rows: pass 1 for the log-sum-exp, pass 2 accumulating ``sum_j p_j s_j`` and a running
    top-k merged tile by tile."""
    lse = part.log_sum_exp()  # (B, H', R, 1)
    r = part.request
    shape = (r.batch, part.heads.numel(), part.rows.numel())
    expected = torch.zeros(shape, dtype=lse.dtype, device=r.device)  # sum_j p_j s_j
    best = torch.full((*shape, 0), float("-inf"), dtype=lse.dtype, device=r.device)
    where = torch.zeros((*shape, 0), dtype=torch.long, device=r.device)
    for kv_range in part.tiles():
        s = part.scores(kv_range)
        p = torch.exp(s - lse)
        expected += torch.where(p > 0, p * s, 0.0).sum(dim=-1)
        columns = torch.arange(*kv_range, device=r.device).expand_as(s)
        best, picked = torch.cat([best, s], dim=-1).topk(min(top_k, best.shape[-1] + s.shape[-1]))
        where = torch.cat([where, columns], dim=-1).gather(-1, picked)
    attended = ~torch.isinf(lse.squeeze(-1))  # a NaN row (lse NaN) has a NaN entropy
    entropy = torch.where(attended, lse.squeeze(-1) - expected, 0.0)
    weights = torch.exp(best - lse)
    return entropy, weights, torch.where(weights > 0, where, -1)
