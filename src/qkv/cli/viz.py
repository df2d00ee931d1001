"""``qkv viz``: pictures and pages of attention, from a saved file or from a synthetic example.

- ``qkv viz masks --out masks.png``: the built-in masks drawn side by side.
- ``qkv viz page WEIGHTS.pt --out page.html [--png map.png --layer NAME --head H]``: the
  interactive page (and a heat map) of weights saved with ``torch.save``: an ``(H, Nq, Nk)``
  tensor, a dict ``{name: (H, Nq, Nk) tensor}``, or ``{"layers": {name: tensor},
  "source_tokens": [...], "target_tokens": [...]}`` to label the axes.
- ``qkv viz pretrained minilm "a sentence" --out DIR [--page] [--layers 0,5]``: per-head maps,
  rollout, head statistics and a summary of a real pretrained encoder's attention (a named model
  or an HF-layout folder), with ``--page`` the interactive page too.
- ``qkv viz example --out DIR``: every kind of picture from *synthetic* weights (random
  queries and keys run through ``qkv.attention`` with alignment and ALiBi biases), as in
  docs/visualization.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]

SOURCE = ["le", "petit", "chat", "noir", "dort", "sur", "le", "tapis", "."]
TARGET = ["the", "little", "black", "cat", "sleeps", "on", "the", "mat", "."]
# Which source word each target word translates (French puts the colour after the noun).
ALIGNMENT = [0, 1, 3, 2, 4, 5, 6, 7, 8]
#: What ``qkv viz example`` writes into its folder.
EXAMPLE_FILES = (
    "masks.png",
    "cross_attention.png",
    "cross_heads.png",
    "self_heads.png",
    "head_stats.png",
    "rollout.png",
    "attention.html",
    "shaded.html",
)
REVIEW = ["a", "quietly", "brilliant", "film", "with", "one", "dull", "scene"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``viz`` and its subcommands to the ``qkv`` sub-parsers action ``commands``."""
    from qkv.cli.outputs import add_overwrite_arg

    viz = commands.add_parser("viz", help="attention pictures and offline interactive pages")
    actions = viz.add_subparsers(dest="viz_command", metavar="WHAT", required=True)

    masks = actions.add_parser("masks", help="draw the built-in masks side by side")
    masks.add_argument("--out", type=Path, required=True, help="image file (.png, .svg, .pdf)")
    masks.add_argument("--q-len", type=int, default=6, help="Nq (default %(default)s)")
    masks.add_argument("--kv-len", type=int, default=10, help="Nk (default %(default)s)")
    masks.add_argument("--window", type=int, default=3, help="sliding window: keys this far back")
    add_overwrite_arg(masks)
    masks.set_defaults(run=_run_masks)

    page = actions.add_parser("page", help="interactive page (and heat map) of saved weights")
    page.add_argument(
        "weights",
        type=Path,
        help="torch.save file: an (H, Nq, Nk) tensor, a dict {name: (H, Nq, Nk) tensor}, or "
        "{'layers': {name: tensor}, 'source_tokens': [...], 'target_tokens': [...]}",
    )
    page.add_argument("--out", type=Path, required=True, help="HTML file to write")
    page.add_argument("--png", type=Path, default=None, help="also write this heat map")
    page.add_argument("--layer", default=None, help="layer for --png (default: the last)")
    page.add_argument("--head", type=int, default=None, help="head for --png (default: mean)")
    page.add_argument(
        "--top-k", type=int, default=8, help="exact weights kept per row (default %(default)s)"
    )
    page.add_argument(
        "--max-cells",
        type=int,
        default=512,
        help="overview rows/columns at most; longer maps are block means (default %(default)s)",
    )
    add_overwrite_arg(page)
    page.set_defaults(run=_run_page)

    pretrained = actions.add_parser(
        "pretrained",
        help="per-head maps, rollout and head statistics of a pretrained encoder or decoder",
    )
    pretrained.add_argument(
        "model", help="a named model ('minilm', 'smollm2'), an HF-layout folder or a .gguf file"
    )
    pretrained.add_argument("text", help="the sentence to look at")
    pretrained.add_argument("--out", type=Path, required=True, help="folder to write into")
    pretrained.add_argument(
        "--layers",
        default=None,
        help="layers drawn head by head, e.g. 0,2,5 (default: all for an encoder, none for a decoder)",
    )
    pretrained.add_argument("--page", action="store_true", help="also the interactive page")
    pretrained.add_argument(
        "--page-only", action="store_true", help="only the page and summary (no matplotlib)"
    )
    pretrained.add_argument("--dpi", type=int, default=100, help="PNG resolution")
    add_overwrite_arg(pretrained)
    pretrained.add_argument(
        "--heads",
        action="store_true",
        help="decoders: also score every head (previous-token, induction, sink) on probes",
    )
    pretrained.set_defaults(run=_run_pretrained)

    example = actions.add_parser("example", help="every picture, from synthetic weights")
    example.add_argument("--out", type=Path, required=True, help="folder to write into")
    example.add_argument("--seed", type=int, default=0)
    add_overwrite_arg(example)
    example.set_defaults(run=_run_example)


