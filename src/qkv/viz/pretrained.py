"""Pictures of an encoder's attention on one text: per-head maps, rollout, head statistics,
the offline page and a summary of a few readable figures, from the maps as tensors.

::

    pictures = encoder_pictures(tokens, maps, "out/", title="a gorgeous, witty film")

``maps`` are ``L`` tensors ``(H, N, N)``; :func:`qkv.interpret.pretrained_pictures` computes
them for a pretrained encoder and a text (``qkv viz pretrained`` and
``docs/pretrained_pictures.py`` call it). matplotlib is needed for the PNGs only
(``page_only=True`` skips them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkv.viz.page import write_page
from qkv.viz.rollout import attention_rollout
from qkv.viz.stats import HeadStats, head_stats

__all__ = ["PretrainedPictures", "attention_summary", "encoder_pictures"]


@dataclass
class PretrainedPictures:
    """What :func:`encoder_pictures` computed and wrote.

    Attributes:
        tokens: the ``N`` wordpieces, ``[CLS]`` and ``[SEP]`` included.
        maps: ``L`` tensors ``(H, N, N)``, each layer's attention probabilities.
        rollout: ``(N, N)``, attention rollout through all layers.
        stats: one :class:`~qkv.viz.HeadStats` per layer (fields ``(1, H)``).
        summary: :func:`attention_summary` of the maps.
        written: the files written, in order.
    """

    tokens: list[str]
    maps: list[Tensor]
    rollout: Tensor
    stats: list[HeadStats]
    summary: dict[str, Any]
    written: list[Path] = field(default_factory=list)


def attention_summary(maps: Sequence[Tensor], tokens: Sequence[str]) -> dict[str, Any]:
    """A few figures that can be quoted in prose, from ``L`` maps ``(H, N, N)`` of one text
    that starts with ``[CLS]`` and ends with ``[SEP]`` (``N >= 3``).

    Per layer: mean entropy, mean attended distance, weight on ``[CLS]``/``[SEP]``. Per head
    (lists of ``L`` lists of ``H``): the mean weight each word (not ``[CLS]``/``[SEP]``) puts on
    the previous token, the next token and ``[CLS]``. From the rollout: the mean share of
    ``[CLS]``, ``[SEP]`` and the position itself, and the (up to) five inputs ``[CLS]`` reads most.
    """
    n = maps[0].shape[-1]
    if n < 3 or len(tokens) != n:
        raise ValueError(f"need N >= 3 tokens matching the maps; got {len(tokens)} tokens, N={n}")
    words = torch.arange(1, n - 1)

    def per_head(offset: int | None) -> list[list[float]]:
        cols = torch.zeros_like(words) if offset is None else words + offset
        return [[round(float(x), 2) for x in m[:, words, cols].mean(-1)] for m in maps]

    stats = [head_stats(m) for m in maps]
    rollout = attention_rollout([m.unsqueeze(0) for m in maps])[0]  # (N, N)
    return {
        "tokens": list(tokens),
        "mean_entropy_per_layer": [round(float(s.entropy.mean()), 3) for s in stats],
        "mean_distance_per_layer": [round(float(s.mean_distance.mean()), 3) for s in stats],
        "cls_or_sep_weight_per_layer": [
            round(float(m[:, :, [0, -1]].sum(-1).mean()), 3) for m in maps
        ],
        "previous_token_weight": per_head(-1),
        "next_token_weight": per_head(1),
        "cls_weight": per_head(None),
        "rollout_share_from_cls": round(float(rollout[:, 0].mean()), 3),
        "rollout_share_from_sep": round(float(rollout[:, -1].mean()), 3),
        "rollout_share_from_self": round(float(rollout.diagonal()[1:].mean()), 3),
        "top_rollout_inputs_of_cls": [
            tokens[int(j)] for j in torch.topk(rollout[0], min(5, n)).indices
        ],
    }


def encoder_pictures(
    tokens: Sequence[str],
    maps: Sequence[Tensor],
    out: str | os.PathLike[str],
    *,
    title: str,
    layers: Sequence[int] | None = None,
    name: str = "pretrained encoder",
    page: bool = True,
    page_only: bool = False,
    dpi: int = 100,
) -> PretrainedPictures:
    """Compute and write the attention pictures of an encoder's ``maps`` on one text into
    ``out`` (:func:`qkv.interpret.pretrained_pictures` computes the maps of a model).

    Writes ``heads_layer{i}.png`` (a grid of every head) for each layer in ``layers``,
    ``rollout.png``, ``head_stats.png``, ``summary.json`` and, with ``page``,
    ``attention.html`` (the offline interactive page, every layer).

    Args:
        tokens: the ``N`` tokens of the text (``[CLS]`` first, ``[SEP]`` last).
        maps: ``L`` tensors ``(H, N, N)``, each layer's attention probabilities.
        out: the folder (created).
        title: the page's title (the text).
        layers: the layers drawn head by head (default all; 0-based).
        name: the model's name in the titles.
        page: also write the interactive page.
        page_only: write the page and the summary only (no matplotlib needed).
        dpi: resolution of the PNGs.

    Raises:
        ValueError: a layer out of range (named).
    """
    tokens = list(tokens)
    maps = [m.float() for m in maps]  # L x (H, N, N)
    chosen = list(range(len(maps))) if layers is None else list(layers)
    bad = [i for i in chosen if not 0 <= i < len(maps)]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {len(maps)} (0-based)")
    stats = [head_stats(m.unsqueeze(0)) for m in maps]  # fields (1, H)
    rollout = attention_rollout([m.unsqueeze(0) for m in maps])[0]  # (N, N)
    result = PretrainedPictures(tokens, maps, rollout, stats, attention_summary(maps, tokens))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    if not page_only:
        result.written += layer_figures(result, chosen, folder, name=name, dpi=dpi)
    if page or page_only:
        layers_page = {f"layer {i}": m for i, m in enumerate(maps)}
        result.written.append(
            write_page(folder / "attention.html", layers_page, tokens, tokens, title=title)
        )
    summary_path = folder / "summary.json"
    summary_path.write_text(json.dumps(result.summary, indent=1) + "\n")
    result.written.append(summary_path)
    return result


def layer_figures(
    result: PretrainedPictures,
    layers: Sequence[int],
    folder: Path,
    *,
    name: str,
    dpi: int,
    columns: int = 6,
) -> list[Path]:
    """Write the head grid of each of ``layers``, the rollout and the head statistics of
    ``result`` into ``folder``; returns the paths (encoders and decoders alike)."""
    from qkv.viz.figures import attention_heatmap, head_grid, head_stats_figure, save_figure

    tokens = result.tokens
    written = []
    for layer in layers:
        fig = head_grid(
            result.maps[layer], tokens, tokens, title=f"{name}, layer {layer}", columns=columns
        )
        written.append(save_figure(fig, folder / f"heads_layer{layer}.png", dpi=dpi))
    fig = attention_heatmap(
        result.rollout,
        tokens,
        tokens,
        title=f"attention rollout through {len(result.maps)} layers",
        x_label="input token",
        y_label="output position",
    )
    written.append(save_figure(fig, folder / "rollout.png", dpi=dpi))
    fig = head_stats_figure(result.stats, title=f"{name}: per-head statistics (layers x heads)")
    written.append(save_figure(fig, folder / "head_stats.png", dpi=dpi))
    return written
