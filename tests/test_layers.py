"""Imports flow down the floors of docs/architecture.md, including the imports made inside
functions: read the floors from the document and every import from the code (with ast)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "qkv"
#: The floor the package root ``qkv`` counts as (``qkv/__init__.py`` imports up to it).
ROOT_FLOOR = "nn"


def floors() -> list[str]:
    """The floors of docs/architecture.md, top first (``qkv.NAME`` lines of its first block)."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("```")[1]
    names = re.findall(r"^qkv\.(\w+)\s", block, flags=re.MULTILINE)
    assert len(names) >= 10, f"no floors found in docs/architecture.md: {names}"
    return names


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                inside.update(id(n) for n in ast.walk(sub))
    return inside


def imports_of(path: Path, source: str | None = None) -> list[tuple[str, int]]:
    """``(module, line)`` of every ``qkv`` import in ``path`` (or in ``source``, read as if it
    were ``path``): function-level ones included, those under ``if TYPE_CHECKING:`` left out,
    relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8") if source is None else source)
    skip = _type_checking_nodes(tree)
    package = list(path.relative_to(PACKAGE.parent).parts[:-1])  # qkv/x/y.py -> [qkv, x]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[: len(package) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            if base == "qkv":  # `from qkv import masks` imports the submodule qkv.masks
                for alias in node.names:
                    sub = PACKAGE / alias.name
                    is_module = sub.is_dir() or sub.with_suffix(".py").is_file()
                    found.append((f"qkv.{alias.name}" if is_module else "qkv", node.lineno))
            else:
                found.append((base, node.lineno))
    return [(name, line) for name, line in found if name == "qkv" or name.startswith("qkv.")]


def floor_of(module: str) -> str | None:
    """The floor of a dotted ``qkv`` module name (``None``: the root package or _version)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in ("_version", "__init__"):
        return None
    return parts[1]


def test_the_document_names_every_room_of_the_package() -> None:
    rooms = {p.stem for p in PACKAGE.iterdir() if p.suffix == ".py" or p.is_dir()}
    rooms -= {"__init__", "_version", "__pycache__"}
    assert sorted(rooms - set(floors())) == []


def test_no_module_imports_a_higher_floor() -> None:
    order = floors()
    height = {name: len(order) - i for i, name in enumerate(order)}
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        mine = floor_of(module)
        if mine is None:
            continue
        for target, line in imports_of(path):
            theirs = floor_of(target) or (ROOT_FLOOR if target == "qkv" else None)
            if theirs is not None and height[theirs] > height[mine]:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {target}")
    assert upward == []


def test_the_root_package_is_no_higher_than_its_floor() -> None:
    order = floors()
    height = {name: len(order) - i for i, name in enumerate(order)}
    for target, line in imports_of(PACKAGE / "__init__.py"):
        theirs = floor_of(target)
        assert theirs is None or height[theirs] <= height[ROOT_FLOOR], (target, line)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from qkv.tasks import train_task\n", [("qkv.tasks", 1)]),
        ("def f():\n    from qkv.cli.image import x\n", [("qkv.cli.image", 2)]),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import qkv.cli\n", []),
        ("from qkv import masks\n", [("qkv.masks", 1)]),
        ("from . import registry\n", [("qkv.approx", 1)]),
    ],
)
def test_the_import_reader_sees_function_level_imports(
    source: str, expected: list[tuple[str, int]]
) -> None:
    assert imports_of(PACKAGE / "approx" / "probe.py", source) == expected
