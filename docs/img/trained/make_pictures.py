"""Regenerate the pictures of docs/visualization.md from trained qkv models.

    python docs/img/trained/make_pictures.py --dates DATES_MODEL --classifier TRANSFORMER_RT \
        [--chromium chromium] [--pages /tmp/pages]

DATES_MODEL: a translation model folder trained on builtin:dates (``qkv demo`` writes one to
qkv-demo/model); TRANSFORMER_RT: a ``qkv train sentiment --preset transformer-small`` folder.
Writes PNGs and a small interactive page next to this file; the 2,000- and 10,000-token pages
go to ``--pages`` (several MB: not for the repository), with their sizes and headless-Chromium
load times printed, and a screenshot of the 10,000-token page here.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from qkv.data.labeled import load_labeled
from qkv.data.tokenizer import PairTokenizer, TextTokenizer
from qkv.interpret.alignment import load_translator
from qkv.models.classifier import AttentionClassifier, ClassifierConfig
from qkv.train import load_model
from qkv.viz import attention_heatmap, head_grid, save_figure, weights_from_qk, write_page

HERE = Path(__file__).resolve().parent
SENTENCES = ["mardi 3 mars 1998", "четверг, 11 октября 1945 г."]


def dates_pictures(folder: Path) -> None:
    model, tokenizer, _ = load_translator(folder)
    pair: PairTokenizer = tokenizer
    for index, text in enumerate(SENTENCES):
        from qkv.decode import greedy_decode

        source = torch.tensor([pair.source.encode(text, add_eos=True)])
        target = pair.target.decode(greedy_decode(model, source, max_len=24)[0])  # type: ignore[arg-type]
        target_ids = pair.target.encode(target, add_bos=True, add_eos=True)
        cross = model.cross_attention(  # type: ignore[operator]
            source, torch.tensor([target_ids[:-1]]), layer=None, per_head=True
        )  # (L, H, Nt, Ns)
        src = [*pair.source.tokens(text), "</s>"]
        tgt = [*pair.target.tokens(target), "</s>"]
        last = cross.shape[0] - 1
        save_figure(
            head_grid(cross[last], src, tgt, title=f"{text!r} -> {target}: decoder layer {last}"),
            HERE / f"dates_heads_{index}.png",
        )
        save_figure(
            attention_heatmap(cross[last].mean(0), src, tgt, title=f"layer {last}, mean of heads"),
            HERE / f"dates_mean_{index}.png",
        )
        if index == 0:
            layers = {f"cross-attention, layer {layer}": cross[layer] for layer in range(len(cross))}
            write_page(HERE / "dates_attention.html", layers, src, tgt, title=f"{text} -> {target}")


def classifier_layers(folder: Path, n: int) -> tuple[dict[str, Any], list[str]]:
    """Self-attention of a trained Transformer classifier's encoder over ``n`` tokens of
    held-out reviews laid end to end, as lazy (q, k) layers for the page."""
    model, config = load_model(folder, lambda c: AttentionClassifier(ClassifierConfig.from_dict(c)))
    tokenizer = TextTokenizer.load(folder / "tokenizer.json")
    ids: list[int] = []
    for example in load_labeled(config["data"]["spec"]).test:
        ids += tokenizer.encode(example.text)
        if len(ids) >= n:
            break
    ids = ids[:n]
    tokens = [tokenizer.hf.decode([i]) for i in ids]
    x = model.embed(torch.tensor([ids]))
    mask = torch.ones(1, n, dtype=torch.bool)
    layers: dict[str, Any] = {}
    with torch.no_grad():
        for number, block in enumerate(model.encoder.blocks):  # type: ignore[union-attr]
            normed = block.norm1(x)
            attn = block.attn
            q = attn._split_heads(attn.q_proj(normed), attn.num_heads)
            q = attn.rope.rotate(q, 0)
            k, _ = attn.project_kv(normed)
            layers[f"encoder layer {number}"] = weights_from_qk(q, k)
            x = block(x, mask)
    return layers, tokens


def load_in_chromium(browser: str, page: Path, screenshot: Path | None) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as profile:
        flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"]
        started = time.perf_counter()
        done = subprocess.run(
            [*flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri() + "#row=0&col=0"],
            capture_output=True,
            text=True,
            check=True,
        )
        wall = time.perf_counter() - started
        ready = re.search(r'data-qkv-ready="([^"]*)"', done.stdout)
        assert ready is not None and 'data-qkv-errors="' not in done.stdout
        if screenshot is not None:
            row = 7000
            subprocess.run(
                [*flags, "--hide-scrollbars", "--window-size=1200,780",
                 f"--screenshot={screenshot}", page.as_uri() + f"#row={row}&col={row - 3}"],
                capture_output=True,
                check=True,
            )  # fmt: skip
    return json.loads(html.unescape(ready.group(1)))["ms"], wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dates", type=Path, required=True)
    parser.add_argument("--classifier", type=Path, required=True)
    parser.add_argument("--chromium", default="chromium")
    parser.add_argument("--pages", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    dates_pictures(args.dates)
    for n in (2000, 10_000):
        layers, tokens = classifier_layers(args.classifier, n)
        started = time.perf_counter()
        page = write_page(args.pages / f"rt_{n}.html", layers, tokens, tokens, title=f"{n} tokens")
        built = time.perf_counter() - started
        shot = HERE / "page_10k.png" if n == 10_000 else None
        ms, wall = load_in_chromium(args.chromium, page, shot)
        print(
            f"{n} tokens: {page.stat().st_size / 1e6:.2f} MB, built in {built:.1f} s, "
            f"page ready in {ms} ms, headless Chromium run {wall:.1f} s"
        )


if __name__ == "__main__":
    main()
