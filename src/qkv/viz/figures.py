"""Attention as pictures: heat maps, per-head grids, mask patterns, head statistics.

Every function takes tensors (and token strings) and returns a ``matplotlib.figure.Figure``; none
shows a window or prints. Figures are built with ``Figure()`` directly instead of ``pyplot``, so
no GUI backend is touched, no global figure list grows, and they work on a machine with no screen.
matplotlib is imported only when a function runs (``pip install -e '.[viz]'``).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from qkv.viz._checks import FIGURE_METADATA, as_weights, token_labels, write_atomically
from qkv.viz.stats import HeadStats

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from qkv.masks import MaskFunction

__all__ = [
    "attention_heatmap",
    "head_grid",
    "head_stats_figure",
    "mask_grid",
    "mask_picture",
    "save_figure",
]

# Perceptually uniform (dark = 0, bright = the maximum) and still ordered when printed in grey.
CMAP = "viridis"
# Inches per token on a heat-map axis, clamped so long sentences stay on a page.
CELL_INCHES = 0.32


def _new_figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("qkv.viz figures need matplotlib: pip install -e '.[viz]'") from error
    return Figure(figsize=(width, height), layout="constrained")


def _side(n: int, *, lo: float = 2.5, hi: float = 14.0) -> float:
    return min(max(n * CELL_INCHES + 1.5, lo), hi)


def _label_axes(ax: Axes, x_labels: list[str], y_labels: list[str]) -> None:
    """Tick every token when they fit; thin the ticks out on long sequences."""
    for labels, set_ticks, set_labels, rotation in (
        (x_labels, ax.set_xticks, ax.set_xticklabels, 90),
        (y_labels, ax.set_yticks, ax.set_yticklabels, 0),
    ):
        stride = max(1, math.ceil(len(labels) / 60))
        ticks = list(range(0, len(labels), stride))
        set_ticks(ticks)
        set_labels([labels[i] for i in ticks], rotation=rotation, fontsize=8)


def attention_heatmap(
    weights: Tensor,
    source_tokens: Sequence[str] | None = None,
    target_tokens: Sequence[str] | None = None,
    *,
    title: str | None = None,
    x_label: str = "source (keys)",
    y_label: str = "target (queries)",
) -> Figure:
    """Heat map of one attention matrix: target (query) tokens down, source (key) tokens across.

    Args:
        weights: ``(Nt, Ns)`` attention probabilities, e.g. one head's or the head-mean of
            ``qkv.attention(..., return_weights=True)[1][b]`` for a translation's cross-attention.
        source_tokens: ``Ns`` key-side labels (default: positions ``0..Ns-1``).
        target_tokens: ``Nt`` query-side labels (default: positions).
        title: drawn above the map.
        x_label, y_label: axis captions, e.g. ``"input token"`` and ``"output position"`` for
            an attention rollout.

    Returns:
        A figure with two axes: the map and its colour bar.
    """
    values = as_weights(weights, "weights", 2, "(Nt, Ns)")
    nt, ns = values.shape
    sources = token_labels(source_tokens, ns, "source_tokens")
    targets = token_labels(target_tokens, nt, "target_tokens")
    fig = _new_figure(_side(ns) + 1.0, _side(nt))
    ax = fig.add_subplot()
    image = ax.imshow(values.numpy(), cmap=CMAP, vmin=0.0, aspect="auto", interpolation="nearest")
    _label_axes(ax, sources, targets)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if title is not None:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, label="attention weight")
    return fig


def head_grid(
    weights: Tensor,
    source_tokens: Sequence[str] | None = None,
    target_tokens: Sequence[str] | None = None,
    *,
    title: str | None = None,
    columns: int = 4,
    head_names: Sequence[str] | None = None,
) -> Figure:
    """One small heat map per head, sharing one colour scale.

    Args:
        weights: ``(H, Nq, Nk)`` attention probabilities of one example and layer.
        source_tokens, target_tokens: ``Nk`` and ``Nq`` labels (default: positions).
        title: figure title.
        columns: maps per row of the grid.
        head_names: ``H`` panel titles (default ``"head 0"`` ...).

    Returns:
        A figure with ``H + 1`` axes: one per head, in head order, then the shared colour bar.
    """
    values = as_weights(weights, "weights", 3, "(H, Nq, Nk)")
    if columns < 1:
        raise ValueError(f"columns must be >= 1; got {columns}")
    heads, nq, nk = values.shape
    names = token_labels(
        head_names if head_names is not None else [f"head {h}" for h in range(heads)],
        heads,
        "head_names",
    )
    sources = token_labels(source_tokens, nk, "source_tokens")
    targets = token_labels(target_tokens, nq, "target_tokens")
    cols = min(columns, heads)
    rows = math.ceil(heads / cols)
    panel = min(max(max(nq, nk) * 0.18 + 1.2, 2.2), 5.0)
    fig = _new_figure(cols * panel + 0.8, rows * panel + (0.4 if title else 0.0))
    top = float(values.max())
    images = []
    for h in range(heads):
        ax = fig.add_subplot(rows, cols, h + 1)
        images.append(
            ax.imshow(
                values[h].numpy(),
                cmap=CMAP,
                vmin=0.0,
                vmax=top,
                aspect="auto",
                interpolation="nearest",
            )
        )
        ax.set_title(names[h], fontsize=9)
        if max(nq, nk) <= 24:
            _label_axes(ax, sources, targets)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    if title is not None:
        fig.suptitle(title)
    # Every map uses vmin=0, vmax=top, so any one of them defines the shared scale.
    fig.colorbar(images[0], ax=fig.axes, shrink=0.8, label="attention weight")
    return fig


def _mask_matrix(mask: MaskFunction | Tensor, num_queries: int, num_keys: int) -> Tensor:
    """``(Nq, Nk)`` bool matrix of a mask function or a bool tensor broadcastable to it."""
    for name, value in (("num_queries", num_queries), ("num_keys", num_keys)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if isinstance(mask, Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = attend); got {mask.dtype}")
        matrix = mask.detach().cpu()
    elif callable(mask):
        # The index layout of qkv.masks for one batch row and head: b and h (1, 1, 1, 1),
        # q_idx (1, 1, Nq, 1), kv_idx (1, 1, 1, Nk), so hand-written mask functions see what
        # qkv.attention gives them.
        zero = torch.zeros(1, 1, 1, 1, dtype=torch.long)
        q_idx = torch.arange(num_queries).view(1, 1, -1, 1)
        kv_idx = torch.arange(num_keys).view(1, 1, 1, -1)
        matrix = torch.as_tensor(mask(zero, zero, q_idx, kv_idx)).cpu()
    else:
        raise TypeError(
            f"mask must be a mask function (b, h, q_idx, kv_idx) -> bool or a bool tensor; got "
            f"{type(mask).__name__}"
        )
    while matrix.ndim > 2 and matrix.shape[0] == 1:
        matrix = matrix[0]
    try:
        return torch.broadcast_to(matrix, (num_queries, num_keys)).bool()
    except RuntimeError as error:
        raise ValueError(
            f"mask of shape {tuple(matrix.shape)} does not broadcast to (Nq, Nk) = "
            f"({num_queries}, {num_keys})"
        ) from error


def _draw_mask(ax: Axes, matrix: Tensor, title: str | None) -> None:
    nq, nk = matrix.shape
    ax.imshow(matrix.float().numpy(), cmap="Blues", vmin=0.0, vmax=1.25, interpolation="nearest")
    # Cell borders make individual query/key pairs countable on small pictures.
    ax.set_xticks([x - 0.5 for x in range(1, nk)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, nq)], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    stride = max(1, math.ceil(max(nq, nk) / 16))
    ax.set_xticks(range(0, nk, stride))
    ax.set_yticks(range(0, nq, stride))
    if title is not None:
        ax.set_title(title, fontsize=9)


def mask_picture(
    mask: MaskFunction | Tensor, num_queries: int, num_keys: int, *, title: str | None = None
) -> Figure:
    """Draw which keys each query may attend to (dark = attend).

    Args:
        mask: a mask function ``(b, h, q_idx, kv_idx) -> bool`` such as ``qkv.masks.causal()``
            (drawn for batch 0, head 0), or a bool tensor broadcastable to ``(Nq, Nk)``.
        num_queries, num_keys: ``Nq`` and ``Nk``.
        title: default: the mask's name when it has one.

    Returns:
        A figure with one axes.
    """
    matrix = _mask_matrix(mask, num_queries, num_keys)
    fig = _new_figure(_side(num_keys, hi=8.0), _side(num_queries, hi=8.0))
    _draw_mask(fig.add_subplot(), matrix, title if title is not None else _mask_name(mask))
    return fig


def mask_grid(
    masks: Mapping[str, MaskFunction | Tensor], num_queries: int, num_keys: int, *, columns: int = 4
) -> Figure:
    """Several masks side by side, titled by their keys in ``masks``. One axes per mask."""
    if not masks:
        raise ValueError("masks must name at least one mask; got an empty mapping")
    if columns < 1:
        raise ValueError(f"columns must be >= 1; got {columns}")
    cols = min(columns, len(masks))
    rows = math.ceil(len(masks) / cols)
    panel = min(max(max(num_queries, num_keys) * 0.22 + 0.8, 2.4), 4.5)
    fig = _new_figure(cols * panel, rows * panel)
    for index, (name, mask) in enumerate(masks.items()):
        matrix = _mask_matrix(mask, num_queries, num_keys)
        _draw_mask(fig.add_subplot(rows, cols, index + 1), matrix, name)
    return fig


def _mask_name(mask: object) -> str | None:
    name = getattr(mask, "name", None)
    return name if isinstance(name, str) else None


STAT_TITLES = {
    "entropy": "entropy (nats)",
    "max_weight": "max weight",
    "mean_distance": "mean distance (tokens)",
    "diagonal_distance": "distance from diagonal",
    "first_token_weight": "weight on first token",
}


def head_stats_figure(
    stats: HeadStats | Sequence[HeadStats], *, title: str | None = None
) -> Figure:
    """Plot per-head statistics.

    Args:
        stats: one :class:`HeadStats` (a bar per head, averaged over the batch), or one per
            layer, first layer first (a layers x heads heat map per statistic; every layer
            needs the same head count).
        title: figure title.

    Returns:
        A figure with one axes per statistic (five), plus one colour bar each for the per-layer
        form.
    """
    if isinstance(stats, HeadStats):
        return _stats_bars(stats.batch_mean(), title)
    layers = [s.batch_mean() for s in stats]
    if not layers or not all(isinstance(s, HeadStats) for s in layers):
        raise TypeError("stats must be a HeadStats or a non-empty sequence of HeadStats")
    heads = {s.num_heads for s in layers}
    if len(heads) != 1:
        raise ValueError(f"every layer's HeadStats needs the same head count; got {sorted(heads)}")
    return _stats_maps(layers, title)


def _stats_bars(stats: HeadStats, title: str | None) -> Figure:
    fig = _new_figure(3.0 * len(STAT_TITLES), 3.0)
    heads = list(range(stats.num_heads))
    for index, (name, value) in enumerate(stats.as_dict().items()):
        ax = fig.add_subplot(1, len(STAT_TITLES), index + 1)
        ax.bar(heads, value.double().numpy(), color="#3b6ea8")
        ax.set_title(STAT_TITLES[name], fontsize=9)
        ax.set_xlabel("head")
        ax.set_xticks(heads)
    if title is not None:
        fig.suptitle(title)
    return fig


def _stats_maps(layers: list[HeadStats], title: str | None) -> Figure:
    fig = _new_figure(3.4 * len(STAT_TITLES), 0.35 * len(layers) + 2.0)
    for index, name in enumerate(STAT_TITLES):
        table = torch.stack([getattr(s, name) for s in layers]).double()  # (L, H)
        ax = fig.add_subplot(1, len(STAT_TITLES), index + 1)
        image = ax.imshow(table.numpy(), cmap=CMAP, aspect="auto", interpolation="nearest")
        ax.set_title(STAT_TITLES[name], fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(table.shape[1]))
        ax.set_yticks(range(table.shape[0]))
        fig.colorbar(image, ax=ax)
    if title is not None:
        fig.suptitle(title)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 110) -> Path:
    """Save ``fig`` to ``path`` atomically; the format follows the suffix (``.png``, ``.svg``,
    ``.pdf``). Returns the path written."""
    target = Path(path)
    fmt = target.suffix.lstrip(".").lower()
    if not fmt:
        raise ValueError(
            f"path needs a suffix naming the image format (.png, .svg, ...); got {path}"
        )
    buffer = io.BytesIO()
    # The mark lets a later qkv command tell its own picture from a user's file of the same name.
    fig.savefig(buffer, format=fmt, dpi=dpi, metadata=FIGURE_METADATA.get(fmt))
    return write_atomically(target, buffer.getvalue())
