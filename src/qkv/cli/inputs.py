"""The one rule for the texts a command reads, for every verb (translate, classify, summarize).

Each input is one text argument, one line of stdin (``-``) or one line of ``--file``, in that
order, and each input gets exactly one output line, so outputs always line up with inputs. An
empty (or whitespace-only) input is therefore an error naming where it is, never dropped.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["check_not_empty", "read_lines"]


def check_not_empty(text: str, where: str, verb: str) -> str:
    """``text``, or a ValueError naming ``where`` (``"text argument 2"``, ``"stdin line 3"``)."""
    if not text.strip():
        raise ValueError(
            f"{where} is empty: there is nothing to {verb} (every input gets one output "
            "line; remove the empty one)"
        )
    return text


def read_lines(texts: Sequence[str], file: Path | None, *, verb: str) -> list[str]:
    """The inputs: each argument (``-`` reads stdin, one input per line), then ``file``'s lines.

    Args:
        texts: the positional text arguments.
        file: ``--file``, or None.
        verb: what the command does to them, for messages (``"translate"``).

    Raises:
        ValueError: an empty input (naming the argument or line), a file that cannot be read,
            or no input at all.
    """
    lines: list[str] = []
    for i, text in enumerate(texts, start=1):
        if text == "-":
            for j, line in enumerate(sys.stdin.read().splitlines(), start=1):
                lines.append(check_not_empty(line, f"stdin line {j}", verb))
        else:
            lines.append(check_not_empty(text, f"text argument {i}", verb))
    if file is not None:
        try:
            content = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"--file {file}: cannot be read ({error})") from None
        for j, line in enumerate(content.splitlines(), start=1):
            lines.append(check_not_empty(line, f"--file {file} line {j}", verb))
    if not lines:
        raise ValueError(f"nothing to {verb}: give texts, '-' for stdin, or --file FILE")
    return lines
