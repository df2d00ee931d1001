"""The README's Python example runs as written and prints what it claims."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_its_printed_lines_match() -> None:
    block = re.search(r"## Example\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None, "README lost its example"
    code = block.group(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README example", "exec"), {})
    claimed = [line.removeprefix("# ") for line in code.splitlines() if line.startswith("# ")]
    assert printed.getvalue().splitlines() == claimed
