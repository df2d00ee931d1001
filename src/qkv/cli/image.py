"""``qkv classify --model M IMAGE...`` for a model folder from ``qkv train image``.

``qkv classify`` (:mod:`qkv.cli.classify`) hands an image model's folder to this: each image
file is read, converted and resized as the training images were, and printed with its label
and probabilities. ``--explain`` draws the attention over the patches of each image into a PNG
beside the ``--html`` page (``explain.png``; ``explain-1.png``, ``explain-2.png`` ... for
several images) and writes the page with every picture in it.

::

    qkv train image --data builtin:digits --out digits-vit
    qkv classify --model digits-vit seven.png --explain --html seven-explained.html
    # -> seven-explained.png too; an output path that is an input, or an existing file qkv
    #    did not write, is refused (--overwrite replaces the latter)
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qkv.tasks.image import ImagePrediction

__all__ = ["picture_paths", "run_classify_images"]

#: Probabilities printed per image on a line (all of them with --json).
SHOWN_CLASSES = 10


def picture_paths(page: Path, count: int) -> list[Path]:
    """The PNG of each image beside the page ``page``: ``NAME.png`` for one image,
    ``NAME-1.png``, ``NAME-2.png`` ... for several."""
    if count == 1:
        return [page.with_suffix(".png")]
    return [page.with_name(f"{page.stem}-{i}.png") for i in range(1, count + 1)]


def run_classify_images(args: argparse.Namespace) -> int:
    """Classify ``args.text`` as image files with the image model ``args.model``."""
    from qkv.tasks.base import get_task, set_attention_backend

    if args.file is not None:
        raise ValueError("--file reads texts; give an image model its image files as arguments")
    if not args.text:
        raise ValueError("nothing to classify: give image files (PNG, JPEG, ...)")
    if args.explain:
        from qkv.cli.outputs import check_outputs

        # Before any work: the page and its pictures never replace an input image (the
        # picture of `--html seven.html` is seven.png) or a file qkv did not write.
        pictures = picture_paths(args.html, len(args.text))
        check_outputs(
            [("--html", args.html)]
            + [
                (f"the attention picture of {t}", p)
                for t, p in zip(args.text, pictures, strict=True)
            ],
            inputs=args.text,
            overwrite=args.overwrite,
        )
    classifier = get_task("image").load(args.model, device=args.device)
    set_attention_backend(classifier.model, args.backend)
    predictions = classifier.classify_files(args.text, explain=args.explain)
    for p in predictions:
        if args.json:
            print(
                json.dumps({"image": p.source, "label": p.label, "probabilities": p.probabilities})
            )
        else:
            shown = "  ".join(f"{label} {prob:.3f}" for label, prob in p.top(SHOWN_CLASSES))
            print(f"{p.label}\t({shown})\t{p.source}")
    if args.explain:
        fragments = [_draw(p, path) for p, path in zip(predictions, pictures, strict=True)]
        from qkv.viz import html_document

        args.html.write_text(
            html_document(fragments, title="qkv classify --explain"), encoding="utf-8"
        )
        for path in pictures:
            print(f"attention picture: {path}", file=sys.stderr)
        print(f"explanation page: {args.html}", file=sys.stderr)
    return 0


def _draw(prediction: ImagePrediction, path: Path) -> str:
    """Save the prediction's attention picture to ``path``; return it as an HTML figure."""
    from qkv.tasks.image_figure import patch_attention_figure
    from qkv.viz import save_figure

    if prediction.patches is None:  # classify_files(explain=True) always fills them
        raise ValueError(f"{prediction.source}: no attention to draw")
    label, prob = prediction.top(1)[0]
    caption = f"{Path(prediction.source).name}: {label} (p = {prob:.2f})"
    figure = patch_attention_figure(
        prediction.pixels, prediction.patches, title=caption, probabilities=prediction.top(3)
    )
    data = base64.b64encode(save_figure(figure, path).read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )
