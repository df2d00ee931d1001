"""A pretrained encoder's attention on one text, drawn: the maps are computed here (from the
model) and drawn by :func:`qkv.viz.encoder_pictures` (from tensors).

::

    encoder, tokenizer = qkv.models.load_pretrained("minilm")
    pictures = pretrained_pictures(encoder, tokenizer, "a gorgeous, witty film", "out/")

The weights are those :meth:`qkv.models.pretrained.BertEncoder.attention_maps` recomputes with
:func:`qkv.attention_weights` for each layer (the forward stays on the efficient path).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from qkv.models.pretrained import encode
from qkv.viz.pretrained import PretrainedPictures, encoder_pictures

__all__ = ["pretrained_pictures"]


@torch.no_grad()
def pretrained_pictures(
    encoder: Any,
    tokenizer: Any,
    text: str,
    out: str | os.PathLike[str],
    *,
    layers: Sequence[int] | None = None,
    name: str = "pretrained encoder",
    page: bool = True,
    page_only: bool = False,
    dpi: int = 100,
    max_length: int | None = 512,
) -> PretrainedPictures:
    """Compute and write the attention pictures of ``encoder`` on ``text`` into ``out``
    (see :func:`qkv.viz.encoder_pictures` for the files).

    Args:
        encoder: a :class:`~qkv.models.pretrained.BertEncoder` (put in eval mode here).
        tokenizer: its ``tokenizers.Tokenizer``.
        text: one non-empty text.
        out: the folder (created).
        layers: the layers drawn head by head (default all; 0-based).
        name: the model's name in the titles.
        page: also write the interactive page.
        page_only: write the page and the summary only (no matplotlib needed).
        dpi: resolution of the PNGs.
        max_length: tokens kept (the encoder's positions bound it).

    Raises:
        ValueError: an empty text, or a layer out of range (named).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text is empty: there is nothing to draw")
    encoder.eval()
    ids, mask = encode(tokenizer, [text], max_length=max_length)
    tokens = [tokenizer.id_to_token(int(i)) for i in ids[0]]
    maps = [m[0] for m in encoder.attention_maps(ids, mask)]  # L x (H, N, N)
    return encoder_pictures(
        tokens,
        maps,
        out,
        title=text,
        layers=layers,
        name=name,
        page=page,
        page_only=page_only,
        dpi=dpi,
    )
