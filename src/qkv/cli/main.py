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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.run(args))
    except (ValueError, TypeError) as error:  # bad arguments, data, model folders
        print(f"qkv {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (OSError, ImportError) as error:  # unreadable files, missing optional packages
        print(f"qkv {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
