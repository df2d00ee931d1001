"""Pictures of a causal decoder's attention on one text, from tensors: per-head maps, rollout,
head statistics, the offline page, a summary, and the head-finder scores as layers x heads maps.

::

    maps = [m[0] for m in model.attention_maps(ids)]          # L x (H, N, N), causal
    pictures = decoder_pictures(maps, tokens, "out/", head_scores=scores.to_dict())

Nothing here knows the model: the maps come from the caller (``qkv viz pretrained`` on a decoder
computes them with :meth:`~qkv.models.pretrained.llama.LlamaDecoder.attention_maps`). matplotlib
is needed for the PNGs only (``page_only=True`` skips them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkv.viz.page import write_page
from qkv.viz.pretrained import PretrainedPictures, layer_figures
from qkv.viz.rollout import attention_rollout
from qkv.viz.stats import head_stats

__all__ = ["decoder_pictures", "decoder_summary", "head_scores_figure"]


def decoder_summary(maps: Sequence[Tensor], tokens: Sequence[str]) -> dict[str, Any]:
    """Quotable figures from ``L`` causal maps ``(H, N, N)`` of one text (``N >= 3``).

    Per layer: mean entropy, mean attended distance, weight on the first token (the sink) and on
    the previous token, averaged over queries ``1 .. N-1`` and heads. From the rollout: the
    share of the first token, and the (up to) five inputs the last position reads most.
    """
    n = maps[0].shape[-1]
    if n < 3 or len(tokens) != n:
        raise ValueError(f"need N >= 3 tokens matching the maps; got {len(tokens)} tokens, N={n}")
    q = torch.arange(1, n)
    stats = [head_stats(m) for m in maps]
    rollout = attention_rollout([m.unsqueeze(0) for m in maps])[0]  # (N, N)
    return {
        "tokens": list(tokens),
        "mean_entropy_per_layer": [round(float(s.entropy.mean()), 3) for s in stats],
        "mean_distance_per_layer": [round(float(s.mean_distance.mean()), 3) for s in stats],
        "first_token_weight_per_layer": [round(float(m[:, 1:, 0].mean()), 3) for m in maps],
        "previous_token_weight_per_layer": [round(float(m[:, q, q - 1].mean()), 3) for m in maps],
        "rollout_share_from_first": round(float(rollout[1:, 0].mean()), 3),
        "top_rollout_inputs_of_last": [
            tokens[int(j)] for j in torch.topk(rollout[-1], min(5, n)).indices
        ],
    }


def decoder_pictures(
    maps: Sequence[Tensor],
    tokens: Sequence[str],
    out: str | os.PathLike[str],
    *,
    layers: Sequence[int] | None = None,
    name: str = "decoder",
    title: str = "",
    head_scores: Mapping[str, Sequence[Sequence[float]]] | None = None,
    page: bool = True,
    page_only: bool = False,
    dpi: int = 100,
) -> PretrainedPictures:
    """Write the attention pictures of one text into ``out``.

    Writes ``heads_layer{i}.png`` for each layer in ``layers`` (default: none, as a decoder has
    many), ``rollout.png``, ``head_stats.png``, ``summary.json``, with ``head_scores``
    ``heads.png`` and ``heads.json``, and with ``page`` ``attention.html`` (every layer).

    Args:
        maps: ``L`` tensors ``(H, N, N)``, each layer's causal attention probabilities.
        tokens: the ``N`` token strings.
        out: the folder (created).
        layers: layers drawn head by head (0-based).
        name: the model's name in the titles.
        title: the page's title (e.g. the text).
        head_scores: ``{pattern: L lists of H scores}`` (:meth:`qkv.interpret.heads.HeadScores.to_dict`).
        page: also write the interactive page.
        page_only: the page, summary and scores only (no matplotlib needed).
        dpi: resolution of the PNGs.

    Raises:
        ValueError: maps that are not ``(H, N, N)`` alike, tokens that do not match, a layer out
            of range (named).
    """
    if not maps or any(m.ndim != 3 or m.shape != maps[0].shape for m in maps):
        raise ValueError("maps must be L >= 1 tensors (H, N, N) of one shape")
    maps = [m.float() for m in maps]
    chosen = [] if layers is None else list(layers)
    bad = [i for i in chosen if not 0 <= i < len(maps)]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {len(maps)} (0-based)")
    stats = [head_stats(m.unsqueeze(0)) for m in maps]
    rollout = attention_rollout([m.unsqueeze(0) for m in maps])[0]  # (N, N)
    result = PretrainedPictures(
        list(tokens), list(maps), rollout, stats, decoder_summary(maps, tokens)
    )
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    if not page_only:
        result.written += layer_figures(result, chosen, folder, name=name, dpi=dpi, columns=5)
        if head_scores is not None:
            fig = head_scores_figure(head_scores, title=f"{name}: heads found by pattern")
            from qkv.viz.figures import save_figure

            result.written.append(save_figure(fig, folder / "heads.png", dpi=dpi))
    if head_scores is not None:
        path = folder / "heads.json"
        path.write_text(json.dumps(dict(head_scores), indent=1) + "\n")
        result.written.append(path)
    if page or page_only:
        layers_page = {f"layer {i}": m for i, m in enumerate(maps)}
        result.written.append(
            write_page(folder / "attention.html", layers_page, tokens, tokens, title=title or name)
        )
    summary_path = folder / "summary.json"
    summary_path.write_text(json.dumps(result.summary, indent=1) + "\n")
    result.written.append(summary_path)
    return result


def head_scores_figure(
    scores: Mapping[str, Sequence[Sequence[float]]], *, title: str | None = None
) -> Any:
    """One layers x heads map per pattern (``{pattern: L lists of H scores in [0, 1]}``)."""
    from qkv.viz.figures import _new_figure

    fig = _new_figure(3.2 * len(scores), 5.0)
    for i, (pattern, values) in enumerate(scores.items()):
        grid = torch.tensor(values, dtype=torch.float32)  # (L, H)
        if grid.ndim != 2:
            raise ValueError(f"scores[{pattern!r}] must be L lists of H numbers")
        ax = fig.add_subplot(1, len(scores), i + 1)
        image = ax.imshow(grid.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(pattern.replace("_", "-"))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, fraction=0.06)
    if title is not None:
        fig.suptitle(title)
    return fig
