"""``qkv translate --model DIR "text" ...``: translate sentences, files or stdin."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from qkv.cli.train import add_runtime_args

    p = commands.add_parser(
        "translate",
        help="translate text with a trained model folder",
        description='qkv translate --model dates-model "3 mars 1998"   (or --file FILE, or - for stdin)',
    )
    p.add_argument("--model", type=Path, required=True, help="model folder written by qkv train")
    p.add_argument("text", nargs="*", help="sentences to translate; '-' reads stdin, one per line")
    p.add_argument("--file", type=Path, default=None, help="translate every line of this file")
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy, default)")
    p.add_argument("--length-penalty", type=float, default=0.6, help="beam search's GNMT alpha")
    p.add_argument(
        "--show-attention",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="draw the cross-attention heat map of the first sentence into this file",
    )
    from qkv.cli.outputs import add_overwrite_arg

    add_overwrite_arg(p)
    add_runtime_args(p)
    p.set_defaults(run=_run)


def read_inputs(texts: list[str], file: Path | None) -> list[str]:
    """The sentences to translate: arguments, ``-`` for stdin, and a file's lines, one output
    line each (:func:`qkv.cli.inputs.read_lines`).

    Raises:
        ValueError: an empty sentence (naming it), nothing to translate, or a file that cannot
            be read (naming it).
    """
    from qkv.cli.inputs import read_lines

    return read_lines(texts, file, verb="translate")


def _run(args: argparse.Namespace) -> int:
    from qkv.tasks.base import set_attention_backend
    from qkv.tasks.translation import Translator
    from qkv.train import seed_everything

    if args.beam < 1:
        raise ValueError(f"--beam must be >= 1, got {args.beam}")
    seed_everything(args.seed)
    if args.show_attention is not None:
        from qkv.cli.outputs import check_outputs

        inputs = [] if args.file is None else [args.file]
        check_outputs(
            [("--show-attention", args.show_attention)], inputs=inputs, overwrite=args.overwrite
        )
    texts = read_inputs(args.text, args.file)
    translator = Translator.load(args.model, device=args.device)
    set_attention_backend(translator.model, args.backend)
    for translation in translator.translate(
        texts, beam_size=args.beam, length_penalty=args.length_penalty
    ):
        print(translation)
    if args.show_attention is not None:
        path = draw_attention(translator, texts[0], args.show_attention)
        print(f"attention heat map: {path}", file=sys.stderr)
    return 0


def draw_attention(translator: object, text: str, path: Path) -> Path:
    """Write the cross-attention heat map of ``text``'s translation to ``path``."""
    from qkv.tasks.translation import Translator
    from qkv.viz import attention_heatmap, save_figure

    if not isinstance(translator, Translator):
        raise TypeError(f"translator must be a Translator, got {type(translator).__name__}")
    weights, source_tokens, target_tokens = translator.attention(text)
    figure = attention_heatmap(
        weights, source_tokens, target_tokens, title=f"{text} -> {''.join(target_tokens[:-1])}"
    )
    return save_figure(figure, path)
