"""The one rule for the files a command writes: never over an input, never over a user's file.

Every command that writes a page, a picture or a report checks its output paths here *before*
it does any work:

- an output that is one of the command's inputs is refused, ``--overwrite`` or not (the command
  would destroy what it reads; e.g. ``qkv classify seven.png --explain --html seven.html``,
  whose picture would be ``seven.png``);
- an existing file is replaced only when qkv wrote it (its pages and pictures carry a mark, see
  :func:`qkv.viz._checks.written_by_qkv`), so a second run refreshes its own output, or when the
  user passes ``--overwrite``;
- a folder where a file should go is refused.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["add_overwrite_arg", "check_outputs"]


def add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    """``--overwrite``: the one flag that lets a command replace a file qkv did not write."""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing output files that qkv did not write (never an input)",
    )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_outputs(
    outputs: Iterable[tuple[str, Path]],
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> None:
    """Refuse output paths that would destroy an input or a file qkv did not write.

    Args:
        outputs: ``(what, path)`` pairs; ``what`` names the flag or file in the message
            (``"--html"``, ``"attention picture of seven.png"``).
        inputs: the files the command reads (``-`` for stdin and non-paths are ignored).
        overwrite: the user's ``--overwrite``: existing files not written by qkv may be replaced.

    Raises:
        ValueError: naming the output, the path and what to do instead.
    """
    from qkv.viz._checks import written_by_qkv

    read = [Path(p) for p in inputs if str(p) != "-"]
    for what, path in outputs:
        for source in read:
            if _same_file(path, source):
                raise ValueError(
                    f"{what} {path} is an input of this command and would be overwritten; "
                    "choose another output path"
                )
        if path.is_dir():
            raise ValueError(f"{what} {path} is a folder; give a file path")
        if path.exists() and not overwrite and not written_by_qkv(path):
            raise ValueError(
                f"{what} {path} already exists and was not written by qkv; pass --overwrite "
                "to replace it, or choose another path"
            )
