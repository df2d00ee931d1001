r"""Approximate attention: cheaper than ``softmax(q k^T / sqrt(D)) v``, and NOT exact.

Nothing here is registered in the backend registry (:mod:`qkv.backends`): every backend there
passes the float64 conformance suite, and none of these would. They share one signature where
the method allows it::

    out = method(q, k, v, *, mask=None, causal=False, ...)     # -> (B, Hq, Nq, Dv)

with ``q (B, Hq, Nq, D)``, ``k (B, Hkv, Nk, D)``, ``v (B, Hkv, Nk, Dv)`` and grouped-query
attention (``Hq`` a multiple of ``Hkv``) throughout.

============  =============================================  ======  ==========  ==============
name          method                                         causal  mask        cost
============  =============================================  ======  ==========  ==============
linear        elu+1 feature map (Katharopoulos et al. 2020)  yes     key pad.    O(N D Dv)
performer     FAVOR+ random features (Choromanski 2021)      yes     key pad.    O(N M Dv)
nystrom       segment-mean landmarks (Xiong et al. 2021)     no      key pad.    O(N m D)
linformer     learned projections (Wang et al. 2020)         no      key pad.    O(N r D)
bigbird       local + global + random blocks (Zaheer 2020)   yes     any         O(N w D)
local         sliding window                                 yes     any         O(N w D)
============  =============================================  ======  ==========  ==============

``bigbird`` and ``local`` are exact attention over a subset of the pairs: patterns expressed as
:mod:`qkv.masks` mask functions, run by :func:`qkv.attention` on the exact sparse kernels.
``performer`` and ``linformer`` hold state (random features, learned projections) and are
modules. :func:`make_attention` builds any of them by name; :func:`swap_attention` puts one into
every :class:`qkv.nn.MultiHeadAttention` of an already built (or loaded) model.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from qkv.approx.bigbird import bigbird_attention, bigbird_blocks, bigbird_mask, local_attention
from qkv.approx.linear import elu_feature_map, linear_attention
from qkv.approx.linformer import LinformerAttention, linformer_attention
from qkv.approx.nystrom import iterative_pinv, nystrom_attention, segment_means
from qkv.approx.performer import (
    PerformerAttention,
    orthogonal_features,
    performer_attention,
    positive_features,
)

if TYPE_CHECKING:
    from qkv.nn.multihead import MultiHeadAttention

__all__ = [
    "APPROXIMATIONS",
    "AttentionFn",
    "LinformerAttention",
    "PerformerAttention",
    "bigbird_attention",
    "bigbird_blocks",
    "bigbird_mask",
    "check_attention_config",
    "elu_feature_map",
    "iterative_pinv",
    "linear_attention",
    "linformer_attention",
    "local_attention",
    "make_attention",
    "nystrom_attention",
    "orthogonal_features",
    "performer_attention",
    "positive_features",
    "segment_means",
    "swap_attention",
]

#: ``fn(q, k, v, *, mask=..., causal=...) -> (B, Hq, Nq, Dv)``: a function or an ``nn.Module``.
AttentionFn = Callable[..., Any]


def _partial(fn: Callable[..., Any]) -> Callable[..., AttentionFn]:
    def build(*, head_dim: int, **options: Any) -> AttentionFn:
        inspect.signature(fn).bind_partial(None, None, None, **options)  # unknown options raise
        return functools.partial(fn, **options)

    return build


def _performer(*, head_dim: int, **options: Any) -> AttentionFn:
    return PerformerAttention(head_dim, **options)


def _linformer(*, head_dim: int, **options: Any) -> AttentionFn:
    return LinformerAttention(**options)


#: name -> builder ``(head_dim=D, **options) -> AttentionFn``; options are each method's
#: keyword arguments (``num_features``, ``num_landmarks``, ``rank``, ``block_size``, ...).
APPROXIMATIONS: dict[str, Callable[..., AttentionFn]] = {
    "linear": _partial(linear_attention),
    "performer": _performer,
    "nystrom": _partial(nystrom_attention),
    "linformer": _linformer,
    "bigbird": _partial(bigbird_attention),
    "local": _partial(local_attention),
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


def swap_attention(
    model: nn.Module,
    attention: str | AttentionFn,
    *,
    where: Callable[[str, MultiHeadAttention], bool] | None = None,
    **options: Any,
) -> int:
    """Make every :class:`qkv.nn.MultiHeadAttention` in ``model`` use ``attention``, in place.

    Works on any module tree (a loaded checkpoint, a pretrained encoder): each attention module
    gets its own instance (its own random features or projections), on the module's device
    and dtype; ``"exact"`` restores :func:`qkv.attention`.

    Args:
        model: any ``nn.Module``.
        attention: ``"exact"``, a name from :data:`APPROXIMATIONS`, or a callable
            ``fn(q, k, v, *, mask, causal) -> (B, Hq, Nq, Dv)`` (shared by every module).
        where: ``where(qualified_name, module) -> bool`` selects modules (default: all), e.g.
            ``lambda name, m: "cross_attn" not in name``.
        **options: the method's options, e.g. ``num_features=128``.

    Returns:
        The number of modules changed.

    Raises:
        ValueError: ``model`` holds no ``MultiHeadAttention`` (selected by ``where``).
    """
    from qkv.nn.multihead import MultiHeadAttention

    changed = 0
    for name, module in model.named_modules():
        if isinstance(module, MultiHeadAttention) and (where is None or where(name, module)):
            module.set_attention(attention, **options)
            changed += 1
    if not changed:
        raise ValueError(
            f"swap_attention: {type(model).__name__} holds no qkv MultiHeadAttention"
            + (" selected by where" if where is not None else "")
        )
    return changed
