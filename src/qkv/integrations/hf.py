r"""qkv as the attention of Hugging Face ``transformers`` models.

::

    import qkv.integrations.hf                       # registers "qkv" (once, idempotent)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, attn_implementation="qkv")
    out = model(**batch, output_attentions=True)     # weights from qkv.attention_weights

Any model that dispatches through ``transformers``' attention interface (BERT, GPT-2, Llama and
most recent ones) then runs its attention on :func:`qkv.attention`, with ``auto`` (or the backend
set by :func:`use_backend`) choosing the kernel.

Two registrations, both needed:

- ``AttentionInterface.register("qkv", attention_forward)``: the attention itself;
- ``AttentionMaskInterface.register("qkv", sdpa_mask)``: the mask builder. Without it
  ``transformers`` treats "qkv" as an implementation that needs no mask and passes
  ``attention_mask=None``, which silently ignores padding. ``sdpa_mask`` builds a boolean mask
  ``(B, 1, Nq, Nk)`` with True = attend (qkv's own convention), or None when the mask is plain
  causal or absent, in which case ``is_causal`` says which.

What the interface passes and where it goes (:func:`attention_forward`)::

    query (B, Hq, Nq, D), key/value (B, Hkv, Nk, D)  -> q, k, v (GQA without repeating K/V)
    attention_mask bool (B|1, 1|H, Nq, Nk)           -> mask
    attention_mask float (an additive mask)          -> bias (added to the scaled scores)
    position_bias float (T5-style)                   -> bias (summed with a float mask)
    scaling                                          -> scale
    dropout                                          -> dropout_p
    is_causal (mask None, Nq > 1)                    -> causal="top_left"
    sliding_window (mask None)                       -> masks.sliding_window(w - 1)
    softcap                                          -> a score function cap * tanh(s / cap)
    output_attentions=True                           -> qkv.attention_weights (before dropout)

With ``output_attentions=True`` the forward still runs on the efficient backend; the
probabilities are recomputed by :func:`qkv.attention_weights`, key tile by key tile, so no
backend has to form them (``transformers``' own ``sdpa`` path cannot return them at all).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from qkv import masks
from qkv.functional.attention import attention
from qkv.functional.weights import attention_weights
from qkv.scores import ScoreMod, softcap

__all__ = ["NAME", "attention_forward", "current_backend", "register", "use_backend"]

NAME = "qkv"
_state = {"backend": "auto"}


def use_backend(name: str) -> None:
    """The :func:`qkv.attention` backend every ``attn_implementation="qkv"`` model calls
    (``"auto"`` by default), e.g. ``"chunked"`` or ``"reference"``."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str; got {type(name).__name__}")
    _state["backend"] = name


def current_backend() -> str:
    """The backend set by :func:`use_backend`."""
    return _state["backend"]


def _causal_for(attention_mask: Tensor | None, is_causal: bool, q_len: int) -> bool:
    """The causal flag, as ``transformers``' sdpa path decides it: only when no mask was built
    (a built mask already holds the causal pattern) and there is more than one query (a single
    decoding query sees the whole cache). Top-left alignment equals sdpa's cropping of the keys
    to ``Nq`` for a prefill into an empty static cache."""
    return attention_mask is None and is_causal and q_len > 1


def _float_bias(attention_mask: Tensor | None, position_bias: Tensor | None) -> Tensor | None:
    """The additive part: a float mask and/or a position bias, summed."""
    parts = [t for t in (attention_mask, position_bias) if t is not None and t.is_floating_point()]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def _softcapped(cap: float, bias: Tensor | None, shape: tuple[int, int, int, int]) -> ScoreMod:
    """``cap * tanh(s / cap)`` then the additive bias, as eager attention orders them (the cap
    applies to the scaled scores, the mask is added after)."""
    if bias is None:
        return softcap(cap)  # typed: the kernels that compute softcap read its cap

    def score(s: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        s = cap * torch.tanh(s / cap)
        if bias is None:
            return s
        return s + bias.expand(shape)[b, h, q_idx, kv_idx].to(s.dtype)

    return ScoreMod(score, f"softcap({cap}) + bias")


def _fit_keys(t: Tensor | None, kv_len: int) -> Tensor | None:
    """A mask or bias cut to the ``Nk`` keys (a static cache's mask can be longer)."""
    if t is None or t.shape[-1] == kv_len:
        return t
    return t[..., :kv_len]


def _options(
    query: Tensor,
    key: Tensor,
    attention_mask: Tensor | None,
    *,
    scaling: float | None,
    is_causal: bool,
    sliding_window: int | None,
    softcap: float | None,
    position_bias: Tensor | None,
) -> dict[str, Any]:
    """qkv's ``mask``, ``bias``, ``causal`` and ``scale`` for one interface call."""
    B, Hq, Nq, _ = query.shape
    Nk = key.shape[2]
    attention_mask = _fit_keys(attention_mask, Nk)
    position_bias = _fit_keys(position_bias, Nk)
    causal = _causal_for(attention_mask, is_causal, Nq)
    mask: Any = (
        attention_mask
        if attention_mask is not None and not attention_mask.is_floating_point()
        else None
    )
    if attention_mask is None and sliding_window is not None:
        # transformers' window: q - sliding_window < kv, i.e. the query and w - 1 keys before it;
        # a built mask already holds it. Queries sit at the end of the keys (a cache).
        mask = masks.sliding_window(sliding_window - 1, offset=0 if causal else Nk - Nq)
    bias: Any = _float_bias(attention_mask, position_bias)
    if softcap is not None:
        bias = _softcapped(float(softcap), bias, (B, Hq, Nq, Nk))
    return {"mask": mask, "bias": bias, "causal": causal, "scale": scaling}


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    position_bias: Tensor | None = None,
    output_attentions: bool = False,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The ``transformers`` attention-interface function over :func:`qkv.attention`.

    Args:
        module: the calling attention module (its ``is_causal`` is the default of ``is_causal``).
        query: ``(B, Hq, Nq, D)``.
        key: ``(B, Hkv, Nk, D)``; ``Hq`` a multiple of ``Hkv`` (grouped-query attention runs
            without repeating the keys and values).
        value: ``(B, Hkv, Nk, Dv)``.
        attention_mask: None, a bool ``(B|1, 1|Hq, Nq, Nk)`` mask (True = attend), or a float
            additive mask of that shape.
        dropout: attention dropout probability (the module passes 0 in eval mode).
        scaling: multiplies ``q k^T``; default ``1 / sqrt(D)``.
        is_causal: whether the call is causal when no mask was built; default the module's.
        sliding_window: the local window, when no mask was built.
        softcap: ``cap`` of ``cap * tanh(s / cap)`` on the scaled scores.
        position_bias: float ``(B|1, Hq|1, Nq, Nk)`` added to the scaled scores.
        output_attentions: also return the probabilities ``(B, Hq, Nq, Nk)`` (before dropout).

    Returns:
        ``out (B, Nq, Hq, Dv)`` (the layout the modules reshape), and the weights or None.

    Raises:
        ValueError: for attention sinks (``s_aux``), which qkv does not implement.
    """
    if kwargs.get("s_aux") is not None:
        raise ValueError(
            "attn_implementation='qkv' does not support attention sinks (s_aux); use 'eager'"
        )
    causal_default = bool(getattr(module, "is_causal", True))
    options = _options(
        query,
        key,
        attention_mask,
        scaling=scaling,
        is_causal=causal_default if is_causal is None else bool(is_causal),
        sliding_window=sliding_window,
        softcap=softcap,
        position_bias=position_bias,
    )
    out = attention(query, key, value, dropout_p=dropout, backend=current_backend(), **options)
    weights = attention_weights(query, key, value, **options) if output_attentions else None
    return out.transpose(1, 2).contiguous(), weights  # (B, Nq, Hq, Dv)


def register() -> None:
    """Register ``"qkv"`` with ``transformers``' attention and attention-mask interfaces
    (idempotent; importing this module does it).

    Raises:
        ImportError: ``transformers`` is not installed (``pip install -e '.[hf]'``).
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as error:
        raise ImportError(
            f"qkv.integrations.hf needs transformers >= 5: pip install -e '.[hf]' ({error})"
        ) from None
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


register()
