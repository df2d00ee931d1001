"""No command writes over one of its inputs, or over a file qkv did not write, unless told to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qkv.cli.main import main
from qkv.cli.outputs import check_outputs
from qkv.train.checkpoint import FORMAT

pytest.importorskip("matplotlib")


def _fake_model(folder: Path, task: str) -> Path:
    """A model folder that names its task: enough for the commands to reach their output checks,
    which come before any model is loaded."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"format": FORMAT, "task": task}))
    return folder


def test_classify_explain_never_overwrites_the_input_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # docs/image.md once suggested `seven.png --explain --html seven.html`: the picture beside
    # the page is seven.png, the input itself. It must survive, --overwrite or not.
    model = _fake_model(tmp_path / "digits-vit", "image")
    seven = tmp_path / "seven.png"
    original = bytes(range(256)) * 3
    seven.write_bytes(original)
    page = tmp_path / "seven.html"
    for extra in ([], ["--overwrite"]):
        argv = ["classify", "--model", str(model), str(seven), "--explain", "--html", str(page)]
        assert main([*argv, *extra]) == 2
        error = capsys.readouterr().err
        assert f"the attention picture of {seven} {seven} is an input of this command" in error
        assert seven.read_bytes() == original
        assert not page.exists()


def test_classify_explain_refuses_a_users_file_unless_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _fake_model(tmp_path / "rt-model", "sentiment")
    notes = tmp_path / "notes.html"
    notes.write_text("<p>my notes</p>")
    argv = ["classify", "--model", str(model), "a film", "--explain", "--html", str(notes)]
    assert main(argv) == 2
    assert f"--html {notes} already exists and was not written by qkv; pass --overwrite" in (
        capsys.readouterr().err
    )
    assert notes.read_text() == "<p>my notes</p>"
    # With --overwrite the check passes and the command goes on to load the (fake) model.
    assert main([*argv, "--overwrite"]) == 2
    assert "already exists" not in capsys.readouterr().err


def test_summarize_and_translate_refuse_their_input_as_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = tmp_path / "doc.html"
    document.write_text("a document that happens to be html")
    model = _fake_model(tmp_path / "doc-model", "summarization")
    argv = ["summarize", "--model", str(model), str(document), "--explain", "--html", str(document)]
    assert main([*argv, "--overwrite"]) == 2
    assert f"--html {document} is an input of this command" in capsys.readouterr().err
    lines = tmp_path / "dates.png"
    lines.write_text("3 mars 1998\n")
    model = _fake_model(tmp_path / "dates-model", "translation")
    argv = [
        "translate",
        "--model",
        str(model),
        "--file",
        str(lines),
        "--show-attention",
        str(lines),
    ]
    assert main([*argv, "--overwrite"]) == 2
    assert f"--show-attention {lines} is an input" in capsys.readouterr().err
    assert lines.read_text() == "3 mars 1998\n"


def test_viz_replaces_its_own_pictures_but_not_a_users_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    picture = tmp_path / "masks.png"
    assert main(["viz", "masks", "--out", str(picture)]) == 0
    assert main(["viz", "masks", "--out", str(picture)]) == 0  # its own picture: replaced
    capsys.readouterr()
    holiday = tmp_path / "holiday.png"
    holiday.write_bytes(b"\x89PNG\r\n\x1a\n a user's photo")
    assert main(["viz", "masks", "--out", str(holiday)]) == 2
    assert "was not written by qkv" in capsys.readouterr().err
    assert holiday.read_bytes() == b"\x89PNG\r\n\x1a\n a user's photo"
    assert main(["viz", "masks", "--out", str(holiday), "--overwrite"]) == 0
    assert holiday.read_bytes() != b"\x89PNG\r\n\x1a\n a user's photo"


def test_viz_page_refuses_to_write_over_its_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "weights.pt"
    torch.save({"layers": {"l0": torch.rand(2, 3, 4)}}, weights)
    saved = weights.read_bytes()
    assert main(["viz", "page", str(weights), "--out", str(weights), "--overwrite"]) == 2
    assert f"--out {weights} is an input of this command" in capsys.readouterr().err
    assert weights.read_bytes() == saved


def test_check_outputs_rules(tmp_path: Path) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a folder; give a file path"):
        check_outputs([("--out", folder)], overwrite=True)
    mine = tmp_path / "mine.txt"
    mine.write_text("x")
    # the same file through another spelling of its path is still the input
    with pytest.raises(ValueError, match="is an input of this command"):
        check_outputs([("--out", tmp_path / "a-folder" / ".." / "mine.txt")], inputs=[mine])
    check_outputs([("--out", mine)], inputs=["-"], overwrite=True)  # stdin is no file
    check_outputs([("--out", tmp_path / "new.png")])  # a new file is always fine


def test_viz_pretrained_refuses_a_users_picture_in_its_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    from test_pretrained import _random_hf_folder

    folder, _ = _random_hf_folder(tmp_path / "encoder")
    out = tmp_path / "pictures"
    out.mkdir()
    (out / "rollout.png").write_bytes(b"my own rollout picture")
    argv = ["viz", "pretrained", str(folder), "w2 w5 w9", "--out", str(out), "--layers", "0"]
    assert main(argv) == 2
    assert "--out " in (err := capsys.readouterr().err) and "rollout.png already exists" in err
    assert (out / "rollout.png").read_bytes() == b"my own rollout picture"
    assert main([*argv, "--overwrite"]) == 0
    assert main(argv) == 0  # now its own pictures: replaced without --overwrite
