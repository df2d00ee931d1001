"""The registry of approximations: what each one is called, how it is built, and what a
benchmark needs to know about it.

Every approximation is one :class:`Approximation` entry of :data:`APPROXIMATIONS`. The
modules (:mod:`qkv.nn`), the model configs (:mod:`qkv.models`) and the benchmarks
(:mod:`qkv.bench.approx`, ``benchmarks/approx_lab.py``) read this table and nothing else, so
a new approximation is one module in ``qkv/approx/`` and one entry here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from qkv.approx.bigbird import bigbird_attention, bigbird_rows, local_attention, local_rows
from qkv.approx.linear import linear_attention, linear_rows
from qkv.approx.linformer import LinformerAttention
from qkv.approx.nystrom import nystrom_attention
from qkv.approx.performer import PerformerAttention, performer_rows

__all__ = [
    "APPROXIMATIONS",
    "Approximation",
    "AttentionFn",
    "check_attention_config",
    "make_attention",
]

#: ``fn(q, k, v, *, mask=..., causal=...) -> (B, Hq, Nq, Dv)``: a function or an ``nn.Module``.
AttentionFn = Callable[..., Any]
#: ``rows(q, k, knob, keep) -> (B, H, Nq, Nk)``: the attention rows a method implies.
RowsFn = Callable[[Tensor, Tensor, int, "Tensor | None"], Tensor]


@dataclass(frozen=True)
class Approximation:
    """One approximation: its builder and what the benchmarks need to know of it.

    Attributes:
        build: ``build(head_dim=D, **options) -> AttentionFn``.
        knob: the option that trades cost for accuracy (``None``: the method has none).
        sweep: the knob's values the error benchmark tries (``(0,)`` without a knob).
        fixed: options every benchmark call adds (e.g. a seed for random features).
        speed: the settings timed against exact attention vs N.
        short: the settings for short texts (reviews of ~30 to ~120 tokens), so that the
            method really approximates there.
        rows: the attention rows it implies, for the row KL divergence (``None``: it has no
            rows: Nystrom's implied matrix can be negative, Linformer's rows are over
            projected keys).
        knob_below_length: the knob must stay below the sequence length (landmarks, window,
            block): at or above it nothing is left to approximate.
        for_length: ``(N, options) -> options`` for a call on ``N`` tokens (``None``: as is).
    """

    build: Callable[..., AttentionFn]
    knob: str | None = None
    sweep: tuple[int, ...] = (0,)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    speed: Mapping[str, Any] = field(default_factory=dict)
    short: Mapping[str, Any] = field(default_factory=dict)
    rows: RowsFn | None = None
    knob_below_length: bool = False
    for_length: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None

    def __call__(self, *, head_dim: int, **options: Any) -> AttentionFn:
        return self.build(head_dim=head_dim, **options)

    def knob_options(self, value: int) -> dict[str, Any]:
        """The options that set the knob to ``value`` (plus :attr:`fixed`)."""
        return {**self.fixed, **({self.knob: value} if self.knob is not None else {})}

    def options_for_length(self, n: int, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` for a call on ``n`` tokens."""
        given = dict(options)
        return given if self.for_length is None else self.for_length(n, given)


def _partial(fn: Callable[..., Any]) -> Callable[..., AttentionFn]:
    def build(*, head_dim: int, **options: Any) -> AttentionFn:
        inspect.signature(fn).bind_partial(None, None, None, **options)  # unknown options raise
        return functools.partial(fn, **options)

    return build


def _performer(*, head_dim: int, **options: Any) -> AttentionFn:
    return PerformerAttention(head_dim, **options)


def _linformer(*, head_dim: int, **options: Any) -> AttentionFn:
    return LinformerAttention(**options)


def _linformer_length(n: int, options: dict[str, Any]) -> dict[str, Any]:
    """Projections sized for ``n`` keys, the rank at most ``n``."""
    return {"max_len": n, **options, "rank": min(options.get("rank", 256), n)}


def _exact_kernel(n: int, options: dict[str, Any]) -> dict[str, Any]:
    """The exact sparse (tile-skipping) kernel for a sparsity pattern."""
    return {"backend": "chunked", **options}


#: name -> :class:`Approximation` (called as a builder ``(head_dim=D, **options)``); options
#: are each method's keyword arguments (``num_features``, ``num_landmarks``, ``rank``,
#: ``block_size``, ...).
APPROXIMATIONS: dict[str, Approximation] = {
    "linear": Approximation(_partial(linear_attention), rows=linear_rows),
    "performer": Approximation(
        _performer,
        knob="num_features",
        sweep=(16, 32, 64, 128, 256, 512),
        fixed={"seed": 0},
        speed={"num_features": 256},
        short={"num_features": 32},
        rows=performer_rows,
    ),
    "nystrom": Approximation(
        _partial(nystrom_attention),
        knob="num_landmarks",
        sweep=(8, 16, 32, 64, 128, 256),
        speed={"num_landmarks": 64},
        short={"num_landmarks": 16},
        knob_below_length=True,
    ),
    "linformer": Approximation(
        _linformer,
        knob="rank",
        sweep=(),  # learned projections: untrained, they measure nothing
        speed={"rank": 256},
        short={"rank": 16},
        for_length=_linformer_length,
    ),
    "bigbird": Approximation(
        _partial(bigbird_attention),
        knob="block_size",
        sweep=(4, 8, 16, 32, 64),
        speed={"block_size": 64},
        short={"block_size": 8},
        rows=bigbird_rows,
        knob_below_length=True,
        for_length=_exact_kernel,
    ),
    "local": Approximation(
        _partial(local_attention),
        knob="window",
        sweep=(8, 16, 32, 64, 128, 256),
        speed={"window": 128},
        short={"window": 8},
        rows=local_rows,
        knob_below_length=True,
        for_length=_exact_kernel,
    ),
}


def make_attention(name: str, *, head_dim: int, **options: Any) -> AttentionFn:
    """Build the approximation ``name`` (see :data:`APPROXIMATIONS`) for heads of size ``D``.

    Returns a function, or an ``nn.Module`` for methods with state (performer's features,
    linformer's projections), called as ``fn(q, k, v, mask=..., causal=...)``.

    Raises:
        ValueError: an unknown ``name`` (the message lists the known ones), or bad options.
    """
    if name not in APPROXIMATIONS:
        raise ValueError(
            f"unknown attention={name!r}; choose 'exact' or one of {sorted(APPROXIMATIONS)}"
        )
    try:
        return APPROXIMATIONS[name](head_dim=head_dim, **options)
    except TypeError as error:  # an option the method does not take
        raise ValueError(f"attention={name!r}: bad attention_options {options}: {error}") from None


def check_attention_config(attention: object, options: object) -> None:
    """A model config's ``attention`` (``"exact"`` or a name in :data:`APPROXIMATIONS`) and
    its ``attention_options`` (None or a dict), or a ``ValueError`` naming them."""
    known = ("exact", *APPROXIMATIONS)
    if not isinstance(attention, str) or attention not in known:
        raise ValueError(f"attention must be one of {list(known)}; got attention={attention!r}")
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"attention_options must be a dict or None; got {type(options).__name__}")
    if attention == "exact" and options:
        raise ValueError(f"attention='exact' takes no attention_options; got {options}")
