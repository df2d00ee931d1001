"""Image readers: folders of image files, CSVs of pixel rows, splits, builtin:digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qkv.data import DataError
from qkv.data.images import (
    LabeledImage,
    ReaderOptions,
    load_images,
    read_image_file,
    read_image_folder,
    read_images,
    read_pixel_csv,
    split_images,
)

Image = pytest.importorskip("PIL.Image")


def _png(path: Path, array: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def _gray(rng: np.random.Generator, size: int = 6) -> np.ndarray:
    return rng.integers(0, 256, (size, size), dtype=np.uint8)


def test_folder_of_gray_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "shapes"
    a = _png(root / "circle" / "a.png", _gray(rng))
    b = _png(root / "circle" / "b.png", _gray(rng))
    c = _png(root / "square" / "c.png", _gray(rng))
    (root / "square" / "notes.txt").write_text("not an image, skipped")
    images = read_image_folder(root)
    assert [(i.label, Path(i.source).name) for i in images] == [
        ("circle", "a.png"),
        ("circle", "b.png"),
        ("square", "c.png"),
    ]
    for image, array in zip(images, (a, b, c), strict=True):
        assert image.pixels.shape == (1, 6, 6) and image.pixels.dtype == torch.float32
        torch.testing.assert_close(image.pixels[0], torch.from_numpy(array / 255.0).float())


def test_folder_resizes_and_goes_rgb_when_a_file_has_colour(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    root = tmp_path / "pets"
    _png(root / "cat" / "gray.png", _gray(rng, 10))
    colour = _png(root / "dog" / "colour.png", rng.integers(0, 256, (5, 5, 3), dtype=np.uint8))
    images = read_image_folder(root, ReaderOptions(image_size=4))
    assert [i.pixels.shape for i in images] == [(3, 4, 4), (3, 4, 4)]
    native = read_image_folder(root, ReaderOptions(image_size=5))[1]
    torch.testing.assert_close(
        native.pixels, torch.from_numpy(colour / 255.0).float().permute(2, 0, 1)
    )
    gray = read_image_folder(root, ReaderOptions(channels=1))
    assert [i.pixels.shape for i in gray] == [(1, 10, 10), (1, 10, 10)]  # the first file's size


def test_bad_image_files_are_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    root = tmp_path / "data"
    _png(root / "a" / "ok.png", _gray(rng))
    (root / "b").mkdir()
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    with pytest.raises(DataError, match=r"b[/\\]broken\.png: cannot read the image"):
        read_image_folder(root)
    with pytest.raises(DataError, match=r"missing\.png: no such image file"):
        read_image_file(tmp_path / "missing.png")
    truncated = tmp_path / "cut.png"
    _png(truncated, _gray(rng, 32))
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(DataError, match=r"cut\.png: cannot read the image"):
        read_image_file(truncated)


def test_folder_layout_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    loose = tmp_path / "loose"
    _png(loose / "x.png", _gray(rng))
    _png(loose / "a" / "y.png", _gray(rng))
    with pytest.raises(DataError, match=r"one subfolder per class; found 'x\.png' at the top"):
        read_image_folder(loose)
    single = tmp_path / "single"
    _png(single / "only" / "y.png", _gray(rng))
    with pytest.raises(DataError, match=r"at least 2\); found 1"):
        read_image_folder(single)
    empty = tmp_path / "empty"
    _png(empty / "a" / "y.png", _gray(rng))
    (empty / "b").mkdir()
    with pytest.raises(DataError, match=r"empty[/\\]b: a class folder with no image files"):
        read_image_folder(empty)
    with pytest.raises(DataError, match="no such folder"):
        read_image_folder(tmp_path / "nowhere")


def _csv(path: Path, rows: list[list[object]], header: list[str]) -> Path:
    path.write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")
    return path


def test_csv_of_pixel_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 17, (3, 16))
    header = ["label", *(f"p{i}" for i in range(16))]
    rows = [[label, *row] for label, row in zip("aba", pixels, strict=True)]
    path = _csv(tmp_path / "digits.csv", rows, header)
    images = read_pixel_csv(path, ReaderOptions(pixel_max=16))
    assert [(i.label, i.source) for i in images] == [
        ("a", "digits.csv:2"),
        ("b", "digits.csv:3"),
        ("a", "digits.csv:4"),
    ]
    torch.testing.assert_close(
        images[1].pixels, torch.from_numpy(pixels[1] / 16).float().reshape(1, 4, 4)
    )
    # The label column may sit anywhere; RGB is recognised by a pixel count of 3 * S * S.
    rgb = rng.integers(0, 256, (2, 12))
    header = [*(f"p{i}" for i in range(6)), "y", *(f"p{i}" for i in range(6, 12))]
    rows = [[*row[:6], label, *row[6:]] for label, row in zip("cd", rgb, strict=True)]
    images = read_images(_csv(tmp_path / "rgb.csv", rows, header), ReaderOptions(label_column="y"))
    expected = torch.from_numpy(rgb[0] / 255).float().reshape(2, 2, 3).permute(2, 0, 1)
    assert images[0].label == "c"
    torch.testing.assert_close(images[0].pixels, expected)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["label,a,b,c,d", "x,1,2,3,4", "y,1,2,3"], r"bad\.csv:3: 4 fields; the header has 5"),
        (["label,a,b,c,d", "x,1,2,3,4,5"], r"bad\.csv:2: 6 fields; the header has 5"),
        (["label,a,b,c,d", "x,1,two,3,4"], r"bad\.csv:2: pixel 2 is not a number: 'two'"),
        (["label,a,b,c,d", "x,1,2,3,256"], r"bad\.csv:2: pixel 4 = 256 is outside \[0, pixel_max"),
        (["label,a,b,c,d", "x,1,2,3,nan"], r"bad\.csv:2: pixel 4 = nan is outside"),
        (["label,a,b,c,d", " ,1,2,3,4"], r"bad\.csv:2: empty label"),
        (["kind,a,b,c,d", "x,1,2,3,4"], r"bad\.csv:1: no label column 'label'"),
        (["label,a,b,c,d,e", "x,1,2,3,4,5"], r"bad\.csv:1: 5 pixel columns are not 1 or 3"),
        (["label,a,b,c,d"], r"bad\.csv: no images found \(only a header\)"),
        ([""], r"bad\.csv: no images found"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        read_pixel_csv(path)


def test_read_images_refuses_other_files(tmp_path: Path) -> None:
    (tmp_path / "x.tsv").write_text("label\t1\n")
    with pytest.raises(DataError, match=r"x\.tsv: image data must be a folder .* or a \.csv"):
        read_images(tmp_path / "x.tsv")
    with pytest.raises(DataError, match="no such file or folder"):
        read_images(tmp_path / "gone.csv.bak")


def test_reader_options_are_validated() -> None:
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        ReaderOptions(channels=2)
    with pytest.raises(ValueError, match="pixel_max must be a number > 0"):
        ReaderOptions(pixel_max=0)
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        ReaderOptions(image_size=0)


def _images(count: int, labels: str) -> list[LabeledImage]:
    gen = torch.Generator().manual_seed(5)
    return [
        LabeledImage(torch.rand(1, 2, 2, generator=gen), labels[i % len(labels)], f"#{i}")
        for i in range(count)
    ]


def test_split_is_stratified_seeded_and_disjoint() -> None:
    images = _images(100, "ab")
    splits = split_images(images, validation=0.2, test=0.1, seed=0)
    assert splits.sizes() == {"train": 70, "validation": 20, "test": 10}
    for name, part in splits.items():
        counts = {label: sum(i.label == label for i in part) for label in "ab"}
        assert counts["a"] == counts["b"], (name, counts)
    sources = [i.source for _, part in splits.items() for i in part]
    assert sorted(sources) == sorted(i.source for i in images)
    # Same seed, same split whatever the file order; another seed, another split.
    again = split_images(list(reversed(images)), validation=0.2, test=0.1, seed=0)
    assert {i.source for i in again.test} == {i.source for i in splits.test}
    other = split_images(images, validation=0.2, test=0.1, seed=1)
    assert {i.source for i in other.test} != {i.source for i in splits.test}
    with pytest.raises(ValueError, match="must be below 1"):
        split_images(images, validation=0.5, test=0.5)


def test_builtin_digits() -> None:
    pytest.importorskip("sklearn")
    splits = load_images("builtin:digits")
    assert splits.sizes() == {"train": 1259, "validation": 179, "test": 359}
    test = splits.test
    assert {i.label for i in test} == {str(d) for d in range(10)}
    assert all(i.pixels.shape == (1, 8, 8) for i in test)
    assert min(float(i.pixels.min()) for i in test) >= 0.0 and max(
        float(i.pixels.max()) for i in test
    ) == pytest.approx(1.0)
    assert not {i.source for i in test} & {i.source for i in splits.train}
