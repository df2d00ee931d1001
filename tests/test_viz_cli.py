"""``qkv viz``: its subcommands through a parser built the way qkv.cli.main builds its own."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

from qkv.cli.main import build_parser

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_viz(argv: list[str]) -> int:
    args = build_parser().parse_args(["viz", *argv])
    return int(args.run(args))


def test_viz_masks_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "masks.png"
    assert run_viz(["masks", "--out", str(out), "--q-len", "4", "--kv-len", "7"]) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert str(out) in capsys.readouterr().out


def test_viz_page_from_a_saved_file(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(5)
    layers = {f"layer {i}": torch.randn(2, 3, 4, generator=generator).softmax(-1) for i in range(2)}
    saved = tmp_path / "weights.pt"
    torch.save(
        {"layers": layers, "source_tokens": list("abcd"), "target_tokens": list("xyz")}, saved
    )
    page, png = tmp_path / "page.html", tmp_path / "map.png"
    argv = ["page", str(saved), "--out", str(page), "--png", str(png), "--head", "1"]
    assert run_viz(argv) == 0
    text = page.read_text(encoding="utf-8")
    data = json.loads(re.search(r'id="qkv-data">(.*?)</script>', text, re.S).group(1))  # type: ignore[union-attr]
    assert [layer["name"] for layer in data["layers"]] == ["layer 0", "layer 1"]
    assert data["source"] == list("abcd") and data["target"] == list("xyz")
    assert png.read_bytes().startswith(PNG_SIGNATURE)


def test_viz_page_rejects_other_files(tmp_path: Path) -> None:
    saved = tmp_path / "tensor.pt"
    torch.save(torch.rand(3, 3), saved)
    with pytest.raises(ValueError, match="must hold a dict with 'layers'"):
        run_viz(["page", str(saved), "--out", str(tmp_path / "p.html")])
    torch.save({"layers": {"a": torch.rand(1, 2, 2).softmax(-1)}}, saved)
    with pytest.raises(ValueError, match="--layer 'b'"):
        run_viz(
            [
                "page",
                str(saved),
                "--out",
                str(tmp_path / "p.html"),
                "--png",
                str(tmp_path / "x.png"),
                "--layer",
                "b",
            ]
        )


@pytest.mark.slow
def test_viz_example_writes_every_picture(tmp_path: Path) -> None:
    assert run_viz(["example", "--out", str(tmp_path)]) == 0
    pngs = ["masks", "cross_attention", "cross_heads", "self_heads", "head_stats", "rollout"]
    for name in pngs:
        assert (tmp_path / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE), name
    for name in ("attention.html", "shaded.html"):
        assert not re.search(r"https?:", (tmp_path / name).read_text(encoding="utf-8"))
