"""``qkv classify --model M IMAGE...`` for a model folder from ``qkv train image``.

``qkv classify`` hands an image model's folder here: each image file is read, converted and
resized as the training images were, and printed with its label and probabilities;
``--explain`` writes a picture of the attention over the patches for each image
(``--picture``, numbered when there are several).

::

    qkv train image --data builtin:digits --out digits-vit
    qkv classify --model digits-vit seven.png --explain --picture seven-attention.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_image_args", "picture_paths", "run_classify_images"]

#: Probabilities printed per image on a line (all of them with --json).
SHOWN_CLASSES = 10


def add_image_args(p: argparse.ArgumentParser) -> None:
    """``--picture FILE``: where ``--explain`` draws an image model's attention."""
    p.add_argument(
        "--picture",
        type=Path,
        default=Path("explain.png"),
        help="image models: where --explain draws the attention over the patches "
        "(default %(default)s; numbered for several images)",
    )


def picture_paths(picture: Path, count: int) -> list[Path]:
    """``picture`` for one image; ``NAME-1.png``, ``NAME-2.png`` ... for several."""
    if count == 1:
        return [picture]
    return [picture.with_name(f"{picture.stem}-{i}{picture.suffix}") for i in range(1, count + 1)]


def run_classify_images(args: argparse.Namespace) -> int:
    """Classify ``args.text`` as image files with the image model ``args.model``."""
    from qkv.tasks.base import set_attention_backend
    from qkv.tasks.image import ImageClassifier
    from qkv.train import seed_everything

    if args.file is not None:
        raise ValueError("--file reads texts; give an image model its image files as arguments")
    if not args.text:
        raise ValueError("nothing to classify: give image files (PNG, JPEG, ...)")
    seed_everything(args.seed)
    classifier = ImageClassifier.load(args.model, device=args.device)
    set_attention_backend(classifier.model, args.backend)
    predictions = classifier.classify_files(args.text, explain=args.explain)
    pictures = picture_paths(args.picture, len(predictions)) if args.explain else []
    for i, p in enumerate(predictions):
        if args.json:
            print(
                json.dumps({"image": p.source, "label": p.label, "probabilities": p.probabilities})
            )
        else:
            shown = "  ".join(f"{label} {prob:.3f}" for label, prob in p.top(SHOWN_CLASSES))
            print(f"{p.label}\t({shown})\t{p.source}")
        if args.explain:
            _draw(p, pictures[i])
    for path in pictures:
        print(f"attention picture: {path}", file=sys.stderr)
    return 0


def _draw(prediction: object, path: Path) -> None:
    from qkv.tasks.image import ImagePrediction
    from qkv.tasks.image_figure import patch_attention_figure
    from qkv.viz import save_figure

    assert isinstance(prediction, ImagePrediction) and prediction.patches is not None
    label, prob = prediction.top(1)[0]
    figure = patch_attention_figure(
        prediction.pixels,
        prediction.patches,
        title=f"{Path(prediction.source).name}: {label} (p = {prob:.2f})",
        probabilities=prediction.top(3),
    )
    save_figure(figure, path)
