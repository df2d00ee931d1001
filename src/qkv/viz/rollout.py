"""Attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in Transformers").

Raw attention of one layer says which *hidden states* a position mixes, not which *input tokens*.
Rollout follows the mixing down the stack: with ``A_l`` the head-reduced weights of layer ``l``,

    Â_l = normalize_rows(A_l + I)      (residual=True: the skip connection keeps half of the token)
    R   = Â_L @ Â_{L-1} @ ... @ Â_1

so ``R[b, i, j]`` is how much of output position ``i`` traces back to input token ``j``. Adding
``I`` and renormalising is the paper's ``0.5 * A + 0.5 * I`` when the rows of ``A`` sum to one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from qkv.viz._checks import as_weights, check_nonnegative

__all__ = ["HeadReduce", "attention_rollout"]

HeadReduce = Literal["mean", "max", "min"]


def attention_rollout(
    layer_weights: Sequence[Tensor],
    *,
    residual: bool = True,
    head_reduce: HeadReduce = "mean",
) -> Tensor:
    """Roll attention out through a stack of self-attention layers.

    Args:
        layer_weights: one ``(B, H, N, N)`` tensor of attention probabilities per layer, first
            layer (nearest the input) first. Head counts may differ between layers.
        residual: add the identity before renormalising, accounting for the residual stream.
        head_reduce: how to merge the heads of a layer: ``"mean"`` (the paper), ``"max"`` or
            ``"min"``.

    Returns:
        ``(B, N, N)`` float32 tensor; row ``i`` is the share of output position ``i`` that comes
        from each input token. Rows sum to one (a row that is entirely zero, e.g. a fully masked
        query with ``residual=False``, stays zero).

    Raises:
        ValueError: no layers, a layer not ``(B, H, N, N)``, layers of different ``B`` or ``N``,
            negative weights, or an unknown ``head_reduce``.
    """
    if head_reduce not in ("mean", "max", "min"):
        raise ValueError(f"head_reduce must be 'mean', 'max' or 'min'; got {head_reduce!r}")
    layers = list(layer_weights)
    if not layers:
        raise ValueError("layer_weights must hold at least one (B, H, N, N) tensor; got none")
    steps = [
        _layer_step(_check_layer(w, i), residual=residual, head_reduce=head_reduce)
        for i, w in enumerate(layers)
    ]  # each (B, N, N)
    for index, step in enumerate(steps):
        if step.shape != steps[0].shape:
            raise ValueError(
                f"layer_weights[{index}] has (B, N, N) = {tuple(step.shape)} but layer_weights[0] "
                f"has {tuple(steps[0].shape)}; every layer needs the same B and N"
            )
    rollout = steps[0]
    for step in steps[1:]:
        # Later layers act on the output of earlier ones, so they multiply from the left.
        rollout = step @ rollout  # (B, N, N)
    return rollout.to(torch.float32)


def _check_layer(weights: Tensor, index: int) -> Tensor:
    name = f"layer_weights[{index}]"
    values = as_weights(weights, name, 4, "(B, H, N, N)")
    if values.shape[-1] != values.shape[-2]:
        raise ValueError(
            f"{name} must be self-attention weights (B, H, N, N) with Nq == Nk; got "
            f"{tuple(values.shape)}"
        )
    check_nonnegative(values, name)
    return values


def _layer_step(weights: Tensor, *, residual: bool, head_reduce: HeadReduce) -> Tensor:
    """One layer's row-stochastic mixing matrix ``(B, N, N)`` from its ``(B, H, N, N)`` weights."""
    if head_reduce == "mean":
        merged = weights.mean(dim=1)  # (B, N, N)
    elif head_reduce == "max":
        merged = weights.amax(dim=1)
    else:
        merged = weights.amin(dim=1)
    if residual:
        merged = merged + torch.eye(merged.shape[-1], dtype=merged.dtype)
    # max/min of heads do not keep rows summing to one; renormalise always. A zero row stays zero.
    totals = merged.sum(dim=-1, keepdim=True)
    return merged / torch.where(totals > 0, totals, torch.ones_like(totals))