def _run_masks(args: argparse.Namespace) -> int:
    from qkv.cli.outputs import check_outputs
    from qkv.viz import mask_grid, save_figure

    check_outputs([("--out", args.out)], overwrite=args.overwrite)
    fig = mask_grid(_mask_examples(args.q_len, args.kv_len, args.window), args.q_len, args.kv_len)
    print(f"wrote {save_figure(fig, args.out)}")
    return 0


def _mask_examples(nq: int, nk: int, window: int) -> dict[str, Any]:
    """Causal in both alignments, a sliding window and packed documents for ``Nq x Nk``."""
    import torch

    from qkv import masks

    offset = nk - nq
    key_ids = torch.arange(nk) * 3 // nk  # three documents packed in the keys
    return {
        "causal, top-left": masks.causal(),
        "causal, bottom-right": masks.causal_bottom_right(nq, nk),
        f"sliding window {window}": masks.sliding_window(window, offset=offset),
        "documents (bottom-right)": masks.document(key_ids[offset:], key_ids)
        & masks.causal(offset),
    }


def _describe(value: Any) -> str:
    """What a loaded object is, for an error message."""
    import torch

    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        kinds = sorted({type(v).__name__ for v in value.values()})
        return f"a dict with keys {sorted(map(str, value))[:8]} (values: {', '.join(kinds) or '-'})"
    return f"a {type(value).__name__}"


def _as_layer(name: str, weights: Any, path: Path) -> Any:
    """``weights`` as ``(H, Nq, Nk)``: an ``(Nq, Nk)`` map gets one head, a ``(1, H, Nq, Nk)``
    batch of one loses its batch axis; other shapes are left to the page's own checks."""
    import torch

    if not isinstance(weights, torch.Tensor):
        raise ValueError(f"{path}: layer {name!r} must be a tensor; got {_describe(weights)}")
    if weights.ndim == 2:
        return weights.unsqueeze(0)  # (1, Nq, Nk)
    if weights.ndim == 4 and weights.shape[0] == 1:
        return weights[0]  # (H, Nq, Nk)
    return weights


def _load_saved(path: Path) -> tuple[dict[str, Any], list[str] | None, list[str] | None]:
    """The layers and tokens of a ``torch.save`` file holding one of: an ``(H, Nq, Nk)`` tensor
    (also ``(Nq, Nk)`` or ``(1, H, Nq, Nk)``), a dict ``{name: tensor}``, or a dict
    ``{"layers": {name: tensor}, "source_tokens": [...], "target_tokens": [...]}``."""
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # no such file, no permission: main() reports it
    except Exception as error:  # anything torch.load cannot read (pickle, zip, struct errors)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: not a file written by torch.save ({first[:200]})") from None
    source = target = None
    if isinstance(saved, torch.Tensor):
        layers: Any = {"weights": saved}
    elif isinstance(saved, dict) and "layers" in saved:
        layers, source, target = (
            saved["layers"],
            saved.get("source_tokens"),
            saved.get("target_tokens"),
        )
        if isinstance(layers, torch.Tensor):
            layers = {"weights": layers}
    elif (
        isinstance(saved, dict)
        and saved
        and all(isinstance(v, torch.Tensor) for v in saved.values())
    ):
        layers = saved
    else:
        layers = None
    if not isinstance(layers, dict) or not layers:
        raise ValueError(
            f"{path} must hold an (H, Nq, Nk) tensor, a dict {{name: (H, Nq, Nk) tensor}}, or "
            "{'layers': {name: tensor}, 'source_tokens': [...], 'target_tokens': [...]}; "
            f"got {_describe(saved)}"
        )
    return {str(k): _as_layer(str(k), v, path) for k, v in layers.items()}, source, target


