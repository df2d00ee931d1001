"""Score modifiers: functions ``(score, b, h, q_idx, kv_idx) -> score`` applied before softmax.

``score`` is a float tensor of (a tile of) the scaled scores ``q k^T * scale``, shaped
``(B, H, Nq, Nk)`` or any tile of it; the index tensors broadcast against it as in
:mod:`qkv.masks`. A modifier that only *adds* something independent of the score (ALiBi, a
relative-position bias) sets ``additive = True``, which lets a backend that takes a dense bias
(PyTorch SDPA) serve it; others (``softcap``) need a backend that runs the function itself.

The built-in modifiers are classes that carry their parameters (:class:`Alibi`'s slopes and
offset, :class:`Softcap`'s cap, :class:`Chain`'s parts, :class:`RelativePositionBias`'s table),
which is what a compiled kernel reads. A score function of your own is opaque whatever it is
called: it is evaluated, by a backend that runs Python functions per tile.

:func:`block_score` gives a modifier on one block of the ``(Nq, Nk)`` matrix in the block's own
coordinates (context parallelism runs each block as a call): the built-ins shift their offsets
and keep their type; anything else is wrapped to add the offsets to the index tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from qkv.mask_core import block_name, saturate

__all__ = [
    "Alibi",
    "Chain",
    "RelativePositionBias",
    "ScoreFunction",
    "ScoreMod",
    "Softcap",
    "alibi",
    "alibi_slopes",
    "block_score",
    "chain",
    "check_score_call",
    "is_additive",
    "softcap",
]


@runtime_checkable
class ScoreFunction(Protocol):
    """Anything callable as ``score_mod(score, b, h, q_idx, kv_idx) -> score``."""

    def __call__(
        self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor
    ) -> Tensor: ...


class ScoreMod:
    """A named score modifier.

    Args:
        fn: ``fn(score, b, h, q_idx, kv_idx) -> score``.
        name: how it prints.
        additive: True when ``fn(s, ...) == s + fn(0, ...)`` for every ``s``.
        check: optional ``check(batch, heads, q_len, kv_len)`` that raises ``ValueError`` naming
            the function when it was built for other sizes (ALiBi's head count).
    """

    __slots__ = ("additive", "check", "fn", "name")

    def __init__(
        self,
        fn: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor],
        name: str,
        *,
        additive: bool = False,
        check: Callable[[int, int, int, int], None] | None = None,
    ) -> None:
        self.fn = fn
        self.name = name
        self.additive = additive
        self.check = check

    def check_call(self, batch: int, heads: int, q_len: int, kv_len: int) -> None:
        """Raise ``ValueError`` if this function does not fit a call of these sizes."""
        if self.check is not None:
            self.check(batch, heads, q_len, kv_len)

    def for_call(self, batch: int, heads: int, q_len: int, kv_len: int) -> ScoreMod:
        """This function as a call of these sizes uses it (itself, unless a parameter can be
        brought to the call's scale without changing any softmax row)."""
        return self

    def __call__(
        self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor
    ) -> Tensor:
        return self.fn(score, b, h, q_idx, kv_idx)

    def block(self, q_range: tuple[int, int], kv_range: tuple[int, int]) -> ScoreMod:
        """This function on queries ``q_range`` x keys ``kv_range`` of a call, for a call of the
        block's size: index ``(i, j)`` of the block is ``(q_range[0] + i, kv_range[0] + j)``
        here. Opaque here: the index tensors are shifted before the function sees them."""
        return _shifted(self, q_range, kv_range)

    def __repr__(self) -> str:
        return self.name


def _shifted(fn: ScoreFunction, q_range: tuple[int, int], kv_range: tuple[int, int]) -> ScoreMod:
    q0, k0 = int(q_range[0]), int(kv_range[0])

    def shifted(score: Tensor, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return fn(score, b, h, q + q0, kv + k0)

    name = block_name(repr(fn), q_range, kv_range)
    return ScoreMod(shifted, name, additive=is_additive(fn))


def block_score(
    fn: ScoreFunction, q_range: tuple[int, int], kv_range: tuple[int, int]
) -> ScoreFunction:
    """``fn`` on queries ``q_range`` x keys ``kv_range`` of a call, in the block's coordinates
    (see :meth:`ScoreMod.block`): a built-in keeps its type, anything else is wrapped."""
    block = getattr(fn, "block", None)
    if isinstance(fn, ScoreMod | RelativePositionBias) and callable(block):
        result: ScoreFunction = block(q_range, kv_range)
        return result
    return _shifted(fn, q_range, kv_range)


def is_additive(score_mod: ScoreFunction) -> bool:
    """Whether ``score_mod`` declares itself a pure additive bias."""
    return bool(getattr(score_mod, "additive", False))


class Chain(ScoreMod):
    """Score modifiers applied left to right (see :func:`chain`).

    Attributes:
        mods: the modifiers, in order.
    """

    def __init__(self, mods: tuple[ScoreFunction, ...]) -> None:
        self.mods = mods
        name = "chain(" + ", ".join(repr(m) for m in mods) + ")"
        additive = all(is_additive(m) for m in mods)
        super().__init__(self._apply, name, additive=additive, check=self._check)

    def _apply(self, score: Tensor, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        for mod in self.mods:
            score = mod(score, b, h, q, kv)
        return score

    def _check(self, batch: int, heads: int, q_len: int, kv_len: int) -> None:
        for mod in self.mods:
            check_score_call(mod, batch, heads, q_len, kv_len)

    def for_call(self, batch: int, heads: int, q_len: int, kv_len: int) -> ScoreMod:
        sized = tuple(
            m.for_call(batch, heads, q_len, kv_len) if isinstance(m, ScoreMod) else m
            for m in self.mods
        )
        return self if all(a is b for a, b in zip(sized, self.mods, strict=True)) else Chain(sized)

    def block(self, q_range: tuple[int, int], kv_range: tuple[int, int]) -> Chain:
        return Chain(tuple(block_score(m, q_range, kv_range) for m in self.mods))


def chain(*mods: ScoreFunction) -> Chain:
    """Apply score modifiers left to right: ``chain(alibi(8), softcap(30))``."""
    return Chain(tuple(mods))


def check_score_call(
    score_mod: ScoreFunction, batch: int, heads: int, q_len: int, kv_len: int
) -> None:
    """Run the score function's own call check, if it has one (see :meth:`ScoreMod.check_call`)."""
    check = getattr(score_mod, "check_call", None)
    if callable(check):
        check(batch, heads, q_len, kv_len)


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi head slopes (Press et al., 2022): a geometric sequence starting at ``2^(-8/n)``.

    For a head count that is not a power of two, the paper's recipe interleaves the slopes of the
    next power of two. Returns a float32 tensor of shape ``(num_heads,)``.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1; got {num_heads}")

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two_slopes(closest)
    if closest < num_heads:
        slopes += power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


class Alibi(ScoreMod):
    """ALiBi's linear bias (see :func:`alibi`).

    Attributes:
        slopes: ``(H,)`` float32 slope of every query head.
        offset: added to query positions; saturated to ``+-2**62`` for index arithmetic, which
            changes every score of a row by the same amount and so no softmax.
    """

    def __init__(self, slopes: Tensor, offset: int, *, keep_offset: bool = False) -> None:
        self.slopes = slopes
        self.offset = offset
        # A block of a larger call (see block()) keeps its offset: the rows of a block are
        # parts of longer rows, whose softmax a per-block shift would change.
        self.keep_offset = keep_offset
        super().__init__(
            self._apply, f"alibi({slopes.numel()} heads)", additive=True, check=self._check
        )

    def _check(self, batch: int, heads: int, q_len: int, kv_len: int) -> None:
        if self.slopes.numel() != heads:
            raise ValueError(
                f"alibi was built for {self.slopes.numel()} heads but the call has Hq = {heads} "
                f"query heads: use alibi({heads})"
            )

    def for_call(self, batch: int, heads: int, q_len: int, kv_len: int) -> ScoreMod:
        # Past Nq + Nk every key of every row lies on one side of the query, and a larger offset
        # only shifts each row's scores by a constant: clamp it there, so that the float
        # arithmetic of every backend sees distances of the call's own size.
        if self.keep_offset:
            return self
        reach = q_len + kv_len
        offset = max(-reach, min(reach, self.offset))
        return self if offset == self.offset else Alibi(self.slopes, offset)

    def block(self, q_range: tuple[int, int], kv_range: tuple[int, int]) -> Alibi:
        # |q - kv + offset| with q = i + q0, kv = j + k0 is |i - j + offset + q0 - k0|.
        offset = self.offset + q_range[0] - kv_range[0]
        return Alibi(self.slopes, offset, keep_offset=True)

    def _apply(self, score: Tensor, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        distance = (q - kv + saturate(self.offset)).abs().to(score.dtype)
        return score - self.slopes.to(score.device, score.dtype)[h] * distance


def alibi(num_heads: int | Tensor, *, offset: int = 0) -> Alibi:
    """ALiBi: subtract ``slope[h] * |i + offset - j|`` from the score of query ``i``, key ``j``.

    Args:
        num_heads: number of query heads (slopes from :func:`alibi_slopes`), or the ``(H,)``
            slopes themselves.
        offset: added to query positions, e.g. ``Nk - Nq`` when decoding against a cache.

    On the causal part ``j <= i`` this is the paper's ``slope * (j - i)``; the absolute distance
    makes it usable for bidirectional encoders too.
    """
    if isinstance(num_heads, Tensor):
        if num_heads.ndim != 1 or not num_heads.dtype.is_floating_point:
            raise ValueError(
                f"alibi slopes must be a 1-d float tensor of shape (H,); got "
                f"{tuple(num_heads.shape)} {num_heads.dtype}"
            )
        if num_heads.device.type == "meta":
            raise ValueError(
                "alibi slopes are on the meta device, which holds no values; give a tensor "
                "with values (on any device: they are moved to the scores' device)"
            )
        slopes = num_heads.float()
    elif isinstance(num_heads, int) and not isinstance(num_heads, bool):
        slopes = alibi_slopes(num_heads)
    else:
        raise TypeError(f"alibi num_heads must be an int or a (H,) tensor; got {num_heads!r}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"alibi offset must be an int; got {offset!r}")
    return Alibi(slopes, offset)


class Softcap(ScoreMod):
    """``cap * tanh(score / cap)`` (see :func:`softcap`).

    Attributes:
        cap: the bound, a finite float > 0.
    """

    def __init__(self, cap: float) -> None:
        self.cap = float(cap)
        super().__init__(self._apply, f"softcap({cap})")

    def _apply(self, score: Tensor, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return self.cap * torch.tanh(score / self.cap)

    def block(self, q_range: tuple[int, int], kv_range: tuple[int, int]) -> Softcap:
        return self  # reads no position


def softcap(cap: float) -> Softcap:
    """Squash scores smoothly into ``(-cap, cap)``: ``cap * tanh(score / cap)`` (Gemma 2, Grok)."""
    if isinstance(cap, bool) or not isinstance(cap, int | float):
        raise TypeError(f"softcap cap must be a Python number; got {cap!r}")
    if not (cap > 0 and math.isfinite(cap)):  # inf gives inf * tanh(s / inf) = NaN everywhere
        raise ValueError(f"softcap needs a finite cap > 0; got {cap}")
    return Softcap(cap)


class RelativePositionBias(nn.Module):
    """A learnable bias per head and clipped relative distance, added to the scores.

    ``bias[h, clip(j - i - offset, -max_distance, max_distance)]``, the Shaw et al. (2018) scalar
    form used as a score modifier. The table receives gradients like any parameter.

    Args:
        num_heads: query heads H.
        max_distance: distances beyond this share the edge bucket.
        offset: added to query positions (``Nk - Nq`` for bottom-right aligned decoding).

    Attributes:
        table: ``(H, 2 * max_distance + 1)`` float32 parameter, initialised to zero.
    """

    additive = True

    def __init__(self, num_heads: int, max_distance: int = 128, *, offset: int = 0) -> None:
        super().__init__()
        if num_heads < 1 or max_distance < 0:
            raise ValueError(
                f"need num_heads >= 1 and max_distance >= 0; got {num_heads}, {max_distance}"
            )
        self.num_heads = num_heads
        self.max_distance = max_distance
        self.offset = offset
        self.table = nn.Parameter(torch.zeros(num_heads, 2 * max_distance + 1))

    def check_call(self, batch: int, heads: int, q_len: int, kv_len: int) -> None:
        """Raise ``ValueError`` if the table's heads are not the call's query heads."""
        if heads != self.num_heads:
            raise ValueError(
                f"RelativePositionBias has {self.num_heads} heads but the call has Hq = {heads} "
                "query heads"
            )

    def forward(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # Saturating the offset changes no bucket (all are clamped to +-max_distance) and keeps
        # the index arithmetic inside int64.
        relative = (kv_idx - q_idx - saturate(self.offset)).clamp(
            -self.max_distance, self.max_distance
        )
        return score + self.table[h, relative + self.max_distance].to(score.dtype)

    def block(self, q_range: tuple[int, int], kv_range: tuple[int, int]) -> RelativePositionBias:
        """The bias on a block of a call (see :func:`block_score`), sharing this table (its
        gradient lands on the same parameter): ``kv - q - offset`` with ``q = i + q0`` and
        ``kv = j + k0`` is ``j - i - (offset + q0 - k0)``."""
        shifted = RelativePositionBias(
            self.num_heads, self.max_distance, offset=self.offset + q_range[0] - kv_range[0]
        )
        shifted.table = self.table
        return shifted

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, max_distance={self.max_distance}"
