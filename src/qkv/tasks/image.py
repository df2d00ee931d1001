"""Image classification with a Vision Transformer, as a :class:`~qkv.tasks.base.TaskSpec`.

::

    qkv train image --data builtin:digits --out digits-vit
    qkv classify --model digits-vit seven.png --explain      # label, probabilities, picture
    qkv evaluate --model digits-vit                           # accuracy, macro-F1, confusion

    from qkv.tasks import train_task, evaluate_model
    from qkv.tasks.image import ImageClassifier, ImageSettings

    train_task("image", ImageSettings(data="pets/"), TrainConfig(max_steps=2000), "pets-vit")
    ImageClassifier.load("pets-vit").classify_files(["tabby.jpg"])[0].label

The task is only what :mod:`qkv.tasks.base` asks of one: reading data
(:mod:`qkv.data.images`: ``builtin:digits``, a folder with a subfolder per class, a CSV of
pixel rows), a :class:`~qkv.models.vit.VisionTransformer` with a summed cross-entropy, a
predictor (:class:`ImageClassifier`) and its scores (accuracy, macro-F1 and the confusion
matrix, the classifiers' :func:`~qkv.tasks.classification.classification_metrics`). The model
folder, ``--resume``, DDP, keep-best and ``qkv evaluate`` come from the lifecycle.

Training batches are augmented by random translations of up to ``shift`` pixels (zero
padding, as the random crops of CIFAR training): a ViT has no convolution's built-in tolerance
to small shifts, and 1,259 training digits are too few to learn it from unshifted copies. The
shifts are drawn from a generator seeded by the batch's example indices, so a resumed run sees
exactly the batches of an uninterrupted one.

Shapes: ``B`` images, ``C`` channels, ``S`` image side, ``K`` classes, ``G`` patches per side.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv.data._util import stable_hash
from qkv.data.images import (
    LabeledImage,
    ReaderOptions,
    load_images,
    read_image_file,
    read_images,
    stack_images,
)
from qkv.data.labeled import LabelSet
from qkv.data.parallel import DataError
from qkv.data.registry import Splits
from qkv.models.vit import PatchAttention, VisionTransformer, ViTConfig
from qkv.tasks.base import (
    EvalOptions,
    Evaluation,
    Flag,
    Prepared,
    Settings,
    TaskSpec,
)
from qkv.tasks.classification import (
    ClassificationObjective,
    evaluation_metrics,
    format_classification,
    label_set,
    predict_batches,
)
from qkv.train import LossOutput, ModelFolderError, load_model, read_config, resolve_device

__all__ = [
    "SPEC",
    "ImageBatch",
    "ImageClassifier",
    "ImageDataset",
    "ImageObjective",
    "ImagePrediction",
    "ImageSettings",
    "ImageSpec",
    "collate_images",
    "evaluate_images",
    "fit_pixels",
    "reader_options",
    "shift_images",
]

logger = logging.getLogger(__name__)

TASK_NAME = "image"
Item = tuple[int, Tensor, int]

# ITU-R BT.601 luma, the weights Pillow's "L" conversion uses.
_LUMA = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class ImageSettings(Settings):
    """What to train on and what to build (saved in ``config.json`` under ``"image"``).

    Attributes:
        data: ``builtin:digits``, a folder with one subfolder per class, or a ``.csv`` of
            pixel rows (:func:`qkv.data.images.load_images`).
        preset: a :class:`~qkv.models.vit.ViTConfig` preset (``tiny``, ``small``, ``base``).
        batch_size: images per training batch.
        shift: random translation of training images by up to this many pixels (0: none).
        model_overrides: :class:`~qkv.models.vit.ViTConfig` fields replacing the preset's
            (``patch_size``, ``pooling``, ``dropout``, ...).
        data_options: :class:`~qkv.data.images.ReaderOptions` fields (``image_size``,
            ``channels``, ``label_column``, ``pixel_max``).
    """

    data: str = "builtin:digits"
    preset: str = "small"
    batch_size: int = 256
    shift: int = 1
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset not in ViTConfig.presets:
            raise ValueError(
                f"preset must be one of {', '.join(ViTConfig.presets)}; got {self.preset!r}"
            )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if isinstance(self.shift, bool) or not isinstance(self.shift, int) or self.shift < 0:
            raise ValueError(f"shift must be an int >= 0, got {self.shift!r}")
        reader_options(self.data_options)  # fails early, naming a bad option


def reader_options(options: dict[str, Any]) -> ReaderOptions:
    """:class:`~qkv.data.images.ReaderOptions` from settings or command-line text (``qkv
    evaluate`` passes reader options as strings).

    Raises:
        ValueError: an unknown option or a value that does not convert, naming it.
    """
    known = {f.name: f for f in fields(ReaderOptions)}
    converters: dict[str, Any] = {"image_size": int, "channels": int, "pixel_max": float}
    values: dict[str, Any] = {}
    for name, value in options.items():
        if name not in known:
            raise ValueError(f"unknown image reader option {name!r}; known: {', '.join(known)}")
        convert = converters.get(name)
        try:
            values[name] = convert(value) if convert and isinstance(value, str) else value
        except ValueError:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be a number; got {value!r}") from None
    return ReaderOptions(**values)


# --------------------------------------------------------------------------------------------
# Batches


@dataclass(frozen=True)
class ImageBatch:
    """Images with their class indices.

    Attributes:
        pixels: float32 ``(B, C, S, S)`` in ``[0, 1]``.
        labels: ``(B,)`` int64 class indices.
        index: ``(B,)`` int64 position of each image in its dataset.
    """

    pixels: Tensor
    labels: Tensor
    index: Tensor

    def to(self, device: torch.device | str) -> ImageBatch:
        return ImageBatch(
            self.pixels.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            self.index.to(device, non_blocking=True),
        )

    def __len__(self) -> int:
        return int(self.pixels.shape[0])


class ImageDataset:
    """Images of one shape with class indices; item ``i`` is ``(i, pixels (C, S, S), label)``.

    Raises:
        ValueError: images of different shapes, or a label the label set lacks (naming it).
    """

    def __init__(self, images: Sequence[LabeledImage], labels: LabelSet) -> None:
        self.pixels = stack_images(images)  # (N, C, S, S)
        self.labels = [labels.index(image.label) for image in images]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Item:
        return index, self.pixels[index], self.labels[index]

    def lengths(self) -> list[int]:
        """Equal lengths: every batch is a plain shuffled batch."""
        return [1] * len(self.labels)


def shift_images(pixels: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by its own random ``(dy, dx)`` in ``[-max_shift, max_shift]``,
    filling with zeros: ``(B, C, S, S)`` -> ``(B, C, S, S)``."""
    if max_shift == 0:
        return pixels
    B, _, S, _ = pixels.shape
    padded = F.pad(pixels, (max_shift,) * 4).permute(0, 2, 3, 1)  # (B, S + 2m, S + 2m, C)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, B), generator=generator)  # (2, B)
    rows = offsets[0][:, None] + torch.arange(S)  # (B, S): padded row of each output row
    cols = offsets[1][:, None] + torch.arange(S)  # (B, S)
    batch = torch.arange(B)[:, None, None]
    moved = padded[batch, rows[:, :, None], cols[:, None, :]]  # (B, S, S, C)
    return moved.permute(0, 3, 1, 2).contiguous()  # (B, C, S, S)