def _run_page(args: argparse.Namespace) -> int:
    from qkv.cli.outputs import check_outputs
    from qkv.viz import attention_heatmap, save_figure, write_page

    outputs = [("--out", args.out)] + ([] if args.png is None else [("--png", args.png)])
    check_outputs(outputs, inputs=[args.weights], overwrite=args.overwrite)
    layers, source, target = _load_saved(args.weights)
    path = write_page(
        args.out,
        layers,
        source,
        target,
        title=args.weights.name,
        top_k=args.top_k,
        max_cells=args.max_cells,
    )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    if args.png is not None:
        name = args.layer if args.layer is not None else list(layers)[-1]
        if name not in layers:
            raise ValueError(f"--layer {name!r} is not in the file; it has {list(layers)}")
        weights = layers[name]
        chosen = weights.mean(dim=0) if args.head is None else weights[args.head]
        label = "mean of heads" if args.head is None else f"head {args.head}"
        fig = attention_heatmap(chosen, source, target, title=f"{name}, {label}")
        print(f"wrote {save_figure(fig, args.png)}")
    return 0


def _parse_layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers; got {text!r}") from None


def _pretrained_outputs(
    args: argparse.Namespace, layers: list[int] | None, num_layers: int
) -> list[tuple[str, Path]]:
    """The pictures and page ``qkv viz pretrained`` writes into ``--out`` (its ``summary.json``
    is a report of its own and is replaced)."""
    names = []
    if not args.page_only:
        chosen = range(num_layers) if layers is None else layers
        names += [f"heads_layer{i}.png" for i in chosen] + ["rollout.png", "head_stats.png"]
    if args.page or args.page_only:
        names.append("attention.html")
    return [("--out", args.out / name) for name in names]


def _run_pretrained(args: argparse.Namespace) -> int:
    from qkv.cli.outputs import check_outputs
    from qkv.interpret.pictures import pretrained_pictures
    from qkv.models import load_pretrained
    from qkv.models.pretrained.decoder import is_decoder

    layers = _parse_layers(args.layers)
    if is_decoder(args.model):
        from qkv.cli.decoder_viz import run_decoder_pictures

        return run_decoder_pictures(args, layers)
    if args.dpi < 1:
        raise ValueError(f"--dpi must be >= 1; got {args.dpi}")
    encoder, tokenizer = load_pretrained(args.model)
    check_outputs(
        _pretrained_outputs(args, layers, encoder.config.num_hidden_layers),
        overwrite=args.overwrite,
    )
    pictures = pretrained_pictures(
        encoder,
        tokenizer,
        args.text,
        args.out,
        layers=layers,
        name=str(args.model),
        page=args.page,
        page_only=args.page_only,
        dpi=args.dpi,
    )
    s = pictures.summary
    print(f"{len(pictures.tokens)} tokens: {' '.join(pictures.tokens)}")
    print(f"mean entropy per layer: {s['mean_entropy_per_layer']}")
    print(f"[CLS]/[SEP] weight per layer: {s['cls_or_sep_weight_per_layer']}")
    print(f"inputs [CLS] reads most (rollout): {s['top_rollout_inputs_of_cls']}")
    for path in pictures.written:
        print(f"wrote {path}")
    return 0


def _synthetic_cross_attention(seed: int, heads: int = 4) -> Any:
    """``(H, Nt, Ns)`` weights of random queries and keys plus a bias towards ``ALIGNMENT``."""
    import torch

    import qkv

    generator = torch.Generator().manual_seed(seed)
    nt, ns, dim = len(TARGET), len(SOURCE), 16
    q = torch.randn(1, heads, nt, dim, generator=generator)
    k = torch.randn(1, heads, ns, dim, generator=generator)
    aligned = torch.tensor(ALIGNMENT, dtype=torch.float32).view(nt, 1)
    distance = (torch.arange(ns, dtype=torch.float32).view(1, ns) - aligned).abs()  # (Nt, Ns)
    # Sharper alignment in the first heads, blurrier in the last, as trained models often show.
    sharpness = torch.linspace(3.0, 0.5, heads).view(1, heads, 1, 1)
    _, weights = qkv.attention(q, k, k, bias=-sharpness * distance, return_weights=True)
    return weights[0]  # (H, Nt, Ns)


