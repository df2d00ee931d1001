"""The attention over an image's patches as a picture: the image, and the image under a map of
where the classifier looked.

Built with ``matplotlib.figure.Figure`` directly (no ``pyplot``, no window), like
:mod:`qkv.viz.figures`; matplotlib is imported only when a figure is drawn.

Shapes: ``C`` channels (1 or 3), ``S`` image side, ``G`` patches per side (``S / p``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["patch_attention_figure", "upsample_patches"]

# Bright = much attention; "inferno" stays readable over a grayscale image.
CMAP = "inferno"


def upsample_patches(patches: Tensor, image_size: int) -> Tensor:
    """A ``(G, G)`` patch map as ``(S, S)``: each patch's weight over all of its pixels.

    Raises:
        ValueError: ``patches`` is not square 2-d, or ``G`` does not divide ``S``.
    """
    if not isinstance(patches, Tensor) or patches.ndim != 2 or patches.shape[0] != patches.shape[1]:
        shape = tuple(patches.shape) if isinstance(patches, Tensor) else type(patches).__name__
        raise ValueError(f"patches must be a square (G, G) tensor; got {shape}")
    grid = patches.shape[0]
    if image_size % grid:
        raise ValueError(f"the patch grid ({grid}) must divide image_size ({image_size})")
    scale = image_size // grid
    return patches.repeat_interleave(scale, 0).repeat_interleave(scale, 1)  # (S, S)


def _as_picture(image: Tensor) -> tuple[Tensor, str | None]:
    """``(C, S, S)`` in ``[0, 1]`` -> what ``imshow`` takes, and its colour map."""
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a (C, S, S) tensor with C = 1 or 3; got {shape}")
    picture = image.detach().float().cpu().clamp(0, 1)
    if picture.shape[0] == 1:
        return picture[0], "gray"  # (S, S)
    return picture.permute(1, 2, 0), None  # (S, S, 3)


def patch_attention_figure(
    image: Tensor,
    patches: Tensor,
    *,
    title: str | None = None,
    probabilities: Sequence[tuple[str, float]] = (),
) -> Figure:
    """Three panels: the image, the attention over its patch grid, and the two overlaid.

    Args:
        image: ``(C, S, S)`` float, pixels in ``[0, 1]``.
        patches: ``(G, G)`` attention over the patches (e.g. ``explain(...).patches[0]``).
        title: drawn above, e.g. ``"predicted 7 (p = 0.98)"``.
        probabilities: ``(label, probability)`` pairs listed under the title (the top few).

    Returns:
        A ``matplotlib.figure.Figure``; save it with :func:`qkv.viz.save_figure`.

    Raises:
        ValueError: shapes that do not fit together.
    """
    from matplotlib.figure import Figure

    picture, cmap = _as_picture(image)
    heat = upsample_patches(patches.detach().float().cpu(), picture.shape[0])  # (S, S)
    fig = Figure(figsize=(7.5, 2.9), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(picture.numpy(), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    axes[0].set_title("image", fontsize=9)
    shown = axes[1].imshow(
        patches.detach().float().cpu().numpy(), cmap=CMAP, vmin=0.0, interpolation="nearest"
    )
    axes[1].set_title(f"attention over {patches.shape[0]}x{patches.shape[1]} patches", fontsize=9)
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(picture.numpy(), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    level = heat / heat.max().clamp_min(1e-12)  # (S, S), 1 at the most attended patch
    # Opacity follows the weight: the image shows through where the model did not look.
    axes[2].imshow(
        level.numpy(),
        cmap=CMAP,
        alpha=(0.15 + 0.7 * level).numpy(),
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
    )
    axes[2].set_title("overlay", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    lines = [title] if title else []
    if probabilities:
        lines.append("  ".join(f"{label}: {p:.2f}" for label, p in probabilities))
    if lines:
        fig.suptitle("\n".join(lines), fontsize=10)
    return fig
