"""``qkv viz page`` takes weights saved as a plain tensor, a dict of tensors, or the full form
with tokens; anything else gets a message saying what the file holds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from qkv.cli.main import main


def _page_layers(page: Path) -> list[str]:
    """The layer names the page offers (from its embedded data)."""
    data = re.search(r'id="qkv-data"[^>]*>(.*?)</script>', page.read_text(), re.S)
    assert data is not None
    return [layer["name"] for layer in json.loads(data.group(1))["layers"]]


def _weights(*shape: int) -> torch.Tensor:
    return torch.rand(*shape).softmax(dim=-1)


def test_a_plain_tensor_and_a_dict_of_tensors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "weights.pt"
    torch.save(_weights(2, 3, 5), plain)  # (H, Nq, Nk)
    page = tmp_path / "page.html"
    assert main(["viz", "page", str(plain), "--out", str(page)]) == 0
    assert _page_layers(page) == ["weights"]
    several = tmp_path / "layers.pt"
    torch.save({"enc 0": _weights(3, 5), "enc 1": _weights(1, 2, 3, 5)}, several)
    assert main(["viz", "page", str(several), "--out", str(page)]) == 0, capsys.readouterr().err
    assert _page_layers(page) == ["enc 0", "enc 1"]
    full = tmp_path / "full.pt"
    tokens = {"source_tokens": list("abcde"), "target_tokens": list("xyz")}
    torch.save({"layers": {"cross": _weights(2, 3, 5)}, **tokens}, full)
    assert main(["viz", "page", str(full), "--out", str(page)]) == 0
    assert _page_layers(page) == ["cross"]


def test_what_it_cannot_read_is_described(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.pt"
    torch.save({"x": [1, 2], "y": 3}, other)
    assert main(["viz", "page", str(other), "--out", str(tmp_path / "p.html")]) == 2
    err = capsys.readouterr().err
    assert "must hold an (H, Nq, Nk) tensor, a dict {name: (H, Nq, Nk) tensor}, or" in err
    assert "got a dict with keys ['x', 'y'] (values: int, list)" in err
    junk = tmp_path / "junk.pt"
    junk.write_text("not a torch file")
    assert main(["viz", "page", str(junk), "--out", str(tmp_path / "p.html")]) == 2
    assert f"{junk}: not a file written by torch.save (" in capsys.readouterr().err
