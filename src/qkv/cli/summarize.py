"""``qkv summarize`` and ``qkv train summarization``; the summarization scorer of
``qkv evaluate``.

::

    qkv train summarization --data builtin:docstrings --out doc-model --minutes 20
    qkv summarize --model doc-model notes.txt          # or - for stdin
    qkv evaluate --model doc-model                     # ROUGE-1/2/L, model and lead baseline
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["evaluate_folder", "register", "register_train"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``qkv summarize``."""
    p = commands.add_parser(
        "summarize",
        help="summarize a document with a trained pointer-generator",
        description="qkv summarize --model doc-model FILE   ('-' reads stdin; --lines: one document per line)",
    )
    p.add_argument(
        "--model", type=Path, required=True, help="model folder from qkv train summarization"
    )
    p.add_argument("input", help="a text file holding one document, or '-' for stdin")
    p.add_argument("--lines", action="store_true", help="one document per line instead")
    p.add_argument(
        "--json", action="store_true", help="print JSON lines (summary and copied words)"
    )
    p.add_argument(
        "--explain",
        type=Path,
        default=None,
        metavar="FILE.html",
        help="write a page shading each document's words by the attention the summary paid them",
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=_run_summarize)


def read_documents(source: str, *, lines: bool) -> list[str]:
    """The documents in a file (or stdin for ``-``): the whole text, or one per line.

    Raises:
        ValueError: the file cannot be read, or holds no text (naming it).
    """
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{source}: cannot be read ({error})") from None
    documents = [line for line in text.splitlines() if line.strip()] if lines else [text]
    if not any(d.strip() for d in documents):
        raise ValueError(f"{'stdin' if source == '-' else source}: empty, nothing to summarize")
    return documents


def _run_summarize(args: argparse.Namespace) -> int:
    from qkv.tasks.summarization import Summarizer

    summarizer = Summarizer.load(args.model)
    summarizer.model.to(args.device)
    documents = read_documents(args.input, lines=args.lines)
    summaries = summarizer.summarize(documents)
    for summary in summaries:
        if args.json:
            source = set(summary.source_words)
            copied = [w for w in summary.words if w in source]
            print(json.dumps({"summary": summary.text, "copied": copied}))
        else:
            print(summary.text)
    if args.explain is not None:
        args.explain.write_text(explanation_page(summaries), encoding="utf-8")
        print(f"explanation page: {args.explain}", file=sys.stderr)
    return 0


def explanation_page(summaries: list[Any]) -> str:
    """HTML: each summary above its document, the document's words shaded by the attention
    summed over the summary's steps (where the decoder looked, and copied from)."""
    from qkv.viz import html_document, shade_tokens_html

    fragments = []
    for summary in summaries:
        weights = summary.attention.sum(dim=0)  # (Ns,)
        if not summary.source_words or weights.numel() == 0:
            continue
        fragments.append(
            shade_tokens_html(summary.source_words, weights, label=summary.text, document=False)
        )
    return html_document(fragments, title="qkv summarize --explain")


# --------------------------------------------------------------------------------------------
# qkv train summarization


def register_train(tasks: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``qkv train summarization``."""
    from qkv.cli.train import add_training_args

    p = tasks.add_parser(
        "summarization",
        help="abstractive summarization with a pointer-generator (See et al. 2017)",
        description="qkv train summarization --data builtin:docstrings --out doc-model --minutes 20",
    )
    g = p.add_argument_group("data and model")
    g.add_argument(
        "--data",
        required=True,
        help="builtin:docstrings, builtin:aclsum-title, a JSONL/TSV file or a folder",
    )
    g.add_argument("--document-field", default="document", help="JSONL document field")
    g.add_argument("--summary-field", default="summary", help="JSONL summary field")
    g.add_argument("--preset", choices=["tiny", "cpu", "small", "see2017"], default="small")
    g.add_argument("--coverage", action="store_true", help="add the coverage mechanism and loss")
    g.add_argument("--coverage-weight", type=float, default=1.0)
    g.add_argument(
        "--vocab-size", type=int, default=10_000, help="word vocabulary (default %(default)s)"
    )
    g.add_argument("--max-source-length", type=int, default=200, help="words per document")
    g.add_argument("--max-target-length", type=int, default=40, help="words per summary")
    g.add_argument(
        "--valid-size", type=int, default=300, help="validation documents decoded per validation"
    )
    g.add_argument("--quiet", action="store_true", help="no progress output")
    add_training_args(p, steps=3000)
    p.set_defaults(run=_run_train, batch_size=32)


def _run_train(args: argparse.Namespace) -> int:
    import logging

    from qkv.cli.train import TrainProgress, training_config
    from qkv.tasks.summarization import SummarizationSetup, train_summarization

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    data_options = {}
    if not args.data.startswith("builtin:"):
        data_options = {"document_field": args.document_field, "summary_field": args.summary_field}
    setup = SummarizationSetup(
        preset=args.preset,
        vocab_size=args.vocab_size,
        max_source_length=args.max_source_length,
        max_target_length=args.max_target_length,
        batch_size=args.batch_size,
        coverage_weight=args.coverage_weight,
        validation_limit=args.valid_size,
        model_overrides={"coverage": True} if args.coverage else {},
        data_options=data_options,
    )
    progress = TrainProgress(quiet=args.quiet)
    result = train_summarization(
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
        else f", best ROUGE-L {state.best_metric:.2f} at step {state.best_step}"
    )
    kept = f" (the weights of step {state.best_step})" if args.keep_best else ""
    print(
        f"trained {state.step} steps in {state.elapsed_s:.0f}s ({result.stopped}{best}); "
        f"model folder: {args.out}{kept}"
    )
    return 0


# --------------------------------------------------------------------------------------------
# qkv evaluate (summarization)


def evaluate_folder(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """ROUGE-1/2/L of a summarization folder and of the lead baseline on ``--data``'s
    ``--split`` (default: the data it was trained on). The baseline is the first sentence,
    or the first three for ``aclsum`` / ``aclsum-summary`` (lead-3)."""
    from qkv.data.labeled import load_documents
    from qkv.tasks.summarization import Summarizer, evaluate_summarizer
    from qkv.train import read_config

    summarizer = Summarizer.load(folder)
    saved = read_config(folder)["data"]
    spec = args.data or saved["spec"]
    # Column names and split options of a file; a builtin takes no reader options.
    options = {} if spec.startswith("builtin:") else dict(saved.get("options") or {})
    pairs = load_documents(spec, **options)[args.split][: args.limit]
    if not pairs:
        raise ValueError(f"--split {args.split}: no pairs in {spec!r}")
    lead = 3 if spec in ("builtin:aclsum", "builtin:aclsum-summary") else 1
    scores = evaluate_summarizer(summarizer, pairs, lead_sentences=lead)
    return {
        "folder": str(folder),
        "task": "summarization",
        "split": args.split,
        "data": spec,
        **scores,
    }