def _synthetic_self_attention(seed: int, layers: int = 4, heads: int = 8, n: int = 12) -> list[Any]:
    """``layers`` tensors ``(1, H, N, N)``: random causal self-attention with ALiBi (local heads
    and broad heads) and a pull towards the first token in the last heads (a "sink")."""
    import torch

    import qkv
    from qkv import scores

    generator = torch.Generator().manual_seed(seed)
    slopes = scores.alibi_slopes(heads).view(1, heads, 1, 1)
    position = torch.arange(n, dtype=torch.float32)
    distance = (position.view(n, 1) - position.view(1, n)).abs()  # (N, N)
    sink = torch.zeros(1, heads, 1, n)
    sink[:, heads // 2 :, :, 0] = 3.0
    bias = -slopes * distance + sink  # (1, H, N, N)
    stack = []
    for _ in range(layers):
        q = torch.randn(1, heads, n, 16, generator=generator)
        k = torch.randn(1, heads, n, 16, generator=generator)
        _, weights = qkv.attention(q, k, k, causal=True, bias=bias, return_weights=True)
        stack.append(weights)
    return stack


def _run_example(args: argparse.Namespace) -> int:
    import torch

    from qkv.cli.classify import colour_wanted
    from qkv.cli.outputs import check_outputs
    from qkv.viz import (
        attention_heatmap,
        attention_rollout,
        head_grid,
        head_stats,
        head_stats_figure,
        mask_grid,
        save_figure,
        shade_tokens_ansi,
        shade_tokens_html,
        write_page,
    )

    out: Path = args.out
    check_outputs([("--out", out / name) for name in EXAMPLE_FILES], overwrite=args.overwrite)
    cross = _synthetic_cross_attention(args.seed)
    stack = _synthetic_self_attention(args.seed + 1)
    positions = [f"t{i}" for i in range(stack[0].shape[-1])]
    written = [
        save_figure(mask_grid(_mask_examples(6, 10, 3), 6, 10), out / "masks.png"),
        save_figure(
            attention_heatmap(
                cross.mean(dim=0), SOURCE, TARGET, title="cross-attention, mean of heads"
            ),
            out / "cross_attention.png",
        ),
        save_figure(
            head_grid(cross, SOURCE, TARGET, title="cross-attention heads"), out / "cross_heads.png"
        ),
        save_figure(
            head_grid(stack[-1][0], positions, positions, title="self-attention, last layer"),
            out / "self_heads.png",
        ),
        save_figure(
            head_stats_figure(
                [head_stats(w) for w in stack], title="per-head statistics, 4 layers"
            ),
            out / "head_stats.png",
        ),
        save_figure(
            attention_heatmap(
                attention_rollout(stack)[0],
                positions,
                positions,
                title="attention rollout",
                x_label="input token",
                y_label="output position",
            ),
            out / "rollout.png",
        ),
        write_page(
            out / "attention.html",
            {
                "cross-attention": cross,
                **{f"self {i}": w[0, :, : len(TARGET), : len(SOURCE)] for i, w in enumerate(stack)},
            },
            SOURCE,
            TARGET,
            title="qkv attention (synthetic weights)",
        ),
    ]
    review = torch.rand(len(REVIEW), generator=torch.Generator().manual_seed(args.seed)).pow(2)
    (out / "shaded.html").write_text(shade_tokens_html(REVIEW, review, label="synthetic weights"))
    written.append(out / "shaded.html")
    if colour_wanted(sys.stdout):
        print(shade_tokens_ansi(REVIEW, review))
    else:  # a pipe or NO_COLOR: no escape codes, the weights as text
        shares = review / review.sum()
        print("  ".join(f"{t} {float(w):.2f}" for t, w in zip(REVIEW, shares, strict=True)))
    for path in written:
        print(f"wrote {path}")
    return 0
