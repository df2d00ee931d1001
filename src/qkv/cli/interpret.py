"""``qkv faithfulness`` and ``qkv alignment``: does a trained model's attention explain it?

- ``qkv faithfulness --model DIR [--examples 200] [--out DIR]``: for a sentiment (text
  classification) model folder, attention-based token importance against gradients, integrated
  gradients and leave-one-out erasure, top-k erasure against random tokens, and Jain & Wallace's
  permuted and adversarial attention (:mod:`qkv.interpret.faithfulness`). Prints Markdown tables;
  ``--out`` also writes ``faithfulness.md``, ``faithfulness.json`` and ``faithfulness.png``.
- ``qkv alignment --model DIR [--data builtin:dates] [--examples 300]``: the alignment error rate
  of every cross-attention head of a translation model against the gold alignment of the
  built-in ``dates`` or ``numbers`` data (:mod:`qkv.interpret.alignment`).

Both read model folders through :mod:`qkv.train` and :mod:`qkv.models` only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``faithfulness`` and ``alignment`` to the ``qkv`` sub-parsers action ``commands``."""
    faith = commands.add_parser(
        "faithfulness",
        help="is a classifier's attention faithful to its decisions? (Jain & Wallace tests)",
        description="Compare a text classifier's attention with gradient, integrated-gradient "
        "and leave-one-out token importance on held-out texts; erase top-attended vs random "
        "tokens; permute and adversarially replace the attention (Jain & Wallace 2019).",
    )
    faith.add_argument("--model", type=Path, required=True, help="a sentiment model folder")
    faith.add_argument(
        "--data", default=None, help="texts to measure (default: the model's training data)"
    )
    faith.add_argument(
        "--examples", type=int, default=200, help="held-out texts measured (default %(default)s)"
    )
    faith.add_argument(
        "--max-tokens",
        type=int,
        default=80,
        help="skip longer texts: leave-one-out costs one forward per token (default %(default)s)",
    )
    faith.add_argument("--out", type=Path, default=None, help="folder for the report files")
    faith.add_argument("--seed", type=int, default=0)
    faith.set_defaults(run=_run_faithfulness)

    align = commands.add_parser(
        "alignment",
        help="alignment error rate of a translation model's cross-attention vs gold",
        description="Teacher-force gold targets of the built-in dates or numbers data through a "
        "translation model and score each cross-attention head's argmax alignment against "
        "the alignment known by construction (AER, Och & Ney 2003).",
    )
    align.add_argument("--model", type=Path, required=True, help="a translation model folder")
    align.add_argument(
        "--data",
        default=None,
        choices=["builtin:dates", "builtin:numbers"],
        help="gold-aligned data (default: the model's, when it is one of these)",
    )
    align.add_argument(
        "--examples", type=int, default=300, help="generated pairs scored (default %(default)s)"
    )
    align.add_argument("--seed", type=int, default=1, help="seed of the generated pairs")
    align.add_argument("--out", type=Path, default=None, help="write alignment.json here")
    align.set_defaults(run=_run_alignment)


def _positive(value: int, flag: str) -> None:
    if value < 1:
        raise ValueError(f"{flag} must be >= 1, got {value}")


def _load_classifier(folder: Path) -> tuple[Any, dict[str, Any]]:
    """The sentiment task's :class:`~qkv.tasks.sentiment.TextClassifier` of ``folder`` (on the
    CPU, loaded through the task's spec) and its ``config.json``; a folder of another kind is
    refused by name."""
    from qkv.tasks.base import get_task
    from qkv.tasks.pretrained_sentiment import is_pretrained_config
    from qkv.train import read_config

    config = read_config(folder)
    if is_pretrained_config(config):
        raise ValueError(
            f"{folder}: holds a fine-tuned pretrained encoder; qkv faithfulness measures qkv's "
            "own attention classifiers (qkv train sentiment without --pretrained) for now"
        )
    if config.get("model", {}).get("kind") != "classifier":
        raise ValueError(
            f"{folder}: holds a {config.get('task')!r} model, not a text classifier "
            "(qkv train sentiment writes one)"
        )
    return get_task("sentiment").load(folder, device="cpu"), config


def _run_faithfulness(args: argparse.Namespace) -> int:
    import torch

    from qkv.data.labeled import load_labeled
    from qkv.interpret.faithfulness import faithfulness_report
    from qkv.tasks.text_classification import head_tail

    _positive(args.examples, "--examples")
    _positive(args.max_tokens, "--max-tokens")
    from qkv.tasks.base import get_task

    classifier, config = _load_classifier(args.model)
    model, tokenizer = classifier.model, classifier.tokenizer
    settings = get_task("sentiment").settings_from_config(config, args.model)
    spec = args.data or settings.data
    # The training data's loader options apply to it, not to a file given with --data.
    options = dict(settings.data_options) if args.data is None else {}
    splits = load_labeled(spec, **options)
    held_out = splits.test or splits.validation
    labels = list(config["labels"])
    texts, gold = [], []
    for example in held_out:
        ids = head_tail(tokenizer.encode(example.text), settings.max_length)
        if 2 <= len(ids) <= args.max_tokens and example.label in labels:
            texts.append(torch.tensor(ids, dtype=torch.long))
            gold.append(labels.index(example.label))
        if len(texts) == args.examples:
            break
    if not texts:
        raise ValueError(f"{spec}: no held-out text of 2..{args.max_tokens} tokens")
    torch.manual_seed(args.seed)

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{done}/{total} texts", end="" if done < total else "\n", file=sys.stderr)

    report = faithfulness_report(model, texts, gold, seed=args.seed, progress=progress)
    title = f"{args.model.name} ({config['model']['encoder']}, {spec})"
    table = report.table(title)
    print(table, end="")
    if args.out is not None:
        from qkv.viz import save_figure

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "faithfulness.md").write_text(table, encoding="utf-8")
        (args.out / "faithfulness.json").write_text(
            json.dumps(report.to_dict(), indent=1), encoding="utf-8"
        )
        save_figure(report.figure(title), args.out / "faithfulness.png")
        print(f"wrote {args.out}/faithfulness.md, .json, .png")
    return 0


def _run_alignment(args: argparse.Namespace) -> int:
    from qkv.interpret.alignment import alignment_report, load_translator

    _positive(args.examples, "--examples")
    translator, tokenizer, config = load_translator(args.model)
    trained_on = config.get("translation", {}).get("data") or config.get("data", {}).get("spec")
    spec = args.data or trained_on
    if spec not in ("builtin:dates", "builtin:numbers"):
        raise ValueError(
            f"gold alignments exist for builtin:dates and builtin:numbers; the model was "
            f"trained on {spec!r}: pass --data"
        )
    report = alignment_report(translator, tokenizer, spec, examples=args.examples, seed=args.seed)
    print(report.table(f"{args.model.name} on {spec}"), end="")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "alignment.json").write_text(
            json.dumps(report.to_dict(), indent=1), encoding="utf-8"
        )
        print(f"wrote {args.out / 'alignment.json'}")
    return 0
