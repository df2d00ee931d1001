"""docs/visualization.md: its quick-start block runs as written and writes what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

DOC = Path(__file__).resolve().parents[1] / "docs" / "visualization.md"


def test_quick_start_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = re.search(r"## Quick start\n.*?```python\n(.*?)```", DOC.read_text(), re.S)
    assert block is not None, "docs/visualization.md lost its quick start"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(block.group(1), "visualization.md quick start", "exec"), namespace)
    for name in ("map.png", "heads.png", "stats.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG"), name
    assert "qkv-data" in (tmp_path / "attention.html").read_text(encoding="utf-8")
    assert "\x1b[48;2;230;85;13m" in str(namespace["line"])  # the heaviest token, fully shaded
