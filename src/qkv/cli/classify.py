"""``qkv classify``: classify texts with a model folder from ``qkv train sentiment``.

::

    qkv train sentiment --data builtin:rt --out rt-model --minutes 20
    qkv train sentiment --pretrained minilm --data builtin:rt --out rt-minilm --steps 428
    qkv classify --model rt-model "a gorgeous, witty film" --explain [--html page.html]
    qkv evaluate --model rt-model            # accuracy, macro-F1, confusion matrix

An image model's folder is classified by :mod:`qkv.cli.image`; a folder of a task added
from outside is handed to its spec's ``run_classify(args)``. ``--explain`` (the same convention as
``qkv summarize``) writes an HTML page (``--html``) and, on a terminal, shades each token by
its attention-pooling weight; in a pipe, or with ``NO_COLOR`` set, it prints the
most-attended tokens as plain text instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["colour_wanted", "read_texts", "register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``qkv classify``."""
    from qkv.cli.train import add_runtime_args

    p = commands.add_parser(
        "classify",
        help="classify texts with a trained sentiment/text classifier",
        description='qkv classify --model rt-model "a gorgeous, witty film" [--explain]',
    )
    p.add_argument(
        "--model", type=Path, required=True, help="model folder from qkv train sentiment"
    )
    p.add_argument("text", nargs="*", help="texts to classify; '-' reads stdin, one per line")
    p.add_argument("--file", type=Path, default=None, help="classify every line of this file")
    add_explain_args(p, what="each text's tokens by attention-pooling weight")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    add_runtime_args(p)
    p.set_defaults(run=_run_classify)


def add_explain_args(p: argparse.ArgumentParser, *, what: str) -> None:
    """``--explain`` and ``--html FILE``: the one convention of ``classify`` and ``summarize``."""
    p.add_argument(
        "--explain",
        action="store_true",
        help=f"shade {what}: an HTML page (--html) and, on a terminal, colours",
    )
    p.add_argument(
        "--html",
        type=Path,
        default=Path("explain.html"),
        help="where --explain writes its page (default %(default)s)",
    )
    from qkv.cli.outputs import add_overwrite_arg

    add_overwrite_arg(p)


def colour_wanted(stream: Any) -> bool:
    """Colour escape codes only for a terminal, and never when ``NO_COLOR`` is set
    (https://no-color.org)."""
    return bool(stream.isatty()) and not os.environ.get("NO_COLOR")


def read_texts(texts: list[str], file: Path | None) -> list[str]:
    """The texts to classify: arguments (``-`` reads stdin, one text per line) and a file's
    lines, one output line each (:func:`qkv.cli.inputs.read_lines`).

    Raises:
        ValueError: an empty text (naming it), a file that cannot be read, or nothing at all.
    """
    from qkv.cli.inputs import read_lines

    return read_lines(texts, file, verb="classify")


def _run_classify(args: argparse.Namespace) -> int:
    from qkv.tasks.base import get_task, set_attention_backend
    from qkv.train import read_config, seed_everything

    seed_everything(args.seed)
    task = str(read_config(args.model).get("task"))
    if task == "image":
        from qkv.cli.image import run_classify_images

        return run_classify_images(args)
    if task != "sentiment":
        # A task added from outside handles the command through its spec's
        # run_classify(args) -> exit code (by default: "does not classify").
        return int(get_task(task).run_classify(args))
    # a classifier trained from scratch or a fine-tuned pretrained one: the spec tells them apart
    if args.explain:
        from qkv.cli.outputs import check_outputs

        inputs = [] if args.file is None else [args.file]
        check_outputs([("--html", args.html)], inputs=inputs, overwrite=args.overwrite)
    texts = read_texts(args.text, args.file)
    classifier = get_task("sentiment").load(args.model, device=args.device)
    set_attention_backend(classifier.model, args.backend)
    predictions = classifier.classify(texts)
    fragments = []
    for text, p in zip(texts, predictions, strict=True):
        if args.json:
            print(json.dumps({"text": text, "label": p.label, "probabilities": p.probabilities}))
        else:
            probs = "  ".join(f"{k} {v:.3f}" for k, v in p.probabilities.items())
            print(f"{p.label}\t({probs})\t{text[:80]}")
        if args.explain:
            fragments.append(_explain(p, colour=colour_wanted(sys.stdout), quiet=args.json))
    if args.explain:
        from qkv.viz import html_document

        args.html.write_text(
            html_document(fragments, title="qkv classify --explain"), encoding="utf-8"
        )
        print(f"explanation page: {args.html}", file=sys.stderr)
    return 0


def _explain(prediction: Any, *, colour: bool, quiet: bool) -> str:
    """Print the tokens shaded (``colour``) or the most-attended ones as text (unless
    ``quiet``: JSON output); return the HTML fragment."""
    import torch

    from qkv.viz import shade_tokens_ansi, shade_tokens_html

    weights = torch.tensor(prediction.weights)
    tokens = [t.strip() or "·" for t in prediction.tokens]
    # attention pooling weights, or (a mean-pooling classifier) the encoder's attention rollout
    kind = getattr(prediction, "weights_kind", "attention pooling")
    name = "attention" if kind == "attention pooling" else kind
    if colour and not quiet:
        print(
            "  "
            + shade_tokens_ansi(tokens, weights)
            + ("" if name == "attention" else f"  ({name})")
        )
    elif not quiet:
        top = sorted(range(len(tokens)), key=lambda i: -float(weights[i]))[:5]
        print(f"  {name}: " + ", ".join(f"{tokens[i]} {float(weights[i]):.2f}" for i in top))
    caption = f"{prediction.label} ({prediction.probabilities[prediction.label]:.3f})"
    if name != "attention":
        caption += f", shaded by {name}"
    return shade_tokens_html(tokens, weights, label=caption, document=False)
