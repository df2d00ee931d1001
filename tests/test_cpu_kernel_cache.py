"""The compiled CPU kernel's cache: one build per torch and CPU, shared by every environment,
written atomically and built once when several processes start together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import qkv
from qkv.backends.cpu import build

# A kernel that registers torch.ops.qkv_cpu.forward and nothing else: the cache's behaviour
# does not depend on what the library computes, and it compiles in seconds, not minutes.
TINY_KERNEL = """
#include <ATen/core/Tensor.h>
#include <torch/library.h>

at::Tensor forward(const at::Tensor& x) { return x; }

TORCH_LIBRARY(qkv_cpu, m) { m.def("forward(Tensor x) -> Tensor", &forward); }
"""

# Run in a fresh process: load (or build) the kernel from argv[1], print the outcome as JSON.
LOAD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from qkv.backends.cpu import build
    build.SOURCE = Path(sys.argv[1])
    status = build.kernel_status()
    print(json.dumps({"ok": status.ok, "reason": status.reason, "built": status.built,
                      "prefix": sys.prefix}))
    """
)


def test_the_build_name_leaves_out_where_the_environment_lives(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    name = build.extension_name()
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "another-venv"))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "another-venv" / "bin" / "python"))
    monkeypatch.setattr(cpp_extension, "include_paths", lambda *a, **k: [str(tmp_path)])
    assert build.extension_name() == name
    monkeypatch.setattr(torch, "__version__", "0.0.1+other")  # another torch: another build
    assert build.extension_name() != name
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build.library_path("qkv_cpu_x") == tmp_path / "qkv_cpu" / "qkv_cpu_x.so"


def test_a_failed_build_names_its_folder_and_keeps_its_log(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "SOURCE", broken)
    if build._missing_tool() is not None:
        pytest.skip(f"cannot build here: {build._missing_tool()}")
    status = build._build()
    assert not status.ok and status.reason is not None
    assert status.reason.startswith("the CPU kernel failed to build (")
    folder = Path(status.reason.rsplit("; see ", 1)[1])
    assert folder.parent == tmp_path / "cache" / "qkv_cpu" and folder.name.startswith(".qkv_cpu_")
    assert folder.is_dir() and not build.library_path().exists()


def _environment(python_env: Path) -> dict[str, str]:
    """The environment variables of a child that imports this qkv and torch."""
    src = Path(qkv.__file__).resolve().parents[1]
    site = Path(torch.__file__).resolve().parents[1]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), str(site)]),
        "TORCH_EXTENSIONS_DIR": str(python_env),
        "OMP_NUM_THREADS": "1",
    }


@pytest.mark.slow
def test_processes_started_together_build_once_and_other_environments_reuse_it(
    tmp_path: Path,
) -> None:
    if build._missing_tool() is not None:
        pytest.skip(f"cannot build here: {build._missing_tool()}")
    source = tmp_path / "kernel.cpp"
    source.write_text(TINY_KERNEL)
    cache = tmp_path / "extensions"
    env = _environment(cache)
    # Three processes load the kernel from an empty cache at once: one builds, the others wait
    # on the lock and load its library; none crashes or sees a half-written file.
    children = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD, str(source)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outcomes = []
    for child in children:
        out, err = child.communicate(timeout=600)
        assert child.returncode == 0, err
        outcomes.append(json.loads(out))
    assert all(o["ok"] for o in outcomes), outcomes
    assert sorted(o["built"] for o in outcomes) == [False, False, True]
    folder = cache / "qkv_cpu"
    libraries = list(folder.glob("*.so"))
    assert len(libraries) == 1, libraries
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no build left
    before = libraries[0].stat()

    # Another environment (its own sys.prefix, the same torch) loads that build, no rebuild.
    other = tmp_path / "other-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(other)], check=True)
    python = other / "bin" / "python"
    result = subprocess.run(
        [str(python), "-c", LOAD, str(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    outcome = json.loads(result.stdout)
    assert outcome["prefix"] == str(other) and outcome["prefix"] != outcomes[0]["prefix"]
    assert outcome["ok"] and not outcome["built"], outcome
    after = libraries[0].stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
