"""The README's Python examples run as written, in order, and print what they claim."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_keeps_its_example_first() -> None:
    assert re.search(r"## Example\n\n```python\n", README.read_text()), "README lost its example"


def test_readme_examples_run_and_their_printed_lines_match() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 3
    namespace: dict[str, object] = {}
    torch.manual_seed(0)
    for number, code in enumerate(blocks, start=1):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, f"README python block {number}", "exec"), namespace)
        claimed = [line.removeprefix("# ") for line in code.splitlines() if line.startswith("# ")]
        assert printed.getvalue().splitlines() == claimed, f"README python block {number}"