def collate_images(items: Sequence[Item], *, shift: int = 0) -> ImageBatch:
    """Stack ``(index, pixels, label)`` items into an :class:`ImageBatch`, translating each
    image by up to ``shift`` pixels with a generator seeded by the items' indices."""
    index = torch.tensor([i for i, _, _ in items], dtype=torch.long)  # (B,)
    pixels = torch.stack([p for _, p, _ in items])  # (B, C, S, S)
    labels = torch.tensor([label for _, _, label in items], dtype=torch.long)  # (B,)
    if shift:
        seed = stable_hash(0, "image-shift", *index.tolist()) % 2**63
        pixels = shift_images(pixels, shift, torch.Generator().manual_seed(seed))
    return ImageBatch(pixels, labels, index)


def _batches(dataset: ImageDataset, batch_size: int) -> list[ImageBatch]:
    """Evaluation batches in dataset order, unshifted."""
    return [
        collate_images([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        for start in range(0, len(dataset), batch_size)
    ]


def image_logits(model: nn.Module, batch: ImageBatch) -> Tensor:
    """``(B, K)`` float32 logits of a Vision Transformer (``model(pixels).logits``)."""
    return model(batch.pixels).logits.float()


# --------------------------------------------------------------------------------------------
# The objective the trainer runs


class ImageObjective(ClassificationObjective):
    """Summed cross-entropy over images; validation accuracy (early stopping), macro-F1 and
    loss (:class:`~qkv.tasks.classification.ClassificationObjective`).

    Args:
        validation: the validation images.
        labels: the label set.
        batch_size: validation batch size.
    """

    def __init__(self, validation: ImageDataset | None, labels: LabelSet, *, batch_size: int):
        batches = _batches(validation, batch_size) if validation is not None else []
        super().__init__(TASK_NAME, batches, labels)

    def logits(self, model: nn.Module, batch: ImageBatch) -> Tensor:
        return image_logits(model, batch)

    def loss(self, model: nn.Module, batch: ImageBatch) -> LossOutput:
        logits = image_logits(model, batch)  # (B, K)
        total = F.cross_entropy(logits, batch.labels, reduction="sum")
        patches = batch.pixels.shape[0] * _patches_of(model)
        return LossOutput(total, len(batch), patches)


def _patches_of(model: nn.Module) -> int:
    """Patches per image (the trainer's "tokens"), through a DDP wrapper if there is one."""
    inner = getattr(model, "module", model)
    return int(inner.config.num_patches) if isinstance(inner, VisionTransformer) else 1


# --------------------------------------------------------------------------------------------
# The task spec


def _shape_of(data: str, images: Sequence[LabeledImage]) -> tuple[int, int]:
    """``(C, S)`` of the training images; ``S`` square (every reader makes it so)."""
    C, H, W = images[0].pixels.shape
    if H != W:
        raise DataError(data, None, f"images must be square; got {H}x{W} ({images[0].source})")
    return int(C), int(H)


class ImageSpec(TaskSpec[ImageSettings, "ImageClassifier"]):
    """Image classification as a :class:`~qkv.tasks.base.TaskSpec`."""

    name = TASK_NAME
    settings_type = ImageSettings
    summary = "image classification with a Vision Transformer (builtin:digits, folders, CSV)"
    metric_name = "accuracy"
    default_steps = 2000
    train_flags = (
        Flag("--label-column", "data_options.label_column", "CSV label column", reader=True),
        Flag(
            "--pixel-max",
            "data_options.pixel_max",
            "CSV value of full intensity (255; 16 for digits)",
            float,
            reader=True,
        ),
        Flag("--image-size", "data_options.image_size", "resize images to S x S", int),
        Flag("--channels", "data_options.channels", "1 (gray) or 3 (RGB)", int, choices=(1, 3)),
        Flag("--preset", "preset", "model", choices=tuple(ViTConfig.presets)),
        Flag("--patch-size", "model_overrides.patch_size", "patch side p", int),
        Flag("--pooling", "model_overrides.pooling", "pooling", choices=("attention", "cls")),
        Flag("--dropout", "model_overrides.dropout", "override the preset's dropout", float),
        Flag("--shift", "shift", "random translation of training images, pixels", int),
    )

    def load_splits(self, data: str, options: dict[str, Any]) -> Splits[LabeledImage]:
        return load_images(data, reader_options(options))

    def read_file(self, path: str, options: dict[str, Any]) -> list[LabeledImage]:
        return read_images(path, reader_options(options))

    def prepare(
        self, settings: ImageSettings, splits: Splits[LabeledImage], *, folder: Path | None
    ) -> Prepared:
        if folder is not None:
            saved = read_config(folder)
            labels = LabelSet(saved["labels"])
            config = ViTConfig.from_dict(saved["model"])
        else:
            labels = label_set(settings.data, splits.train, what="images", hint="classes")
            channels, size = _shape_of(settings.data, splits.train)
            config = ViTConfig.from_name(
                settings.preset,
                num_classes=len(labels),
                image_size=size,
                channels=channels,
                **settings.model_overrides,
            )
        logger.info("image: %s, labels %s, %s", splits.sizes(), labels.labels, config)
        validation = ImageDataset(splits.validation, labels) if splits.validation else None
        return Prepared(
            settings=settings,
            model=VisionTransformer(config),
            model_config=config.to_dict(),
            objective=ImageObjective(validation, labels, batch_size=4 * settings.batch_size),
            train_set=ImageDataset(splits.train, labels),
            collate=partial(collate_images, shift=settings.shift),
            batch_size=settings.batch_size,
            extra={"labels": list(labels.labels)},
        )

    def load(self, folder: Path, *, device: str = "auto") -> ImageClassifier:
        return ImageClassifier.load(folder, device=device)

    def evaluate(
        self, predictor: ImageClassifier, examples: Sequence[LabeledImage], options: EvalOptions
    ) -> dict[str, Any]:
        return evaluate_images(predictor, examples, batch_size=options.batch_size)

    def format_metrics(self, evaluation: Evaluation) -> list[str]:
        return format_classification(evaluation.metrics)


# --------------------------------------------------------------------------------------------
# Inference


def fit_pixels(pixels: Tensor, *, channels: int, image_size: int) -> Tensor:
    """An image ``(C', S', S')`` as the model's ``(C, S, S)``: RGB to gray by luma (as
    Pillow's ``"L"``), gray to RGB by repetition, resized bilinearly (antialiased)."""
    if pixels.shape[0] == 3 and channels == 1:
        luma = torch.tensor(_LUMA, dtype=pixels.dtype)[:, None, None]
        pixels = (pixels * luma).sum(dim=0, keepdim=True)  # (1, S', S')
    elif pixels.shape[0] == 1 and channels == 3:
        pixels = pixels.expand(3, -1, -1)  # (3, S', S')
    if tuple(pixels.shape[1:]) != (image_size, image_size):
        pixels = F.interpolate(
            pixels[None], size=(image_size, image_size), mode="bilinear", antialias=True
        )[0].clamp(0.0, 1.0)
    return pixels.contiguous()


@dataclass(frozen=True)
class ImagePrediction:
    """One image's classification.

    Attributes:
        label: the most probable label.
        probabilities: ``{label: probability}`` for every label, in label order.
        source: the image's file (or ``""`` for a tensor).
        pixels: float32 ``(C, S, S)``, the image as the model read it.
        patches: ``(G, G)`` attention over the patches (:meth:`ImageClassifier.classify`
            with ``explain=True``), else None.
    """

    label: str
    probabilities: dict[str, float]
    source: str
    pixels: Tensor
    patches: Tensor | None = None

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` most probable ``(label, probability)`` pairs."""
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:k]


class ImageClassifier:
    """A trained Vision Transformer with its labels, loaded from a model folder.

    Args:
        model: the network (set to eval mode).
        labels: its labels, in class-index order.
    """

    def __init__(self, model: VisionTransformer, labels: LabelSet) -> None:
        self.model = model.eval()
        self.labels = labels

    @property
    def config(self) -> ViTConfig:
        return self.model.config

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, device: str = "auto") -> ImageClassifier:
        """Load a folder written by ``qkv train image``, on ``device``.

        Raises:
            ModelFolderError: not an image model folder, or inconsistent files.
        """
        saved = read_config(folder)
        if saved.get("task") != TASK_NAME:
            raise ModelFolderError(
                f"{folder}: holds a {saved.get('task')!r} model, not an {TASK_NAME!r} classifier"
            )
        model, config = load_model(folder, lambda c: VisionTransformer(ViTConfig.from_dict(c)))
        if not isinstance(model, VisionTransformer):
            raise ModelFolderError(f"{folder}: the model is not a VisionTransformer")
        labels = LabelSet(config["labels"])
        if len(labels) != model.config.num_classes:
            raise ModelFolderError(
                f"{folder}: {len(labels)} labels but the model has "
                f"{model.config.num_classes} classes"
            )
        return cls(model.to(resolve_device(device)), labels)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prepare(self, pixels: Tensor) -> Tensor:
        """One image ``(C', S', S')`` in ``[0, 1]`` as this model's ``(C, S, S)``."""
        return fit_pixels(pixels, channels=self.config.channels, image_size=self.config.image_size)

    def read_file(self, path: str | os.PathLike[str]) -> Tensor:
        """An image file as this model's ``(C, S, S)`` (converted and resized by Pillow, as
        a training folder is read).

        Raises:
            DataError: the file is missing or not an image (naming it).
        """
        return read_image_file(
            path, channels=self.config.channels, image_size=self.config.image_size
        )

    @torch.no_grad()
    def classify(
        self,
        images: Sequence[Tensor],
        *,
        sources: Sequence[str] | None = None,
        explain: bool = False,
        batch_size: int = 256,
    ) -> list[ImagePrediction]:
        """Classify ``images``, each ``(C', S', S')`` in ``[0, 1]`` (fitted to the model).

        Args:
            sources: a name per image, kept in the predictions.
            explain: also compute each image's attention over its patches (slower: the
                attention weights are formed).
        """
        names = list(sources) if sources is not None else [""] * len(images)
        if len(names) != len(images):
            raise ValueError(f"sources ({len(names)}) must align with images ({len(images)})")
        fitted = [self.prepare(image) for image in images]
        out: list[ImagePrediction] = []
        for start in range(0, len(fitted), batch_size):
            chunk = torch.stack(fitted[start : start + batch_size]).to(self._device())
            out.extend(self._classify_batch(chunk, names[start : start + batch_size], explain))
        return out

    def classify_files(
        self, paths: Sequence[str | os.PathLike[str]], *, explain: bool = False
    ) -> list[ImagePrediction]:
        """Read and classify image files.

        Raises:
            DataError: a file is missing or not an image (naming it).
        """
        images = [self.read_file(path) for path in paths]
        return self.classify(images, sources=[str(p) for p in paths], explain=explain)

    def _classify_batch(
        self, pixels: Tensor, names: Sequence[str], explain: bool
    ) -> list[ImagePrediction]:
        patches: Tensor | None = None
        if explain:
            explained: PatchAttention = self.model.explain(pixels)
            logits, patches = explained.logits, explained.patches.float().cpu()  # (B, G, G)
        else:
            logits = self.model(pixels).logits
        probs = F.softmax(logits.float(), dim=-1).cpu()  # (B, K)
        return [
            ImagePrediction(
                label=self.labels[int(p.argmax())],
                probabilities={lab: float(x) for lab, x in zip(self.labels.labels, p, strict=True)},
                source=name,
                pixels=image.cpu(),
                patches=None if patches is None else patches[i],
            )
            for i, (name, p, image) in enumerate(zip(names, probs, pixels, strict=True))
        ]


def evaluate_images(
    classifier: ImageClassifier, examples: Sequence[LabeledImage], *, batch_size: int = 256
) -> dict[str, Any]:
    """Accuracy, macro-F1, the majority-class baseline and the confusion matrix of
    ``classifier`` on ``examples`` (fitted to the model's channels and size).

    Raises:
        ValueError: no examples, or a label the model does not know (naming it and the file).
    """
    if not examples:
        raise ValueError("no images to evaluate")
    for example in examples:
        if example.label not in classifier.labels.labels:
            raise ValueError(
                f"{example.source}: label {example.label!r} is not one this model knows "
                f"({', '.join(classifier.labels.labels)})"
            )
    fitted = [LabeledImage(classifier.prepare(e.pixels), e.label, e.source) for e in examples]
    dataset = ImageDataset(fitted, classifier.labels)
    with torch.no_grad():
        gold, predicted, total = predict_batches(
            classifier.model, _batches(dataset, batch_size), classifier._device(), image_logits
        )
    return evaluation_metrics(gold, predicted, total, classifier.labels)


SPEC = ImageSpec()
