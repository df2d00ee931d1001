"""Translate a request's mask and score function into the CPU kernel's parameters.

The kernel evaluates masks and score functions from parameters, never from Python callables,
and it learns them from the typed descriptions the vocabulary gives, never from names:

- **Masks**: ``request.whole_mask.lower(B, Nq, Nk)`` (:meth:`qkv.masks.MaskFn.lower`) gives a
  :class:`~qkv.mask_core.KernelMask`: up to ``MAX_INTERVALS`` key intervals per query row
  (causal, windows, padding, prefix-LM and their ``&``, ``|``, ``~``), document ids, a strided
  bool tensor. A mask that cannot be lowered (a function of your own, ``|`` of documents) gives
  the reason, and ``auto`` uses the chunked backend, which evaluates any callable tile by tile.
- **Score functions**: a bias tensor (strided), then :class:`~qkv.scores.Alibi`,
  :class:`~qkv.scores.Softcap`, :class:`~qkv.scores.RelativePositionBias` and
  :class:`~qkv.scores.Chain` of them, in order, recognised by their type.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from torch import Tensor

from qkv.mask_core import KernelMask, saturate
from qkv.request import AttentionRequest
from qkv.scores import Alibi, Chain, RelativePositionBias, Softcap

__all__ = ["ALIBI", "RELATIVE", "SOFTCAP", "KernelPlan", "Modifier", "plan_request"]

ALIBI, RELATIVE, SOFTCAP = 0, 1, 2
SUPPORTED_SCORES = "a bias tensor, alibi, softcap, RelativePositionBias and chain() of them"


@dataclass(frozen=True)
class Modifier:
    """One score modifier: ``kind`` (ALIBI, RELATIVE, SOFTCAP), the table it reads (ALiBi slopes
    ``(Hq,)``, a relative table ``(Hq, 2M + 1)``) and its numbers."""

    kind: int
    table: Tensor | None = None
    value: float = 0.0  # softcap: cap
    offset: int = 0  # alibi, relative: query offset (saturated)
    max_distance: int = 0  # relative


@dataclass
class KernelPlan:
    """The kernel's view of one request's mask and score function.

    Attributes:
        mask: the whole mask in kernel form (empty: everything attended).
        modifiers: the score function as kernel modifiers, in order.
    """

    mask: KernelMask = field(default_factory=KernelMask)
    modifiers: list[Modifier] = field(default_factory=list)


def _add_score(plan: KernelPlan, mod: object, request: AttentionRequest) -> str | None:
    """Fold one score function into ``plan.modifiers``; the reason it cannot be, or None."""
    Hq = request.q_heads
    if type(mod) is RelativePositionBias:
        table = mod.table
        if tuple(table.shape) != (Hq, 2 * mod.max_distance + 1):
            return f"{mod!r} has {table.shape[0]} heads but the call has Hq={Hq}"
        offset = saturate(mod.offset)
        plan.modifiers.append(
            Modifier(RELATIVE, table, offset=offset, max_distance=mod.max_distance)
        )
        return None
    if type(mod) is Chain:
        for part in mod.mods:
            if (reason := _add_score(plan, part, request)) is not None:
                return reason
        return None
    if type(mod) is Alibi:
        if mod.slopes.requires_grad:
            return "ALiBi slopes that require grad"
        if mod.slopes.numel() != Hq:
            return f"alibi has {mod.slopes.numel()} slopes but the call has Hq={Hq}"
        offset = saturate(mod.offset)  # build_request brought it within Nq + Nk already
        plan.modifiers.append(Modifier(ALIBI, mod.slopes.detach().flatten(), offset=offset))
        return None
    if type(mod) is Softcap:
        plan.modifiers.append(Modifier(SOFTCAP, value=mod.cap))
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
    if request.whole_mask is not None:
        lowered = request.whole_mask.lower(request.batch, request.q_len, request.kv_len)
        if isinstance(lowered, str):
            return f"{lowered} (the CPU kernel takes the masks of qkv.masks and their &, |, ~)"
        plan.mask = lowered
    if request.score_mod is not None and (reason := _add_score(plan, request.score_mod, request)):
        return reason
    return plan
