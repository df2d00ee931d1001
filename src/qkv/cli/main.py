"""``qkv <command>``: the entry point.

Every command is a module of :mod:`qkv.cli` named in :data:`COMMAND_MODULES`: it defines
``register(commands)`` (its parser, with ``set_defaults(run=...)``) and imports its heavy
dependencies only when its command runs, so ``qkv --help`` stays fast. A new command is a new
module and its name here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from qkv._version import __version__

#: The modules adding the commands, in ``qkv --help`` order.
COMMAND_MODULES: tuple[str, ...] = (
    "qkv.cli.check",
    "qkv.cli.bench",
    "qkv.cli.explain",
    "qkv.cli.train",
    "qkv.cli.translate",
    "qkv.cli.evaluate",
    "qkv.cli.demo",
    "qkv.cli.classify",
    "qkv.cli.summarize",
    "qkv.cli.viz",
    "qkv.cli.interpret",
    "qkv.cli.generate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkv",
        description="qkv: exact, fast attention for PyTorch. softmax(QK^T / sqrt(d_k)) V, with masks, "
        "biases and several backends behind one dispatch.",
    )
    parser.add_argument("--version", action="version", version=f"qkv {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands)
    return parser


def _chosen_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The deepest subcommand parser that ``argv`` names (``qkv train sentiment`` -> its parser)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for i, token in enumerate(argv):
                if token in action.choices:
                    return _chosen_parser(action.choices[token], argv[i + 1 :])
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; an unknown flag is reported by the subcommand it was given to, with its
    usage and the closest flag it has (argparse reports it with the top-level usage)."""
    import difflib

    args, unknown = parser.parse_known_args(argv)
    if not unknown:
        return args
    sub = _chosen_parser(parser, argv)
    flags = [f for action in sub._actions for f in action.option_strings if f.startswith("--")]
    hints = []
    for token in unknown:
        if token.startswith("-"):
            close = difflib.get_close_matches(token.split("=", 1)[0], flags, n=1, cutoff=0.7)
            if close:
                hints.append(f"{token.split('=', 1)[0]}: did you mean {close[0]}?")
    message = f"unrecognized arguments: {' '.join(unknown)}"
    sub.error(f"{message} ({'; '.join(hints)})" if hints else message)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, sys.argv[1:] if argv is None else list(argv))
    if args.command is None:
        parser.print_help()
        return 0
    previous_threads = None
    try:
        if hasattr(args, "threads"):  # the commands that run a model: --threads
            import torch

            from qkv.cli.threads import apply_threads

            previous_threads = torch.get_num_threads()  # main() may run inside a longer process
            _, args.threads_source = apply_threads(args.threads)
        return int(args.run(args))
    except (ValueError, TypeError) as error:  # bad arguments, data, model folders
        print(f"qkv {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (OSError, ImportError) as error:  # unreadable files, missing optional packages
        print(f"qkv {args.command}: error: {error}", file=sys.stderr)
        return 1
    finally:
        if previous_threads is not None:
            import torch

            torch.set_num_threads(previous_threads)


if __name__ == "__main__":
    raise SystemExit(main())
