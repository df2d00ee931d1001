"""Each of the README's Python examples runs on its own, as written, and prints what it claims."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_keeps_its_example_first() -> None:
    assert re.search(r"## Example\n\n```python\n", README.read_text()), "README lost its example"


def test_readme_has_several_examples() -> None:
    assert len(python_blocks()) >= 4


@pytest.fixture
def without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README prints what a reader who followed its install line sees: a CPU machine
    without triton (the gpu extra). CI installs triton; hide it from the backend here."""
    from qkv.backends.triton import support

    monkeypatch.setattr(support, "triton_installed", lambda: False)


@pytest.mark.parametrize("number", range(1, len(python_blocks()) + 1))
def test_each_readme_example_runs_alone_and_prints_what_it_claims(
    number: int, without_triton: None
) -> None:
    """A fresh namespace per block: a reader copies one block, not the page."""
    code = python_blocks()[number - 1]
    torch.manual_seed(0)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"README python block {number}", "exec"), {"__name__": "__readme__"})
    claimed = [line.removeprefix("# ") for line in code.splitlines() if line.startswith("# ")]
    assert printed.getvalue().splitlines() == claimed, f"README python block {number}"
