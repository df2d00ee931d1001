r"""Labeled images for classification: a folder of image files, a CSV of pixel rows, built-ins.

==================================  =========================================================
folder                              one subfolder per class, named by its label, holding
                                    ``.png``, ``.jpg``/``.jpeg``, ``.bmp``, ``.gif``,
                                    ``.tif``/``.tiff`` or ``.webp`` files (read with Pillow)
CSV (``.csv``)                      a header row, then one image per line: a label column
                                    (``label`` by default) and ``C * S * S`` pixel columns in
                                    row-major order (channel last for RGB: ``r, g, b, r, ...``)
``builtin:digits``                  scikit-learn's 8x8 handwritten digits (1,797 images)
==================================  =========================================================

Every image becomes a float32 ``(C, S, S)`` tensor with pixels in ``[0, 1]``: files are
converted to grayscale (``C = 1``) or RGB (``C = 3``) and resized to ``S x S``; CSV values are
divided by ``pixel_max`` (255 by default; 16 for the digits' own scale). Malformed input raises
:class:`~qkv.data.DataError` naming the file and, for a CSV, the line::

    digits.csv:12: 63 pixel values; the header has 64 pixel columns
    cats/tabby.png: cannot read the image (cannot identify image file)

Shapes: ``C`` channels, ``S`` image side, ``N`` images.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qkv.data._util import require_module
from qkv.data.parallel import DataError
from qkv.data.registry import Splits, load_builtin

__all__ = [
    "IMAGE_SUFFIXES",
    "LabeledImage",
    "ReaderOptions",
    "image_tensor",
    "load_images",
    "read_image_file",
    "read_image_folder",
    "read_images",
    "read_pixel_csv",
    "split_images",
    "stack_images",
]

PathLike = str | os.PathLike[str]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: Pillow modes that carry no colour: such files default to one channel.
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
PILLOW_INSTALL = "pip install 'pillow>=10'"


@dataclass(frozen=True)
class LabeledImage:
    """One classification example.

    Attributes:
        pixels: float32 ``(C, S, S)`` in ``[0, 1]``.
        label: its class, any non-empty string.
        source: where it came from, for reports and errors: ``"cats/tabby.png"``,
            ``"digits.csv:12"`` or ``"builtin:digits#1034"``.
    """

    pixels: Tensor
    label: str
    source: str


@dataclass(frozen=True)
class ReaderOptions:
    """How files become tensors; saved with a model so evaluation reads data the same way.

    Attributes:
        image_size: ``S``; None = the first image's larger side (folders) or the square
            root of the pixel count per channel (CSV).
        channels: ``C``, 1 or 3; None = 3 if any image file has colour, else 1 (a CSV: 1 if
            its pixel count is a square ``S * S``, 3 if it is ``3 * S * S``).
        label_column: the CSV column holding the label.
        pixel_max: the CSV value that means full intensity (becomes 1.0).
    """

    image_size: int | None = None
    channels: int | None = None
    label_column: str = "label"
    pixel_max: float = 255.0

    def __post_init__(self) -> None:
        if self.image_size is not None and (
            isinstance(self.image_size, bool)
            or not isinstance(self.image_size, int)
            or self.image_size < 1
        ):
            raise ValueError(f"image_size must be a positive int; got {self.image_size!r}")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 or 3; got channels={self.channels!r}")
        if not self.label_column:
            raise ValueError("label_column must be a non-empty column name")
        if isinstance(self.pixel_max, bool) or not (
            isinstance(self.pixel_max, int | float) and self.pixel_max > 0
        ):
            raise ValueError(f"pixel_max must be a number > 0; got pixel_max={self.pixel_max!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "channels": self.channels,
            "label_column": self.label_column,
            "pixel_max": self.pixel_max,
        }


# --------------------------------------------------------------------------------------------
# Image files


def _pillow() -> Any:
    require_module("PIL", PILLOW_INSTALL, needed_for="reading image files")
    from PIL import Image

    return Image


def image_tensor(picture: Any, *, channels: int, image_size: int) -> Tensor:
    """A Pillow image as float32 ``(C, S, S)`` in ``[0, 1]``: converted to ``"L"`` or
    ``"RGB"`` and resized (bilinear) to ``S x S``."""
    import numpy as np

    Image = _pillow()
    converted = picture.convert("L" if channels == 1 else "RGB")
    if converted.size != (image_size, image_size):
        converted = converted.resize((image_size, image_size), Image.Resampling.BILINEAR)
    array = np.asarray(converted, dtype=np.float32) / 255.0  # (S, S) or (S, S, 3)
    pixels = torch.from_numpy(array.copy())
    return pixels[None] if channels == 1 else pixels.permute(2, 0, 1).contiguous()


def _open(path: Path) -> Any:
    """The decoded Pillow image at ``path``, or a :class:`DataError` naming the file."""
    Image = _pillow()
    try:
        with Image.open(path) as picture:
            picture.load()  # decode now, so a truncated file fails here, by name
            return picture
    except FileNotFoundError:
        raise DataError(path, None, "no such image file") from None
    except (OSError, ValueError, SyntaxError) as error:  # Pillow's ways of saying "not an image"
        raise DataError(path, None, f"cannot read the image ({error})") from None


def _has_colour(picture: Any) -> bool:
    return picture.mode not in _GRAY_MODES


def read_image_file(
    path: PathLike, *, channels: int | None = None, image_size: int | None = None
) -> Tensor:
    """One image file as float32 ``(C, S, S)`` in ``[0, 1]``.

    Args:
        path: a file Pillow can read (PNG, JPEG, BMP, GIF, TIFF, WebP, ...).
        channels: 1 or 3; None = 3 for a colour file, 1 for a grayscale one.
        image_size: ``S``; None = the file's larger side.

    Raises:
        DataError: the file is missing or is not a readable image (naming it).
    """
    options = ReaderOptions(image_size=image_size, channels=channels)
    picture = _open(Path(path))
    c = options.channels or (3 if _has_colour(picture) else 1)
    return image_tensor(picture, channels=c, image_size=options.image_size or max(picture.size))


def _class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(root, None, "no such folder of images")
    loose = sorted(p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if loose:
        raise DataError(
            root,
            None,
            f"images must sit in one subfolder per class; found {loose[0]!r} at the top",
        )
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise DataError(
            root, None, f"needs one subfolder per class (at least 2); found {len(folders)}"
        )
    return folders


def _image_files(folder: Path) -> list[Path]:
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        suffixes = ", ".join(IMAGE_SUFFIXES)
        raise DataError(folder, None, f"a class folder with no image files ({suffixes})")
    return files


def read_image_folder(root: PathLike, options: ReaderOptions | None = None) -> list[LabeledImage]:
    """Every image under ``root/<label>/``, class folders and files in sorted order.

    Files with other suffixes (notes, ``.DS_Store``) are skipped; a file with an image suffix
    that cannot be decoded is an error.

    Raises:
        DataError: no folder, fewer than two class folders, an empty class folder, images
            outside the class folders, or an unreadable image file (each naming the path).
    """
    options = options or ReaderOptions()
    root = Path(root)
    files = [
        (folder.name, path) for folder in _class_folders(root) for path in _image_files(folder)
    ]
    pictures = [(label, path, _open(path)) for label, path in files]
    channels = options.channels or (3 if any(_has_colour(p) for _, _, p in pictures) else 1)
    size = options.image_size or max(pictures[0][2].size)
    return [
        LabeledImage(
            image_tensor(picture, channels=channels, image_size=size),
            label,
            str(path),
        )
        for label, path, picture in pictures
    ]


# --------------------------------------------------------------------------------------------
# CSV of pixel rows


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line, fields)`` of each non-blank record; ``line`` is 1-based."""
    try:
        handle = path.open(newline="", encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, None, "no such file") from None
    with handle:
        reader = csv.reader(handle)
        try:
            for fields in reader:
                if any(f.strip() for f in fields):
                    yield reader.line_num, fields
        except (csv.Error, UnicodeDecodeError) as error:
            raise DataError(
                path, reader.line_num + 1, f"not a readable CSV record ({error})"
            ) from None


