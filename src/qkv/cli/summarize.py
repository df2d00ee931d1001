"""``qkv summarize``: summarize documents with a model folder from ``qkv train summarization``.

::

    qkv train summarization --data builtin:docstrings --out doc-model --minutes 20
    qkv summarize --model doc-model notes.txt          # or - for stdin
    qkv summarize --model doc-model notes.txt --explain --html page.html
    qkv evaluate --model doc-model                     # ROUGE-1/2/L, model and lead baseline
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["explanation_page", "read_documents", "register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``qkv summarize``."""
    from qkv.cli.classify import add_explain_args
    from qkv.cli.train import add_runtime_args

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
    add_explain_args(p, what="each document's words by the attention the summary paid them")
    add_runtime_args(p)
    p.set_defaults(run=_run_summarize)


def read_documents(source: str, *, lines: bool) -> list[str]:
    """The documents in a file (or stdin for ``-``): the whole text, or one per line.

    Raises:
        ValueError: the file cannot be read, holds no text, or (``lines``) has an empty line
            (naming it): each line gets one summary line.
    """
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{source}: cannot be read ({error})") from None
    name = "stdin" if source == "-" else source
    if not text.strip():
        raise ValueError(f"{name}: empty, nothing to summarize")
    if not lines:
        return [text]
    # one summary per line, so that outputs line up with inputs: an empty line is an error
    from qkv.cli.inputs import check_not_empty

    return [
        check_not_empty(line, f"{name} line {j}", "summarize")
        for j, line in enumerate(text.splitlines(), start=1)
    ]


def _run_summarize(args: argparse.Namespace) -> int:
    from qkv.tasks.base import set_attention_backend
    from qkv.tasks.summarization import Summarizer
    from qkv.train import seed_everything

    seed_everything(args.seed)
    if args.explain:
        from qkv.cli.outputs import check_outputs

        check_outputs([("--html", args.html)], inputs=[args.input], overwrite=args.overwrite)
    summarizer = Summarizer.load(args.model, device=args.device)
    set_attention_backend(summarizer.model, args.backend)
    documents = read_documents(args.input, lines=args.lines)
    summaries = summarizer.summarize(documents)
    for summary in summaries:
        if args.json:
            source = set(summary.source_words)
            copied = [w for w in summary.words if w in source]
            print(json.dumps({"summary": summary.text, "copied": copied}))
        else:
            print(summary.text)
    if args.explain:
        args.html.write_text(explanation_page(summaries), encoding="utf-8")
        print(f"explanation page: {args.html}", file=sys.stderr)
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
