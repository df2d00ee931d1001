"""``qkv viz pretrained`` on a decoder (``smollm2``, a ``.gguf`` file, a Llama folder).

::

    qkv viz pretrained smollm2 "The printing press spread across Europe." --out out/ --layers 0,17
    qkv viz pretrained smollm2 "..." --out out/ --heads      # + head finder scores, heads.png

The causal maps of every layer (recomputed per layer with :func:`qkv.attention_weights`), the
rollout, the head statistics and the page; with ``--heads`` every head is scored for
previous-token, induction (a repeated random sequence) and first-token-sink patterns
(:mod:`qkv.interpret.heads`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["run_decoder_pictures"]

# Induction probe: 4 random sequences of 50 ids, each repeated once, drawn away from the special
# and byte tokens at the start of a byte-level vocabulary.
PROBE_PERIOD, PROBE_BATCH, PROBE_LOW = 50, 4, 1000


def _decoder_outputs(args: argparse.Namespace, layers: list[int] | None) -> list[tuple[str, Path]]:
    """The pictures and page written into ``--out`` (its JSON reports are replaced as reports)."""
    names: list[str] = []
    if not args.page_only:
        names += [f"heads_layer{i}.png" for i in layers or []] + ["rollout.png", "head_stats.png"]
        if args.heads:
            names.append("heads.png")
    if args.page or args.page_only:
        names.append("attention.html")
    return [("--out", args.out / name) for name in names]


def run_decoder_pictures(args: argparse.Namespace, layers: list[int] | None) -> int:
    import torch

    from qkv.cli.outputs import check_outputs
    from qkv.interpret.heads import find_heads
    from qkv.models.pretrained import load_decoder
    from qkv.viz.decoder import decoder_pictures

    if args.dpi < 1:
        raise ValueError(f"--dpi must be >= 1; got {args.dpi}")
    if not args.text.strip():
        raise ValueError("text is empty: there is nothing to draw")
    check_outputs(_decoder_outputs(args, layers), overwrite=args.overwrite)
    model, tokenizer = load_decoder(args.model)
    ids = torch.tensor([tokenizer.encode(args.text)])
    if ids.shape[1] < 3:
        raise ValueError(f"the text has {ids.shape[1]} tokens; give at least 3")
    tokens = [tokenizer.decode([int(i)], skip_special=False) for i in ids[0]]
    maps = [m[0] for m in model.attention_maps(ids)]  # L x (H, N, N)
    scores = None
    if args.heads:
        vocab = model.config.vocab_size
        low = PROBE_LOW if vocab >= PROBE_LOW + 4 * PROBE_PERIOD else min(3, vocab - 2)
        period = min(PROBE_PERIOD, vocab - low, model.config.max_positions // 2)
        found = find_heads(model, ids, vocab_range=(low, vocab), period=period, batch=PROBE_BATCH)
        scores = found.to_dict()
    pictures = decoder_pictures(
        maps,
        tokens,
        args.out,
        layers=layers or [],
        name=str(args.model),
        title=args.text,
        head_scores=scores,
        page=args.page,
        page_only=args.page_only,
        dpi=args.dpi,
    )
    s = pictures.summary
    print(f"{len(tokens)} tokens: {'|'.join(tokens)}")
    print(f"mean entropy per layer: {s['mean_entropy_per_layer']}")
    print(f"first-token weight per layer: {s['first_token_weight_per_layer']}")
    print(f"previous-token weight per layer: {s['previous_token_weight_per_layer']}")
    if args.heads:
        for pattern in ("previous_token", "induction", "sink"):
            top = ", ".join(f"L{layer}.H{head} {v:.2f}" for layer, head, v in found.top(pattern, 5))
            print(f"top {pattern} heads: {top}")
    for path in pictures.written:
        print(f"wrote {path}")
    return 0