def _square_side(count: int, channels: int) -> int | None:
    """``S`` if ``count == channels * S * S``, else None."""
    side = math.isqrt(count // channels) if count % channels == 0 else 0
    return side if side >= 1 and side * side * channels == count else None


def _csv_shape(path: Path, line: int, count: int, channels: int | None) -> tuple[int, int]:
    """``(C, S)`` of ``count`` pixel columns: ``channels`` if given, else gray when the count
    is a square and RGB when a third of it is (``3 S^2`` is never a square)."""
    for c in (channels,) if channels else (1, 3):
        side = _square_side(count, c)
        if side is not None:
            return c, side
    what = f"{channels} channel(s)" if channels else "1 or 3 channels"
    raise DataError(
        path, line, f"{count} pixel columns are not {what} of a square image (C * S * S values)"
    )


def _pixel_row(path: Path, line: int, fields: list[str], options: ReaderOptions) -> list[float]:
    values: list[float] = []
    for column, text in enumerate(fields):
        try:
            value = float(text)
        except ValueError:
            raise DataError(path, line, f"pixel {column + 1} is not a number: {text!r}") from None
        if not 0.0 <= value <= options.pixel_max:  # also refuses NaN
            raise DataError(
                path,
                line,
                f"pixel {column + 1} = {text} is outside [0, pixel_max = {options.pixel_max:g}]"
                " (pass the pixel maximum of this file)",
            )
        values.append(value / options.pixel_max)
    return values


def read_pixel_csv(path: PathLike, options: ReaderOptions | None = None) -> list[LabeledImage]:
    """One image per CSV line: a label column and ``C * S * S`` pixel columns.

    Raises:
        DataError: no header or no label column, a line with more or fewer fields than the
            header, a pixel that is not a number or lies outside ``[0, pixel_max]``, an empty
            label, or no images at all (naming the file and line).
    """
    options = options or ReaderOptions()
    path = Path(path)
    rows = _csv_rows(path)
    first = next(rows, None)
    if first is None:
        raise DataError(path, None, "no images found (the file is empty or blank)")
    header_line, header = first
    names = [name.strip() for name in header]
    if options.label_column not in names:
        shown = ", ".join(repr(n) for n in names[:4]) + (", ..." if len(names) > 4 else "")
        raise DataError(
            path, header_line, f"no label column {options.label_column!r} in the header ({shown})"
        )
    label_at = names.index(options.label_column)
    channels, native = _csv_shape(path, header_line, len(names) - 1, options.channels)
    size = options.image_size or native
    images: list[LabeledImage] = []
    for line, fields in rows:
        if len(fields) != len(names):
            raise DataError(
                path, line, f"{len(fields)} fields; the header has {len(names)} columns"
            )
        label = fields[label_at].strip()
        if not label:
            raise DataError(path, line, f"empty label (column {options.label_column!r})")
        values = _pixel_row(path, line, fields[:label_at] + fields[label_at + 1 :], options)
        pixels = _from_rows(values, channels, native, size)
        images.append(LabeledImage(pixels, label, f"{path.name}:{line}"))
    if not images:
        raise DataError(path, None, "no images found (only a header)")
    return images


def _from_rows(values: list[float], channels: int, native: int, size: int) -> Tensor:
    """Row-major pixel values (channel last) -> float32 ``(C, size, size)``."""
    pixels = torch.tensor(values, dtype=torch.float32).reshape(native, native, channels)
    pixels = pixels.permute(2, 0, 1).contiguous()  # (C, S, S)
    if native == size:
        return pixels
    resized = F.interpolate(pixels[None], size=(size, size), mode="bilinear", antialias=True)
    return resized[0].clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Specs and splits


def read_images(path: PathLike, options: ReaderOptions | None = None) -> list[LabeledImage]:
    """Every image of a folder (one subfolder per class) or a ``.csv`` file, in order.

    Raises:
        DataError: a path that is neither, or malformed contents.
    """
    path = Path(path)
    if path.is_dir():
        return read_image_folder(path, options)
    if path.suffix.lower() == ".csv":
        return read_pixel_csv(path, options)
    if not path.exists():
        raise DataError(path, None, "no such file or folder of images")
    raise DataError(
        path,
        None,
        "image data must be a folder with one subfolder per class or a .csv of pixel rows "
        "(rename the file if it is a CSV)",
    )


def _rank(seed: int, image: LabeledImage) -> bytes:
    # By content, so that the same picture lands in the same split wherever it appears.
    digest = hashlib.blake2b(digest_size=8, key=str(seed).encode())
    digest.update(image.pixels.numpy().tobytes())
    return digest.digest()


def split_images(
    images: Sequence[LabeledImage], *, validation: float = 0.1, test: float = 0.1, seed: int = 0
) -> Splits[LabeledImage]:
    """Seeded, stratified validation and test splits carved out of ``images``.

    Within each class the images are ranked by a seeded hash of their pixels (the same on
    every machine), and the first ``round(test * n)`` go to test, the next
    ``round(validation * n)`` to validation; each split keeps the input order.

    Raises:
        ValueError: a fraction outside ``[0, 1)``, or fractions summing to 1 or more.
    """
    for name, fraction in (("validation", validation), ("test", test)):
        if isinstance(fraction, bool) or not 0.0 <= fraction < 1.0:
            raise ValueError(f"{name} fraction must be in [0, 1); got {name}={fraction!r}")
    if validation + test >= 1.0:
        raise ValueError(f"validation ({validation}) + test ({test}) must be below 1")
    split_of: dict[int, str] = {}
    by_label: dict[str, list[int]] = {}
    for i, image in enumerate(images):
        by_label.setdefault(image.label, []).append(i)
    for members in by_label.values():
        ranked = sorted(members, key=lambda i: (_rank(seed, images[i]), i))
        n_test, n_validation = round(test * len(ranked)), round(validation * len(ranked))
        split_of.update(dict.fromkeys(ranked[:n_test], "test"))
        split_of.update(dict.fromkeys(ranked[n_test : n_test + n_validation], "validation"))
    out: dict[str, list[LabeledImage]] = {"train": [], "validation": [], "test": []}
    for i, image in enumerate(images):
        out[split_of.get(i, "train")].append(image)
    return Splits(out["train"], out["validation"], out["test"])


def load_images(
    spec: PathLike,
    options: ReaderOptions | None = None,
    *,
    validation: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
) -> Splits[LabeledImage]:
    """Train/validation/test images from a data spec.

    Args:
        spec: ``"builtin:NAME"`` (its fixed splits), a folder of class subfolders or a
            ``.csv`` of pixel rows (seeded stratified splits carved out).
        options: how to read files (ignored for a builtin, whose images are fixed).
        validation, test, seed: carving fractions and seed (files and folders only).

    Raises:
        DataError: malformed files; ValueError: an unknown builtin.
    """
    if isinstance(spec, str) and spec.startswith("builtin:"):
        loaded: Splits[LabeledImage] = load_builtin(spec.removeprefix("builtin:"), seed=seed)
        return loaded
    return split_images(read_images(spec, options), validation=validation, test=test, seed=seed)


def stack_images(images: Sequence[LabeledImage], *, name: str = "images") -> Tensor:
    """``N`` images of one shape as float32 ``(N, C, S, S)``.

    Raises:
        ValueError: no images, or images of different shapes (naming the first odd one).
    """
    if not images:
        raise ValueError(f"{name} is empty")
    shape = images[0].pixels.shape
    for image in images:
        if image.pixels.shape != shape:
            raise ValueError(
                f"{name} mixes shapes: {image.source} is {tuple(image.pixels.shape)}, "
                f"{images[0].source} is {tuple(shape)}"
            )
    return torch.stack([image.pixels for image in images])  # (N, C, S, S)
