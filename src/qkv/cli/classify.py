"""``qkv classify`` and ``qkv train sentiment``; the sentiment scorer of ``qkv evaluate``.

::

    qkv train sentiment --data builtin:rt --out rt-model --minutes 20
    qkv classify --model rt-model "a gorgeous, witty film" --explain
    qkv evaluate --model rt-model            # accuracy, macro-F1, confusion matrix
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["evaluate_folder", "read_texts", "register", "register_train"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``qkv classify``."""
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
    p.add_argument(
        "--explain",
        action="store_true",
        help="shade each text's tokens by attention-pooling weight (terminal) and write HTML",
    )
    p.add_argument(
        "--html",
        type=Path,
        default=Path("explain.html"),
        help="where --explain writes its page (default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=_run_classify)


def read_texts(texts: list[str], file: Path | None) -> list[str]:
    """The texts to classify: arguments (``-`` reads stdin, one text per line) and a file's lines.

    Raises:
        ValueError: an empty text argument, a file that cannot be read, or nothing at all.
    """
    lines: list[str] = []
    for i, text in enumerate(texts, start=1):
        if text == "-":
            lines.extend(line for line in sys.stdin.read().splitlines() if line.strip())
        elif not text.strip():
            raise ValueError(f"text argument {i} is empty: there is nothing to classify")
        else:
            lines.append(text)
    if file is not None:
        try:
            lines.extend(t for t in file.read_text(encoding="utf-8").splitlines() if t.strip())
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"--file {file}: cannot be read ({error})") from None
    if not lines:
        raise ValueError("nothing to classify: give texts, '-' for stdin, or --file FILE")
    return lines


def _run_classify(args: argparse.Namespace) -> int:
    from qkv.tasks.sentiment import TextClassifier

    classifier = TextClassifier.load(args.model)
    classifier.model.to(args.device)
    texts = read_texts(args.text, args.file)
    predictions = classifier.classify(texts)
    fragments = []
    for text, p in zip(texts, predictions, strict=True):
        if args.json:
            print(json.dumps({"text": text, "label": p.label, "probabilities": p.probabilities}))
        else:
            probs = "  ".join(f"{k} {v:.3f}" for k, v in p.probabilities.items())
            print(f"{p.label}\t({probs})\t{text[:80]}")
        if args.explain:
            fragments.append(_explain(p, sys.stdout.isatty() or not args.json))
    if args.explain:
        from qkv.viz import html_document

        args.html.write_text(
            html_document(fragments, title="qkv classify --explain"), encoding="utf-8"
        )
        print(f"explanation page: {args.html}", file=sys.stderr)
    return 0


def _explain(prediction: Any, terminal: bool) -> str:
    """Print the shaded tokens; return the HTML fragment."""
    import torch

    from qkv.viz import shade_tokens_ansi, shade_tokens_html

    weights = torch.tensor(prediction.weights)
    tokens = [t.strip() or "·" for t in prediction.tokens]
    if terminal:
        print("  " + shade_tokens_ansi(tokens, weights))
    caption = f"{prediction.label} ({prediction.probabilities[prediction.label]:.3f})"
    return shade_tokens_html(tokens, weights, label=caption, document=False)


# --------------------------------------------------------------------------------------------
# qkv train sentiment


def register_train(tasks: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``qkv train sentiment``."""
    from qkv.cli.train import add_training_args

    p = tasks.add_parser(
        "sentiment",
        help="text classification (sentiment) with an attention-pooling classifier",
        description="qkv train sentiment --data builtin:rt --out rt-model --minutes 20",
    )
    g = p.add_argument_group("data and model")
    g.add_argument(
        "--data", required=True, help="builtin:imdb, builtin:rt, a CSV/TSV/JSONL file or a folder"
    )
    g.add_argument(
        "--text-column", default="text", help="text column or field (default %(default)s)"
    )
    g.add_argument(
        "--label-column", default="label", help="label column or field (default %(default)s)"
    )
    g.add_argument(
        "--preset",
        choices=["tiny", "bigru-fast", "bigru-small", "bigru-base", "transformer-small"],
        default="bigru-small",
    )
    g.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    g.add_argument("--pool-queries", type=int, default=None, help="attention-pooling queries r")
    g.add_argument(
        "--vocab-size", type=int, default=8000, help="BPE vocabulary (default %(default)s)"
    )
    g.add_argument(
        "--max-length",
        type=int,
        default=256,
        help="tokens kept per text, head + tail (default %(default)s)",
    )
    g.add_argument("--penalty", type=float, default=0.0, help="Lin et al.'s pooling penalty weight")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    add_training_args(p, steps=2000)
    p.set_defaults(run=_run_train, batch_size=32)


def _run_train(args: argparse.Namespace) -> int:
    import logging

    from qkv.cli.train import TrainProgress, training_config
    from qkv.tasks.sentiment import SentimentSetup, train_sentiment

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    overrides: dict[str, Any] = {}
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    if args.pool_queries is not None:
        overrides["pool_queries"] = args.pool_queries
    data_options = {}
    if not args.data.startswith("builtin:"):
        data_options = {"text_column": args.text_column, "label_column": args.label_column}
    setup = SentimentSetup(
        preset=args.preset,
        vocab_size=args.vocab_size,
        max_length=args.max_length,
        batch_size=args.batch_size,
        penalty=args.penalty,
        model_overrides=overrides,
        data_options=data_options,
    )
    progress = TrainProgress(quiet=args.quiet)
    result = train_sentiment(
        args.data,
        args.out,
        setup=setup,
        train=training_config(args),
        resume=args.resume,
        overwrite=args.overwrite,
        on_step=progress.on_step,
        on_eval=progress.on_eval,
    )
    state = result.state
    best = (
        ""
        if state.best_metric is None
        else f", best accuracy {state.best_metric:.4f} at step {state.best_step}"
    )
    kept = f" (the weights of step {state.best_step})" if args.keep_best else ""
    print(
        f"trained {state.step} steps in {state.elapsed_s:.0f}s ({result.stopped}{best}); "
        f"model folder: {args.out}{kept}"
    )
    return 0


# --------------------------------------------------------------------------------------------
# qkv evaluate (sentiment)


def evaluate_folder(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Accuracy, macro-F1 and confusion matrix of a sentiment folder on ``--data``'s ``--split``
    (default: the data it was trained on)."""
    from qkv.data.labeled import load_labeled
    from qkv.tasks.sentiment import TextClassifier, evaluate_classifier
    from qkv.train import read_config

    classifier = TextClassifier.load(folder)
    saved = read_config(folder)["data"]
    spec = args.data or saved["spec"]
    # Column names and split options of a file; a builtin takes no reader options.
    options = {} if spec.startswith("builtin:") else dict(saved.get("options") or {})
    examples = load_labeled(spec, **options)[args.split][: args.limit]
    if not examples:
        raise ValueError(f"--split {args.split}: no examples in {spec!r}")
    metrics = evaluate_classifier(classifier, examples)
    return {"model": str(folder), "task": "sentiment", "split": args.split, "data": spec, **metrics}
