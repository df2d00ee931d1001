"""The image task on the task lifecycle: train, resume, evaluate, classify, explain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qkv.cli.main import main
from qkv.data.images import load_images
from qkv.tasks.base import evaluate_model, train_task
from qkv.tasks.image import ImageClassifier, ImageSettings, collate_images, shift_images
from qkv.train import StepReport, TrainConfig

pytest.importorskip("sklearn")
pytest.importorskip("safetensors")
Image = pytest.importorskip("PIL.Image")

TINY = ImageSettings(data="builtin:digits", preset="tiny", batch_size=32)
TRAIN = ["--preset", "tiny", "--batch-size", "32", "--lr", "3e-3", "--warmup", "0",
         "--device", "cpu", "--quiet"]  # fmt: skip


def _training(steps: int) -> TrainConfig:
    return TrainConfig(
        lr=3e-3, warmup_steps=0, max_steps=steps, eval_every=1000, log_every=1, device="cpu"
    )


def _losses(reports: list[StepReport]) -> list[float]:
    return [r.loss for r in reports]


def test_shift_images_moves_each_image_by_its_own_offset() -> None:
    images = torch.rand(5, 2, 6, 6)
    shifted = shift_images(images, 2, torch.Generator().manual_seed(7))
    offsets = torch.randint(0, 5, (2, 5), generator=torch.Generator().manual_seed(7)) - 2
    for b in range(5):
        dy, dx = offsets[:, b].tolist()
        expected = torch.zeros(2, 6, 6)
        for y in range(6):
            for x in range(6):
                if 0 <= y + dy < 6 and 0 <= x + dx < 6:
                    expected[:, y, x] = images[b, :, y + dy, x + dx]
        torch.testing.assert_close(shifted[b], expected)
    assert shift_images(images, 0, torch.Generator()) is images


def test_shifted_batches_depend_only_on_their_examples() -> None:
    items = [(i, torch.rand(1, 8, 8), i % 3) for i in range(4)]
    first, again = collate_images(items, shift=1), collate_images(items, shift=1)
    torch.testing.assert_close(first.pixels, again.pixels)  # a resumed run sees the same batch
    assert not torch.equal(first.pixels, torch.stack([p for _, p, _ in items]))
    assert first.labels.tolist() == [0, 1, 2, 0] and first.index.tolist() == [0, 1, 2, 3]


@pytest.mark.slow
def test_resume_continues_the_same_loss_curve(tmp_path: Path) -> None:
    straight: list[StepReport] = []
    train_task("image", TINY, _training(8), tmp_path / "a", on_step=straight.append)
    first: list[StepReport] = []
    train_task("image", TINY, _training(4), tmp_path / "b", on_step=first.append)
    rest: list[StepReport] = []
    outcome = train_task(
        "image", None, _training(8), tmp_path / "b", resume=True, on_step=rest.append
    )
    assert outcome.resumed_from == 4 and outcome.result.state.step == 8
    assert _losses(first + rest) == pytest.approx(_losses(straight), rel=1e-6, abs=1e-7)
    a = ImageClassifier.load(tmp_path / "a", device="cpu").model.state_dict()
    b = ImageClassifier.load(tmp_path / "b", device="cpu").model.state_dict()
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def _digits_csv(path: Path, count: int) -> Path:
    """The first ``count`` test digits as a CSV on the digits' own 0-16 scale."""
    test = load_images("builtin:digits").test[:count]
    header = ["label", *(f"p{i}" for i in range(64))]
    rows = [[i.label, *(round(float(v) * 16) for v in i.pixels.flatten())] for i in test]
    path.write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")
    return path


