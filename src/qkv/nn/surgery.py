"""Model surgery: change the attention of every :class:`MultiHeadAttention` in a built model.

Both work on any module tree (a model built here, a loaded checkpoint, a pretrained encoder)
and change the modules in place:

- :func:`swap_attention` puts an approximation (:mod:`qkv.approx`, NOT exact), a callable of
  your own, or exact attention back into every selected module;
- :func:`set_attention_backend` makes every module's exact attention call one backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from qkv.backends.registry import available_backends
from qkv.nn.multihead import MultiHeadAttention

__all__ = ["check_backend", "set_attention_backend", "swap_attention"]


def swap_attention(
    model: nn.Module,
    attention: str | Callable[..., Any],
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
        attention: ``"exact"``, a name from :data:`qkv.approx.APPROXIMATIONS`, or a callable
            ``fn(q, k, v, *, mask, causal) -> (B, Hq, Nq, Dv)`` (shared by every module).
        where: ``where(qualified_name, module) -> bool`` selects modules (default: all), e.g.
            ``lambda name, m: "cross_attn" not in name``.
        **options: the method's options, e.g. ``num_features=128``.

    Returns:
        The number of modules changed.

    Raises:
        ValueError: ``model`` holds no ``MultiHeadAttention`` (selected by ``where``).
    """
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


def check_backend(backend: str) -> None:
    """Raise ``ValueError`` naming the registered backends unless ``backend`` is one (or
    ``"auto"``); checked before any work is done."""
    known = available_backends()
    if backend != "auto" and backend not in known:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(known)}; got {backend!r}")


def set_attention_backend(model: nn.Module, backend: str) -> None:
    """Make every :class:`qkv.nn.MultiHeadAttention` of ``model`` call ``backend``.

    Raises:
        ValueError: an unknown backend, naming the registered ones.
    """
    check_backend(backend)
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.backend = backend
