"""qkv is ready to publish: a wheel and an sdist build and pass ``twine check``, the wheel
carries the CPU kernel's source, installs into a fresh environment and ``qkv check`` runs from
it; ``python -m qkv`` is ``qkv``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH, so a child imports the qkv it installed."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}


def test_python_dash_m_qkv_is_qkv() -> None:
    src = str(ROOT / "src")
    env = _clean_env() | {"PYTHONPATH": src}
    result = subprocess.run(
        [sys.executable, "-m", "qkv", "--help"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: qkv ") and "COMMAND" in result.stdout
    version = subprocess.run(
        [sys.executable, "-m", "qkv", "--version"], capture_output=True, text=True, env=env
    )
    assert version.returncode == 0 and version.stdout.startswith("qkv ")


@pytest.mark.slow
def test_wheel_and_sdist_build_check_and_install_into_a_fresh_venv(tmp_path: Path) -> None:
    pytest.importorskip("build")
    pytest.importorskip("twine")
    # Build from a copy, so the checkout gets no build/ or egg-info folders.
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "BENCHMARKS.md"):
        tree.mkdir(exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    for folder in ("src", "docs", "tests"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=ignore)
    dist = tmp_path / "dist"
    # --no-isolation: the build backend (setuptools) of this environment, nothing downloaded.
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(tree)],
        check=True,
        capture_output=True,
        env=_clean_env(),
    )
    wheel = next(dist.glob("qkv-*.whl"))
    sdist = next(dist.glob("qkv-*.tar.gz"))
    check = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(f"{wheel.name.split('-py3')[0]}.dist-info/METADATA")
    assert "qkv/backends/cpu/kernel.cpp" in names and "qkv/py.typed" in names
    assert "qkv/__main__.py" in names
    for line in (b"License-Expression: MIT", b"Requires-Dist: torch>=2.5", b"Classifier: "):
        assert line in metadata, line
    with tarfile.open(sdist) as archive:
        members = archive.getnames()
    top = sdist.name.removesuffix(".tar.gz")
    for member in ("src/qkv/backends/cpu/kernel.cpp", "LICENSE", "tests/test_packaging.py"):
        assert f"{top}/{member}" in members, member

    # A fresh venv with the wheel installed; torch is this environment's, seen through a .pth
    # file (the wheel's own files come first on sys.path), so nothing is downloaded.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        env=_clean_env(),
    ).stdout.strip()
    torch_site = Path(torch.__file__).resolve().parents[1]
    (Path(site) / "qkv-test-torch.pth").write_text(f"{torch_site}\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         "--no-index", str(wheel)],
        check=True,
        env=_clean_env(),
    )  # fmt: skip
    where = subprocess.run(
        [str(python), "-c", "import qkv; print(qkv.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        env=_clean_env(),
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    result = subprocess.run(
        [str(venv / "bin" / "qkv"), "check"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed: all" in result.stdout
    module = subprocess.run(
        [str(python), "-m", "qkv", "--version"], capture_output=True, text=True, env=_clean_env()
    )
    assert module.returncode == 0 and module.stdout.startswith("qkv ")
