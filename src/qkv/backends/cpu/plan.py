"""Translate a request's mask and score function into the CPU kernel's parameters.

The kernel evaluates masks and score functions from parameters, never from Python callables:

- **Interval masks.** Causal (both alignments), sliding windows, key and query padding and
  prefix-LM each keep, for query ``q`` of batch entry ``b``, the keys of one interval; an ``&``
  of them keeps the intersection. The plan folds them into two ``(B or 1, Nq)`` int64 tensors
  ``row_lo``/``row_hi`` (``O(B * N)``), and the kernel fills ``-inf`` outside ``[lo, hi)`` on the
  tiles the block mask marks PARTIAL.
- **Documents** (``masks.document``): the ``(B or 1, N)`` id tensors, compared per element.
- **Mask tensors** (``mask=`` a bool tensor, ``masks.dense``): read in place through their
  broadcast strides.
- **Score functions**: a bias tensor (strided), then ``alibi``, ``softcap``,
  :class:`~qkv.scores.RelativePositionBias` and ``chain`` of them, in order.

Built-in masks and score functions are recognised by the function objects
:mod:`qkv.masks` and :mod:`qkv.scores` create and the values they close over. Anything else (a
mask function of your own, ``|`` and ``~`` combinations, other score functions) makes
:func:`plan_request` return a reason, and ``auto`` uses the chunked backend, which evaluates any
callable tile by tile.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qkv.backends.block_mask import BlockMask
from qkv.request import AttentionRequest
from qkv.scores import RelativePositionBias, ScoreMod

__all__ = ["ALIBI", "RELATIVE", "SOFTCAP", "KernelPlan", "Modifier", "plan_request"]

ALIBI, RELATIVE, SOFTCAP = 0, 1, 2
SUPPORTED_MASKS = (
    "causal, sliding_window, key_padding, query_padding, prefix_lm, document, bool tensors "
    "and their &"
)
SUPPORTED_SCORES = "a bias tensor, alibi, softcap, RelativePositionBias and chain() of them"


@dataclass(frozen=True)
class Modifier:
    """One score modifier: ``kind`` (ALIBI, RELATIVE, SOFTCAP), the table it reads (ALiBi slopes
    ``(Hq,)``, a relative table ``(Hq, 2M + 1)``) and its numbers."""

    kind: int
    table: Tensor | None = None
    value: float = 0.0  # softcap: cap
    offset: int = 0  # alibi, relative: query offset
    max_distance: int = 0  # relative


@dataclass
class KernelPlan:
    """The kernel's view of one request's mask and score function.

    Attributes:
        row_lo, row_hi: ``(B or 1, Nq)`` int64, keys ``[lo, hi)`` kept by the interval masks.
        doc_q, doc_k: ``(B or 1, Nq)`` / ``(B or 1, Nk)`` int64 document ids.
        dense: a 4-d bool mask tensor broadcastable to ``(B, Hq, Nq, Nk)``.
        modifiers: the score function as kernel modifiers, in order.
    """

    row_lo: Tensor | None = None
    row_hi: Tensor | None = None
    doc_q: Tensor | None = None
    doc_k: Tensor | None = None
    dense: Tensor | None = None
    modifiers: list[Modifier] = field(default_factory=list)

    def keep_interval(self, lo: Tensor | None, hi: Tensor | None, q_len: int, kv_len: int) -> None:
        """Intersect with keys ``[lo, hi)``; ``lo``/``hi`` broadcast to ``(B or 1, Nq)``."""
        current_lo = torch.zeros(1, q_len, dtype=torch.long) if self.row_lo is None else self.row_lo
        current_hi = (
            torch.full((1, q_len), kv_len, dtype=torch.long) if self.row_hi is None else self.row_hi
        )
        if lo is not None:
            current_lo = torch.maximum(current_lo, lo)
        if hi is not None:
            current_hi = torch.minimum(current_hi, hi)
        self.row_lo, self.row_hi = torch.broadcast_tensors(current_lo, current_hi)


def _closure(fn: Callable[..., object]) -> dict[str, object]:
    """The values a function closes over, by name (cheap: no inspection of globals)."""
    if not inspect.isfunction(fn) or fn.__closure__ is None:
        return {}
    cells = zip(fn.__code__.co_freevars, fn.__closure__, strict=True)
    return {name: cell.cell_contents for name, cell in cells}


def _qualname(fn: object) -> str:
    return str(getattr(fn, "__qualname__", ""))


def _per_batch(values: Tensor, batch: int) -> Tensor:
    """``values[b]`` for every ``b`` (a batch dimension of 1 is shared), as ``(B, 1)``."""
    values = values.long().cpu()
    return values[torch.arange(batch).clamp(max=values.shape[0] - 1)].view(batch, 1)


def _add_mask(plan: KernelPlan, mask: object, request: AttentionRequest) -> str | None:
    """Fold one mask function into ``plan``; the reason it cannot be, or None."""
    if isinstance(mask, BlockMask):
        return None if mask.mask is None else _add_mask(plan, mask.mask, request)
    if isinstance(mask, Tensor):
        return _add_dense(plan, mask)
    fn = getattr(mask, "fn", None)
    name, env = _qualname(fn), _closure(fn) if callable(fn) else {}
    Nq, Nk, B = request.q_len, request.kv_len, request.batch
    q = torch.arange(Nq).view(1, Nq)
    parts, offset, lengths = env.get("parts"), env.get("offset"), env.get("lengths")
    if name == "and_masks.<locals>.both" and isinstance(parts, list):
        for part in parts:
            if (reason := _add_mask(plan, part, request)) is not None:
                return reason
        return None
    if name == "causal.<locals>.<lambda>" and isinstance(offset, int):
        plan.keep_interval(None, q + offset + 1, Nq, Nk)
        return None
    if name == "sliding_window.<locals>.window":
        left, right = env.get("left"), env.get("right")
        if isinstance(left, int) and isinstance(right, int) and isinstance(offset, int):
            plan.keep_interval(q + offset - left, q + offset + right + 1, Nq, Nk)
            return None
    if name == "key_padding.<locals>.<lambda>" and isinstance(lengths, Tensor):
        plan.keep_interval(None, _per_batch(lengths, B), Nq, Nk)
        return None
    if name == "query_padding.<locals>.<lambda>" and isinstance(lengths, Tensor):
        valid = q < _per_batch(lengths, B)
        plan.keep_interval(None, torch.where(valid, Nk, 0), Nq, Nk)
        return None
    if name == "prefix_lm.<locals>.<lambda>":
        prefix = env.get("n", lengths)
        if isinstance(prefix, int):
            plan.keep_interval(None, torch.clamp(q + 1, min=prefix), Nq, Nk)
            return None
        if isinstance(prefix, Tensor):
            plan.keep_interval(None, torch.maximum(q + 1, _per_batch(prefix, B)), Nq, Nk)
            return None
    if name == "_index_ids.<locals>.same_document" and plan.doc_q is None:
        q_ids, k_ids = env.get("q_ids"), env.get("k_ids")
        if isinstance(q_ids, Tensor) and isinstance(k_ids, Tensor):
            plan.doc_q = q_ids.long().cpu().contiguous()
            plan.doc_k = k_ids.long().cpu().contiguous()
            return None
    dense = env.get("m4")
    if name == "dense.<locals>.lookup" and isinstance(dense, Tensor):
        return _add_dense(plan, dense)
    return f"mask {mask!r} is not one the CPU kernel evaluates ({SUPPORTED_MASKS})"


def _add_dense(plan: KernelPlan, mask: Tensor) -> str | None:
    if plan.dense is not None:
        return "more than one mask tensor (combine them with & first)"
    plan.dense = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    return None


def _add_score(plan: KernelPlan, mod: object, request: AttentionRequest) -> str | None:
    """Fold one score function into ``plan.modifiers``; the reason it cannot be, or None."""
    Hq = request.q_heads
    if type(mod) is RelativePositionBias:
        table = mod.table
        if tuple(table.shape) != (Hq, 2 * mod.max_distance + 1):
            return f"{mod!r} has {table.shape[0]} heads but the call has Hq={Hq}"
        plan.modifiers.append(
            Modifier(RELATIVE, table, offset=int(mod.offset), max_distance=int(mod.max_distance))
        )
        return None
    fn = mod.fn if isinstance(mod, ScoreMod) else None
    name, env = _qualname(fn), _closure(fn) if callable(fn) else {}
    mods, cap = env.get("mods"), env.get("cap")
    if name == "chain.<locals>.chained" and isinstance(mods, tuple):
        for part in mods:
            if (reason := _add_score(plan, part, request)) is not None:
                return reason
        return None
    if name == "alibi.<locals>.linear_bias":
        slopes, offset = env.get("slopes"), env.get("offset")
        if isinstance(slopes, Tensor) and isinstance(offset, int):
            if slopes.requires_grad:
                return "ALiBi slopes that require grad"
            if slopes.numel() != Hq:
                return f"alibi has {slopes.numel()} slopes but the call has Hq={Hq}"
            plan.modifiers.append(Modifier(ALIBI, slopes.detach().flatten(), offset=offset))
            return None
    if name == "softcap.<locals>.<lambda>" and isinstance(cap, int | float):
        plan.modifiers.append(Modifier(SOFTCAP, value=float(cap)))
        return None
    return f"score function {mod!r} is not one the CPU kernel evaluates ({SUPPORTED_SCORES})"


_PLANS: weakref.WeakKeyDictionary[AttentionRequest, KernelPlan | str] = weakref.WeakKeyDictionary()


def plan_request(request: AttentionRequest) -> KernelPlan | str:
    """The kernel parameters of ``request``'s mask and score function, or why there are none.
    Remembered per request (``supports`` asks, then the call runs)."""
    if (known := _PLANS.get(request)) is None:
        known = _PLANS[request] = _plan(request)
    return known


def _plan(request: AttentionRequest) -> KernelPlan | str:
    plan = KernelPlan()
    parts: list[object] = [m for m in (request.causal_mask, request.mask) if m is not None]
    for part in parts:
        if (reason := _add_mask(plan, part, request)) is not None:
            return reason
    if plan.doc_q is not None:
        assert plan.doc_k is not None
        if plan.doc_q.shape[1] < request.q_len or plan.doc_k.shape[1] < request.kv_len:
            return (
                f"document ids of lengths {plan.doc_q.shape[1]}, {plan.doc_k.shape[1]} are "
                f"shorter than Nq={request.q_len}, Nk={request.kv_len}"
            )
        plan.doc_q = plan.doc_q[:, : request.q_len].contiguous()
        plan.doc_k = plan.doc_k[:, : request.kv_len].contiguous()
    if plan.row_lo is not None:
        assert plan.row_hi is not None
        plan.row_lo = plan.row_lo.clamp(0, request.kv_len).contiguous()
        plan.row_hi = plan.row_hi.clamp(0, request.kv_len).contiguous()
    if request.score_mod is not None and (reason := _add_score(plan, request.score_mod, request)):
        return reason
    return plan
