"""The chunked backend: exact attention by online softmax over query and key tiles.

This is the FlashAttention-2 algorithm (Dao, 2023, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning") written with PyTorch ops, on any device. For each tile of
``tile_q`` queries it walks the key tiles, keeping a running row maximum ``m``, a running sum
``l`` and an unnormalised output, rescaled whenever the maximum grows: the online softmax of
Milakov & Gimelshein (2018, "Online normalizer calculation for softmax"). The output is exact; no
``(Nq, Nk)`` matrix ever exists.

Notation: ``B`` batch, ``Hq`` query heads, ``Hkv`` key/value heads, ``G = Hq // Hkv`` the group
size, ``Nq``/``Nk`` sequence lengths, ``D``/``Dv`` head dims, ``Tq``/``Tk`` tile sizes.

Layering (as in the Triton fused-attention tutorial): tile kernels (``_forward``, ``_backward``,
``_weights``) -> :class:`_ChunkedAttention`, the ``autograd.Function`` that saves only
``q, k, v, out`` and the log-sum-exp ``(B, Hq, Nq)`` -> :func:`chunked_attention`, which plans a
call -> :class:`ChunkedBackend`.

What it does, and why:

- **Tiles over positions only.** A score tile is ``(B, Hq, Tq, Tk)``: batch and heads go through
  one matmul, so the Python loop has ``ceil(Nq / Tq) * ceil(Nk / Tk)`` iterations at most.
- **Grouped heads without copies.** The ``G`` query heads of a key/value head are folded into the
  rows of one matmul (``(B, Hkv, G * Tq, D) @ (B, Hkv, D, Tk)``, as
  :func:`qkv.backends.reference.grouped_matmul`); in backward the same fold makes the matmuls for
  dK and dV sum over the group.
- **Masks and score functions per tile**, through ``request.mask_tile`` and
  ``request.modify_scores``, so every mask kind, bias tensors, both causal alignments, ALiBi,
  softcap and learnable biases work. A :class:`~qkv.backends.block_mask.BlockMask` summarises the
  mask once per call: EMPTY tiles are skipped (causal halves the work, a sliding window of ``W``
  makes it ``O(N * W)``), FULL tiles never evaluate the mask. Built-in masks and their
  combinations classify their tiles from index ranges (``O(tiles)``); a mask function of your own
  costs one cheap evaluation per ``(q, kv)`` pair: build the block mask once with
  :func:`build_block_mask` and pass it as ``mask=`` to pay that once for many calls.
- **Memory.** Forward keeps one score tile and per-row statistics; backward recomputes each tile
  from ``q, k, v`` and the log-sum-exp (FlashAttention-2's backward: ``dS = P * (dP - D_i)`` with
  ``D_i = rowsum(dO * O)``). Extra memory is ``O(B * H * N * D)`` plus a few tiles, never
  ``O(Nq * Nk)``; ``return_weights=True`` is the one exception, because it asks for that matrix.
- **Learnable biases without N^2 memory.** Tensors a score function depends on (a
  :class:`~qkv.scores.RelativePositionBias` table, any closed-over tensor requiring grad) become
  inputs of the autograd function; backward rebuilds each modified score tile under
  ``torch.enable_grad`` and pulls ``dS`` through it with ``torch.autograd.grad``, tile by tile.
  A bias tensor's gradient is accumulated slice by slice.
- **Numerics.** The backward's ``dQ``, ``dK`` and ``dV`` matmuls run in the input dtype (as
  fused kernels do); ``q k^T`` runs in ``stats_dtype`` (float32 for half inputs, as fused
  kernels accumulate and keep their scores: float16 logits past 65504 stay finite), and so do
  the forward's un-normalised ``P V`` (a float16 tile of 512 keys of value 130 would overflow
  to ``inf``) and ``dP = dO V^T`` in backward, which must agree with ``D_i`` to float32
  rounding; the softmax statistics, the running output and the gradient accumulators are in
  ``stats_dtype`` too (float32 for float16 and bfloat16, whose mantissas would lose the small
  terms of long sums). A fully masked row keeps
  ``m = -inf`` and ``l = 0``: its output is 0, its log-sum-exp ``+inf``, so backward recomputes
  probabilities ``exp(s - lse) = 0`` and its gradients are exactly zero, never NaN.
- **Dropout** is reproducible: each call draws a seed from PyTorch's default CPU generator (so
  ``torch.manual_seed(s)`` fixes it; :func:`chunked_attention` also takes ``dropout_seed=``), and
  tile ``(i, j)`` draws its keep-mask from a generator seeded with ``(seed, i, j)``, so backward
  regenerates exactly the mask forward used without storing it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from qkv.backends.block_mask import (
    BlockMask,
    block_mask_for,
    build_block_mask,
    default_tile_sizes,
)
from qkv.backends.reference import reference_attention_lse, reference_gradients
from qkv.request import AttentionRequest, stats_dtype
from qkv.scores import is_additive

__all__ = [
    "BlockMask",
    "ChunkedBackend",
    "TileCounters",
    "build_block_mask",
    "chunked_attention",
    "chunked_attention_lse",
    "default_tile_sizes",
]


@dataclass
class TileCounters:
    """Score tiles computed, by pass, to observe what the block mask saves.

    Attributes:
        forward: tiles computed by forward passes.
        backward: tiles recomputed by backward passes.
        weights: tiles recomputed to return the attention weights.
        masked: of all those, tiles on which the mask was evaluated (PARTIAL tiles).
        skipped: tiles a forward pass skipped because the mask excludes them entirely.
    """

    forward: int = 0
    backward: int = 0
    weights: int = 0
    masked: int = 0
    skipped: int = 0

    def reset(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, 0)


@dataclass(frozen=True, eq=False)
class _Plan:
    """What the tile kernels need besides the tensors they differentiate.

    ``request`` holds detached ``q, k, v, bias`` (gradients are computed by hand); ``leaves`` are
    the tensors requiring grad that the score function reads.
    """

    request: AttentionRequest
    block: BlockMask
    dropout_seed: int
    leaves: tuple[Tensor, ...]
    counters: TileCounters
    k_scores: Tensor  # (B, Hkv, Nk, D) keys for q k^T, in the stats dtype (request.k if equal)

    @property
    def modifies(self) -> bool:
        return self.request.bias is not None or self.request.score_mod is not None


# --- tile helpers --------------------------------------------------------------------------------


def _fold(x: Tensor, kv_heads: int, rows: tuple[int, int]) -> Tensor:
    """Rows ``rows`` of ``x (B, Hq, N, E)`` with the query-head group folded into the rows:
    ``(B, Hkv, G * T, E)``, row ``g * T + t`` being head ``h * G + g``, position ``t``."""
    B, Hq, _, E = x.shape
    T = rows[1] - rows[0]
    return x[:, :, rows[0] : rows[1]].reshape(B, kv_heads, Hq // kv_heads * T, E)


def _heads(x: Tensor, q_heads: int) -> Tensor:
    """Undo the fold: ``(B, Hkv, G * T, E) -> (B, Hq, T, E)`` (a view when contiguous)."""
    B, _, GT, E = x.shape
    return x.reshape(B, q_heads, GT * x.shape[1] // q_heads, E)


def _raw_scores(plan: _Plan, q_t: Tensor, kv_range: tuple[int, int]) -> Tensor:
    """Scaled scores of one tile, ``(B, Hq, Tq, Tk)`` in the statistics dtype. ``q_t`` is the
    folded, pre-scaled query tile ``(B, Hkv, G * Tq, D)`` in the statistics dtype: half inputs
    are multiplied in float32, as fused kernels accumulate and keep their scores, so float16
    logits past 65504 stay finite and bfloat16 ones are not rounded to 8 bits."""
    k_t = plan.k_scores[:, :, kv_range[0] : kv_range[1]]  # (B, Hkv, Tk, D)
    scores = q_t @ k_t.transpose(-2, -1)  # (B, Hkv, G * Tq, Tk)
    return _heads(scores, plan.request.q_heads)


def _masked(
    plan: _Plan, scores: Tensor, q_range: tuple[int, int], kv_range: tuple[int, int], full: bool
) -> Tensor:
    """``scores`` with masked entries set to ``-inf``; FULL tiles are returned untouched. In place
    when the scores are a fresh matmul result (no score function that might have returned a view
    of its own data, or a tensor autograd keeps)."""
    if full:
        return scores
    plan.counters.masked += 1
    mask = plan.request.mask_tile(q_range, kv_range)
    if mask is None:
        return scores
    if plan.modifies:
        return scores.masked_fill(~mask, float("-inf"))
    return scores.masked_fill_(~mask, float("-inf"))


def _score_tile(
    plan: _Plan, q_t: Tensor, q_range: tuple[int, int], kv_range: tuple[int, int], full: bool
) -> Tensor:
    """Scores of a tile after bias, score function and mask: ``(B, Hq, Tq, Tk)``, stats dtype."""
    scores = _raw_scores(plan, q_t, kv_range)
    if plan.modifies:
        scores = plan.request.modify_scores(scores, q_range, kv_range)
    return _masked(plan, scores, q_range, kv_range, full)


def _keep_mask(plan: _Plan, i: int, j: int, like: Tensor) -> Tensor:
    """Dropout keep-mask of tile ``(i, j)``, scaled by ``1 / (1 - p)``, regenerated identically in
    backward from the call's seed and the tile's position."""
    generator = torch.Generator(device=like.device)
    # A fixed integer mix of (seed, i, j) (splitmix64 constants): the same on every run and
    # Python version, and different for every tile of a call.
    mixed = plan.dropout_seed * 0x9E3779B97F4A7C15 + i * 0xBF58476D1CE4E5B9 + j * 0x94D049BB133111EB
    generator.manual_seed(mixed % 2**63)
    p = plan.request.dropout_p
    keep = torch.rand(like.shape, generator=generator, device=like.device) >= p
    return keep.to(like.dtype) / (1.0 - p)


def _query_tile(plan: _Plan, x: Tensor, rows: tuple[int, int]) -> Tensor:
    """The folded query tile ``(B, Hkv, G * Tq, D)`` in the statistics dtype, pre-scaled so
    that ``q_t @ k^T`` is already ``q k^T * scale`` (one multiply of ``Tq x D`` instead of
    ``Tq x Tk``)."""
    sd = stats_dtype(plan.request.dtype)
    scaled = x[:, :, rows[0] : rows[1]].to(sd) * plan.request.scale  # (B, Hq, Tq, D)
    return _fold(scaled, plan.request.kv_heads, (0, rows[1] - rows[0]))  # a view


# --- forward ---------------------------------------------------------------------------------------


@dataclass
class _Running:
    """The online-softmax state of one query tile (Milakov & Gimelshein, 2018), stats dtype.

    A row with nothing attended so far has ``max = -inf`` and ``sum = 0``.
    """

    max: Tensor  # (B, Hq, Tq, 1) running row maximum m
    sum: Tensor  # (B, Hq, Tq, 1) running sum l of exp(s - m)
    acc: Tensor  # (B, Hq, Tq, Dv) running unnormalised output

    def absorb(self, scores: Tensor, owned: bool) -> tuple[Tensor, Tensor]:
        """Fold a tile of scores ``(B, Hq, Tq, Tk)`` into ``max`` and ``sum``. Returns the tile's
        ``exp(s - m)`` and the factor ``exp(m_old - m)`` that rescales everything before it."""
        new_max = torch.maximum(self.max, scores.amax(dim=-1, keepdim=True))
        # -inf (nothing attended yet) becomes the lowest finite value: exp(-inf - lowest) is 0,
        # where exp(-inf - (-inf)) would be NaN.
        safe_max = new_max.clamp(min=torch.finfo(new_max.dtype).min)
        # In place when the tile is ours (a score function might return a view of its own data).
        probs = scores.sub_(safe_max).exp_() if owned else torch.exp(scores - safe_max)
        rescale = (self.max - safe_max).exp_()
        self.sum = torch.addcmul(probs.sum(dim=-1, keepdim=True), self.sum, rescale)
        self.max = new_max
        return probs, rescale

    def finish(self) -> tuple[Tensor, Tensor]:
        """``out = acc / l`` (0 on empty rows) and ``lse = m + log l`` (``+inf`` on empty rows,
        so that backward's ``exp(s - lse)`` is 0 there)."""
        attended = self.sum > 0
        out = self.acc / torch.where(attended, self.sum, 1.0)
        # A row with an attended NaN (or +inf) score has a NaN sum: its lse stays NaN, so its
        # weights and its gradients are NaN too, as its output is.
        lse = torch.where(attended | self.sum.isnan(), self.max + torch.log(self.sum), float("inf"))
        return out, lse.squeeze(-1)


def _forward(plan: _Plan) -> tuple[Tensor, Tensor]:
    """Online-softmax forward (FlashAttention-2, Algorithm 1).

    Returns ``out (B, Hq, Nq, Dv)`` and ``lse (B, Hq, Nq)``, both in the stats dtype (``+inf``
    on rows with nothing to attend). The output stays in the stats dtype for backward's
    ``D_i = rowsum(dO * O)``: from a float16/bfloat16-rounded ``O`` its error, multiplied into
    every ``dS``, adds up in the gradient of a bias shared across positions.
    """
    request, block = plan.request, plan.block
    q, v = request.q, request.v
    B, Hq, Nq, Dv = request.batch, request.q_heads, request.q_len, request.value_dim
    sd = stats_dtype(request.dtype)
    out = q.new_empty(B, Hq, Nq, Dv, dtype=sd)
    lse = q.new_empty(B, Hq, Nq, dtype=sd)
    # P V in the stats dtype: the un-normalised tile sums up to Tk values (512 keys of 130 is
    # 66,560, past float16's 65,504), so a half-precision product would overflow to inf.
    v_sd = v.to(sd)  # (B, Hkv, Nk, Dv); a copy only for half types
    for i in range(block.status.shape[0]):
        q_range = block.q_range(i)
        rows = slice(*q_range)
        Tq = q_range[1] - q_range[0]
        q_t = _query_tile(plan, q, q_range)  # (B, Hkv, G * Tq, D)
        state = _Running(
            max=q.new_full((B, Hq, Tq, 1), float("-inf"), dtype=sd),
            sum=q.new_zeros((B, Hq, Tq, 1), dtype=sd),
            acc=q.new_zeros((B, Hq, Tq, Dv), dtype=sd),
        )
        visits = block.visits(i)
        plan.counters.forward += len(visits)
        plan.counters.skipped += block.status.shape[1] - len(visits)
        for j, full in visits:
            kv_range = block.kv_range(j)
            scores = _score_tile(plan, q_t, q_range, kv_range, full)  # (B, Hq, Tq, Tk)
            probs, rescale = state.absorb(scores, owned=not (plan.modifies and full))
            if request.dropout_p > 0:  # after the sum: dropout acts on the probabilities
                probs = probs * _keep_mask(plan, i, j, probs)
            v_t = v_sd[:, :, kv_range[0] : kv_range[1]]  # (B, Hkv, Tk, Dv)
            pv = _fold_tile(probs, request.kv_heads) @ v_t  # (B, Hkv, G * Tq, Dv), stats dtype
            state.acc = torch.addcmul(_heads(pv, Hq), state.acc, rescale)
        out[:, :, rows], lse[:, :, rows] = state.finish()
    return out, lse


def _fold_tile(x: Tensor, kv_heads: int) -> Tensor:
    """A score tile ``(B, Hq, Tq, Tk)`` as ``(B, Hkv, G * Tq, Tk)`` for grouped matmuls."""
    B, Hq, Tq, Tk = x.shape
    return x.reshape(B, kv_heads, Hq // kv_heads * Tq, Tk)


# --- backward --------------------------------------------------------------------------------------


@dataclass
class _Grads:
    """Gradient accumulators, in the stats dtype (dq is written one query tile at a time)."""

    dq: Tensor  # (B, Hq, Nq, D)
    dk: Tensor  # (B, Hkv, Nk, D)
    dv: Tensor  # (B, Hkv, Nk, Dv)
    bias: Tensor | None  # the bias tensor's shape
    leaves: list[Tensor | None]


@dataclass
class _QueryTile:
    """One query tile's inputs and its dQ accumulator during backward (rows folded by group)."""

    rows: tuple[int, int]
    q: Tensor  # (B, Hkv, G * Tq, D), pre-scaled, stats dtype (for the scores)
    q_in: Tensor  # the same in the input dtype (for dK)
    grad_out: Tensor  # (B, Hkv, G * Tq, Dv), input dtype
    grad_out_sd: Tensor  # the same in the stats dtype
    lse: Tensor  # (B, Hq, Tq, 1)
    delta: Tensor  # (B, Hq, Tq, 1): D_i = rowsum(dO * O)
    dq: Tensor  # (B, Hkv, G * Tq, D), stats dtype
    nan_rows: bool = False  # some row's lse is NaN (an attended NaN score)


def _backward(
    plan: _Plan,
    out: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    grads: _Grads,
    grad_lse: Tensor | None = None,
) -> None:
    """Recompute every visited tile and accumulate gradients (FlashAttention-2, Algorithm 2).

    With ``P = exp(S - lse)`` recomputed from the saved log-sum-exp::

        dV += P^T dO      dP = dO V^T      dS = P * (dP - D_i),  D_i = rowsum(dO * O)
        dQ += dS K        dK += dS^T Q     (times scale)

    The loop runs over query tiles outside and key tiles inside (FlashAttention-2 runs key tiles
    outside to avoid atomic adds on a GPU; sequential PyTorch ops have no such race, and this
    order folds each query tile once).

    A gradient ``g`` of the log-sum-exp itself adds ``g_i * P_ij`` to ``dS`` (since
    ``d lse_i / d s_ij = P_ij``), which is ``D_i`` replaced by ``D_i - g_i``.
    """
    request, block = plan.request, plan.block
    sd = stats_dtype(request.dtype)
    delta = (grad_out.to(sd) * out.to(sd)).sum(dim=-1, keepdim=True)  # (B, Hq, Nq, 1)
    if grad_lse is not None:  # rows with nothing attended (lse = +inf here) take no gradient
        delta = delta - torch.where(torch.isfinite(lse), grad_lse.to(sd), 0.0)[..., None]
    # dP = dO V^T is computed in the stats dtype: it must agree with D_i to within float32
    # rounding, or dS = P * (dP - D_i) is all rounding error wherever P is close to one-hot.
    v_sd = request.v.to(sd)  # (B, Hkv, Nk, Dv); a copy only for half types
    any_nan = bool(lse.isnan().any())  # rows with an attended NaN score (one check per call)
    for i in range(block.status.shape[0]):
        q_range = block.q_range(i)
        rows = slice(*q_range)
        q_t = _query_tile(plan, request.q, q_range)
        do_t = _fold(grad_out, request.kv_heads, q_range)
        tile = _QueryTile(
            rows=q_range,
            q=q_t,
            q_in=q_t.to(request.dtype),
            grad_out=do_t,
            grad_out_sd=do_t.to(sd),
            lse=lse[:, :, rows, None],
            delta=delta[:, :, rows],
            dq=torch.zeros_like(q_t, dtype=sd),
            nan_rows=any_nan and bool(lse[:, :, rows].isnan().any()),
        )
        visits = block.visits(i)
        plan.counters.backward += len(visits)
        for j, full in visits:
            _backward_tile(plan, tile, i, j, full, v_sd, grads)
        grads.dq[:, :, rows] = _heads(tile.dq * request.scale, request.q_heads)


def _backward_tile(
    plan: _Plan, tile: _QueryTile, i: int, j: int, full: bool, v_sd: Tensor, grads: _Grads
) -> None:
    """Accumulate the gradients of score tile ``(i, j)`` into ``tile.dq`` and ``grads``. ``dS``
    goes back through the score function by autograd when it is not a plain additive bias, or
    when it reads learnable tensors."""
    request = plan.request
    Hq, Hkv = request.q_heads, request.kv_heads
    kv_range = plan.block.kv_range(j)
    cols = slice(*kv_range)
    score_grad = request.score_mod is not None and not is_additive(request.score_mod)
    raw = _raw_scores(plan, tile.q, kv_range)  # (B, Hq, Tq, Tk)
    with torch.enable_grad():  # the only graph built: the score function on a fresh leaf
        raw.requires_grad_(score_grad)
        modified = request.modify_scores(raw, tile.rows, kv_range) if plan.modifies else raw
    scores = _masked(plan, modified.detach(), tile.rows, kv_range, full)
    # Exact probabilities (B, Hq, Tq, Tk); in place unless autograd may need the tile.
    # A masked key's probability is 0 even in a NaN row (lse NaN): its dV stays finite.
    hidden = scores == float("-inf") if tile.nan_rows else None
    probs = torch.exp(scores - tile.lse) if plan.modifies else scores.sub_(tile.lse).exp_()
    if hidden is not None:
        probs = probs.masked_fill_(hidden, 0.0)
    dprobs = _heads(tile.grad_out_sd @ v_sd[:, :, cols].transpose(-2, -1), Hq)  # dP
    kept = probs
    if request.dropout_p > 0:
        keep = _keep_mask(plan, i, j, probs)
        kept, dprobs = probs * keep, dprobs.mul_(keep)
    grads.dv[:, :, cols] += (
        _fold_tile(kept.to(request.dtype), Hkv).transpose(-2, -1) @ tile.grad_out
    )
    dscores = dprobs.sub_(tile.delta).mul_(probs)  # dS = P * (dP - D_i), in place
    if score_grad or plan.leaves:
        dscores = _through_score_mod(modified, raw, dscores, score_grad, plan, grads)
    if grads.bias is not None:
        _add_bias_tile(grads.bias, dscores, tile.rows, kv_range)
    ds = _fold_tile(dscores.to(request.dtype), Hkv)  # (B, Hkv, G * Tq, Tk)
    tile.dq += ds @ request.k[:, :, cols]
    grads.dk[:, :, cols] += ds.transpose(-2, -1) @ tile.q_in  # tile.q_in carries the scale


def _through_score_mod(
    modified: Tensor, raw: Tensor, dscores: Tensor, score_grad: bool, plan: _Plan, grads: _Grads
) -> Tensor:
    """Pull ``dscores`` back through the score function of one tile: accumulate the gradients of
    its learnable tensors and return the gradient of the raw scores (``dscores`` itself when the
    function is an additive bias)."""
    if not modified.requires_grad:
        return dscores
    inputs = ([raw] if score_grad else []) + list(plan.leaves)
    # retain_graph: a learnable tensor may sit behind a graph built before the call (e.g. a table
    # computed from a parameter); that part is shared by every tile.
    found = torch.autograd.grad(modified, inputs, dscores, retain_graph=True, allow_unused=True)
    for n, g in enumerate(found[len(inputs) - len(plan.leaves) :]):
        if g is not None:
            total = grads.leaves[n]
            grads.leaves[n] = g if total is None else total + g
    if score_grad:
        first = found[0]
        return torch.zeros_like(dscores) if first is None else first
    return dscores


def _add_bias_tile(
    dbias: Tensor, dscores: Tensor, q_range: tuple[int, int], kv_range: tuple[int, int]
) -> None:
    """``dbias[tile] += dscores`` summed over the dimensions the bias broadcasts along (the bias
    is added to the scores, so its gradient is that of the scores, tile by tile)."""
    rows = slice(*q_range) if dbias.shape[-2] > 1 else slice(None)
    cols = slice(*kv_range) if dbias.shape[-1] > 1 else slice(None)
    target = dbias[..., rows, cols]
    dims = [d for d in range(4) if target.shape[d] == 1 and dscores.shape[d] > 1]
    if dims:  # summed in the accumulator's dtype (float64 for a broadcast bias)
        target += dscores.sum(dim=dims, keepdim=True, dtype=target.dtype)
    else:
        target += dscores.to(target.dtype)


# --- weights on demand -----------------------------------------------------------------------------


def _weights(plan: _Plan, lse: Tensor) -> Tensor:
    """The ``(B, Hq, Nq, Nk)`` probabilities (before dropout), recomputed tile by tile from the
    log-sum-exp; skipped tiles stay zero. The only ``O(Nq * Nk)`` allocation, made on request."""
    request, block = plan.request, plan.block
    B, Hq, Nq, Nk = request.batch, request.q_heads, request.q_len, request.kv_len
    weights = request.q.new_zeros(B, Hq, Nq, Nk)
    for i in range(block.status.shape[0]):
        q_range = block.q_range(i)
        q_t = _query_tile(plan, request.q, q_range)
        lse_t = lse[:, :, q_range[0] : q_range[1], None]  # (B, Hq, Tq, 1)
        visits = block.visits(i)
        plan.counters.weights += len(visits)
        for j, full in visits:
            kv_range = block.kv_range(j)
            scores = _score_tile(plan, q_t, q_range, kv_range, full)
            tile = weights[:, :, q_range[0] : q_range[1], kv_range[0] : kv_range[1]]
            # a masked key weighs 0 even in a NaN row (lse NaN): masked scores never matter
            tile.copy_(torch.exp(scores - lse_t).masked_fill_(scores == float("-inf"), 0.0))
    return weights


# --- autograd ------------------------------------------------------------------------------------


class _ChunkedAttention(torch.autograd.Function):
    """Saves ``q, k, v, out`` and the log-sum-exp; backward recomputes the tiles."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        plan: _Plan,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor | None,
        *leaves: Tensor,
    ) -> tuple[Tensor, Tensor]:
        out_sd, lse = _forward(plan)  # stats dtype; a copy in the input dtype is returned
        ctx.save_for_backward(q, k, v, out_sd, lse, bias)  # type: ignore[arg-type]
        ctx.plan = plan  # type: ignore[attr-defined]
        return out_sd.to(q.dtype), lse  # lse is differentiable (return_lse=True)

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad_out: Tensor, grad_lse: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, saved_bias = ctx.saved_tensors  # type: ignore[attr-defined]
        plan: _Plan = ctx.plan  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        request = plan.request
        if torch.is_grad_enabled():  # create_graph=True: gradients with a graph of their own
            if grad_lse is not None and bool(grad_lse.any()):
                raise RuntimeError(
                    "double backward (create_graph=True) through return_lse is not supported by "
                    "backend 'chunked'; use backend='reference'"
                )
            inputs = (q, k, v, saved_bias, *plan.leaves)
            live = dataclasses.replace(request, q=q, k=k, v=v, bias=saved_bias)
            found = reference_gradients(
                live, [t if n else None for t, n in zip(inputs, needs[1:], strict=True)],
                grad_out, "chunked",
            )  # fmt: skip
            return (None, *found)
        sd = stats_dtype(q.dtype)
        bias = request.bias
        grads = _Grads(
            dq=torch.zeros_like(q, dtype=sd),
            dk=torch.zeros_like(k, dtype=sd),
            dv=torch.zeros_like(v, dtype=sd),
            bias=None
            if bias is None or not needs[4]
            else _zeros_for(
                bias, sd, (request.batch, request.q_heads, request.q_len, request.kv_len)
            ),
            leaves=[None] * len(plan.leaves),
        )
        _backward(plan, out, lse, grad_out, grads, grad_lse)
        # A learnable tensor no visited tile reads (everything masked) gets zeros, as autograd
        # through the reference formula would give.
        leaf_grads = [
            torch.zeros_like(leaf) if g is None else g.to(leaf.dtype)
            for g, leaf in zip(grads.leaves, plan.leaves, strict=True)
        ]
        return (
            None,
            grads.dq.to(q.dtype) if needs[1] else None,
            grads.dk.to(k.dtype) if needs[2] else None,
            grads.dv.to(v.dtype) if needs[3] else None,
            None if grads.bias is None or bias is None else grads.bias.to(bias.dtype),
            *leaf_grads,
        )


def _zeros_for(bias: Tensor, sd: torch.dtype, target: tuple[int, ...]) -> Tensor:
    """A gradient accumulator for ``bias``, at least as precise as the statistics; float64 for
    a bias broadcast over positions, heads or batch entries (``target``, the scores' shape),
    whose gradient adds up the tiles' sums: a scalar bias's gradient is exactly 0, and float32
    running sums over thousands of tiles drift from it."""
    broadcast = any(n == 1 and t > 1 for n, t in zip(bias.shape, target, strict=True))
    wide = broadcast and bias.device.type != "mps"  # (MPS has no float64)
    dtype = torch.float64 if wide else torch.promote_types(bias.dtype, sd)
    return torch.zeros(bias.shape, dtype=dtype, device=bias.device)


def _score_mod_leaves(request: AttentionRequest) -> tuple[Tensor, ...]:
    """The tensors requiring grad that the score function reads: a module's parameters, and any
    tensor it closes over, found by running it on a 2 x 2 corner and walking the graph back to
    its leaves. They become inputs of the autograd function, which returns their gradients."""
    mod = request.score_mod
    if mod is None or not torch.is_grad_enabled():
        return ()
    found: dict[int, Tensor] = {}
    if isinstance(mod, nn.Module):
        found.update((id(p), p) for p in mod.parameters() if p.requires_grad)
    corner = request.indices((0, min(2, request.q_len)), (0, min(2, request.kv_len)))
    probe = torch.zeros((1, 1, 1, 1), dtype=stats_dtype(request.dtype), device=request.device)
    probe = mod(probe, *corner)
    stack = [probe.grad_fn] if probe.requires_grad else []
    while stack:
        node = stack.pop()
        if node is None:
            continue
        leaf = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if isinstance(leaf, Tensor):
            found.setdefault(id(leaf), leaf)
        stack.extend(child for child, _ in node.next_functions)
    return tuple(found.values())


# --- entry points ----------------------------------------------------------------------------------


def chunked_attention(
    request: AttentionRequest,
    *,
    tile_q: int | None = None,
    tile_kv: int | None = None,
    dropout_seed: int | None = None,
    counters: TileCounters | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Run one validated call on the chunked path: :func:`chunked_attention_lse` without the
    log-sum-exp."""
    out, weights, _ = chunked_attention_lse(
        request, tile_q=tile_q, tile_kv=tile_kv, dropout_seed=dropout_seed, counters=counters
    )
    return out, weights


def chunked_attention_lse(
    request: AttentionRequest,
    *,
    tile_q: int | None = None,
    tile_kv: int | None = None,
    dropout_seed: int | None = None,
    counters: TileCounters | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Run one validated call on the chunked path.

    Args:
        request: from :func:`qkv.request.build_request`. A
            :class:`~qkv.backends.block_mask.BlockMask` passed as its mask is reused, with the
            tile sizes it was built for.
        tile_q, tile_kv: tile sizes; default :func:`default_tile_sizes` of the device and dtype.
        dropout_seed: seeds the dropout masks; default a seed drawn from PyTorch's default CPU
            generator (so ``torch.manual_seed`` makes calls reproducible).
        counters: where to count tiles; default a fresh, discarded one.

    Returns:
        ``out (B, Hq, Nq, Dv)`` (differentiable with respect to ``q, k, v``, a bias tensor and
        the score function's learnable tensors) and, if ``request.return_weights``, the
        ``(B, Hq, Nq, Nk)`` probabilities before dropout (detached), else None; and each row's
        log-sum-exp ``(B, Hq, Nq)`` in the stats dtype, differentiable; on rows with nothing
        to attend ``-inf`` when ``request.return_lse`` (else the kernels' ``+inf``).

    Raises:
        ValueError: if a block mask passed as the mask does not fit the call.
    """
    if request.score_elements == 0:
        # Nothing to tile (B, Hq, Nq or Nk is 0): the formula on empty scores gives the empty
        # or all-zero output, and zero gradients, with no per-tile arithmetic to divide by 0.
        out, probs, lse = reference_attention_lse(request)
        return out, (probs.to(request.dtype) if request.return_weights else None), lse
    given = request.mask if isinstance(request.mask, BlockMask) else None
    if given is not None and (reason := given.incompatibility(request)) is not None:
        raise ValueError(reason)
    default_q, default_kv = default_tile_sizes(request.device, request.dtype)
    block = block_mask_for(request, tile_q or default_q, tile_kv or default_kv)
    if request.dropout_p > 0 and dropout_seed is None:
        dropout_seed = int(torch.randint(0, 2**62, ()).item())
    leaves = _score_mod_leaves(request)
    bias = request.bias
    k = request.k.detach().contiguous()  # key tiles sliced as views for the matmuls
    plan = _Plan(
        request=dataclasses.replace(
            request,
            q=request.q.detach(),
            k=k,
            v=request.v.detach().contiguous(),
            bias=None if bias is None else bias.detach(),
        ),
        block=block,
        dropout_seed=dropout_seed or 0,
        leaves=leaves,
        counters=counters or TileCounters(),
        k_scores=k.to(stats_dtype(request.dtype)),  # a copy only for half types
    )
    out, lse = _ChunkedAttention.apply(plan, request.q, request.k, request.v, bias, *leaves)
    weights = None
    if request.return_weights:
        with torch.no_grad():  # detached: the score function builds no graph for them
            weights = _weights(plan, lse)
    # The kernels keep +inf on empty rows (backward's exp(s - lse) is 0 there); callers get
    # -inf, the log of an empty sum, which the merge of partial results treats as no keys.
    if request.return_lse:  # (only then: the where() would keep its condition for backward)
        lse = torch.where(lse == float("inf"), float("-inf"), lse)
    return out, weights, lse


class ChunkedBackend:
    """Exact attention in ``O(N)`` memory on any device; serves every request. In ``auto`` it
    wins where its cost estimate beats SDPA's (a mask that lets it skip most tiles at long
    lengths) or where the dense paths would need more than ``MEMORY_LIMIT_BYTES``.

    Dropout masks come from a seed drawn from PyTorch's default CPU generator at each call, so
    ``torch.manual_seed(s)`` before a call (forward and its backward) reproduces it.

    Args:
        tile_q, tile_kv: fixed tile sizes; None picks them per device and dtype
            (:data:`qkv.backends.block_mask.TILE_SIZES`). A block mask passed as ``mask=`` brings
            its own.

    Attributes:
        counters: :class:`TileCounters` accumulated over every call this backend serves.
    """

    name = "chunked"

    def __init__(self, *, tile_q: int | None = None, tile_kv: int | None = None) -> None:
        self.tile_q = tile_q
        self.tile_kv = tile_kv
        self.counters = TileCounters()

    def supports(self, request: AttentionRequest) -> str | None:
        if isinstance(request.mask, BlockMask):
            return request.mask.incompatibility(request)
        return None

    def tile_sizes(self, request: AttentionRequest) -> tuple[int, int]:
        """The ``(tile_q, tile_kv)`` a call runs with."""
        if isinstance(request.mask, BlockMask):
            return request.mask.tile_q, request.mask.tile_kv
        default_q, default_kv = default_tile_sizes(request.device, request.dtype)
        return self.tile_q or default_q, self.tile_kv or default_kv

    def forward(self, request: AttentionRequest) -> tuple[Tensor, Tensor | None]:
        return chunked_attention(
            request, tile_q=self.tile_q, tile_kv=self.tile_kv, counters=self.counters
        )

    def forward_lse(self, request: AttentionRequest) -> tuple[Tensor, Tensor | None, Tensor]:
        return chunked_attention_lse(
            request, tile_q=self.tile_q, tile_kv=self.tile_kv, counters=self.counters
        )