@pytest.mark.slow
def test_cli_train_resume_evaluate_classify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "digits"
    train = ["train", "image", "--data", "builtin:digits", "--out", str(out), *TRAIN]
    assert main([*train, "--steps", "6", "--eval-every", "6"]) == 0
    assert "trained 6 steps" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "image" and config["model"]["kind"] == "vit"
    assert config["labels"] == [str(d) for d in range(10)]

    # --resume with another learning rate is refused, naming the setting; more steps go on.
    resume = ["train", "image", "--out", str(out), "--resume", "--quiet"]
    assert main([*resume, "--lr", "0.01"]) == 2
    error = capsys.readouterr().err
    assert "--resume: lr is 0.01 but the run saved in" in error and "used 0.003" in error
    assert main([*resume, "--steps", "8"]) == 0
    assert "trained 8 steps" in capsys.readouterr().out

    # A CSV given to evaluate is scored whole, with the reader option given to evaluate.
    csv = _digits_csv(tmp_path / "digits.csv", 23)
    assert main(["evaluate", "--model", str(out), "--data", str(csv), "--pixel-max", "16",
                 "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert list(report) == ["task", "model", "data", "split", "examples", "metrics"]
    assert (report["task"], report["split"], report["examples"]) == ("image", "all", 23)
    assert sum(map(sum, report["metrics"]["confusion"])) == 23
    direct = evaluate_model(out, data="builtin:digits", device="cpu")
    assert direct.examples == 359 and direct.split == "test"
    assert main(["evaluate", "--model", str(out)]) == 0
    table = capsys.readouterr().out
    assert "(test, 359 examples)" in table and "confusion (rows: gold" in table
    assert f"accuracy {100 * direct.metrics['accuracy']:.2f}%" in table
    # A value beyond the pixel scale is named with its file and line.
    lines = csv.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",300"
    bad_csv = tmp_path / "bad-digits.csv"
    bad_csv.write_text("\n".join(lines) + "\n")
    assert main(["evaluate", "--model", str(out), "--data", str(bad_csv)]) == 2
    assert "bad-digits.csv:3: pixel 64 = 300 is outside [0, pixel_max = 255]" in (
        capsys.readouterr().err
    )

    # classify: label and probabilities per image; --explain draws the attention picture.
    digit = load_images("builtin:digits").test[0]
    png = tmp_path / "digit.png"
    Image.fromarray((digit.pixels[0].numpy() * 255).astype(np.uint8)).resize((32, 32)).save(png)
    page = tmp_path / "attention.html"
    code = main(["classify", "--model", str(out), str(png), str(png), "--json", "--explain",
                 "--html", str(page), "--device", "cpu"])  # fmt: skip
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert code == 0 and [r["image"] for r in lines] == [str(png)] * 2
    assert lines[0]["label"] in config["labels"] and lines[0] == lines[1]
    assert sum(lines[0]["probabilities"].values()) == pytest.approx(1.0)
    for picture in (tmp_path / "attention-1.png", tmp_path / "attention-2.png"):
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"attention picture: {picture}" in captured.err
    assert page.read_text().count("data:image/png;base64,") == 2
    # The picture of `--html digit.html` would be digit.png, the input: refused, input intact.
    before = png.read_bytes()
    explain = ["--explain", "--html", str(tmp_path / "digit.html")]
    assert main(["classify", "--model", str(out), str(png), *explain]) == 2
    assert f"{png} is an input of this command" in capsys.readouterr().err
    assert png.read_bytes() == before
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    assert main(["classify", "--model", str(out), str(png), str(bad)]) == 2
    assert f"{bad}: cannot read the image" in capsys.readouterr().err


@pytest.mark.slow
def test_train_on_a_folder_of_pngs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "bars"
    for label, axis in (("horizontal", 0), ("vertical", 1)):
        for i in range(20):
            array = rng.integers(0, 40, (8, 8), dtype=np.uint8)
            index = [slice(None), slice(None)]
            index[axis] = slice(i % 6 + 1, i % 6 + 2)
            array[tuple(index)] = 255
            (root / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).resize((16, 16)).save(root / label / f"{i}.png")
    out = tmp_path / "bars-model"
    code = main(["train", "image", "--data", str(root), "--out", str(out), "--image-size", "8",
                 "--patch-size", "2", "--steps", "30", "--eval-every", "30", "--shift", "0",
                 *TRAIN])  # fmt: skip
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["labels"] == ["horizontal", "vertical"]
    assert (config["model"]["image_size"], config["model"]["channels"]) == (8, 1)
    # The training folder's seeded test split, read as it was for training.
    report = evaluate_model(out, device="cpu").to_dict()
    assert report["split"] == "test" and report["examples"] == 4
    assert report["metrics"]["accuracy"] >= 0.75
    capsys.readouterr()
