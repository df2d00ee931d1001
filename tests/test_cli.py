"""The `qkv` command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qkv import __version__
from qkv.cli.main import main


def test_console_script_version() -> None:
    exe = shutil.which("qkv", path=str(Path(sys.executable).parent))
    assert exe is not None, "the qkv console script is not installed"
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"qkv {__version__}"


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "check" in capsys.readouterr().out


def test_check_json_reports_small_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "check",
                "--json",
                "--q-len",
                "9",
                "--kv-len",
                "13",
                "--head-dim",
                "8",
                "--dtype",
                "float64",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    served = [r for r in rows if r["error"] is not None]
    assert {r["backend"] for r in served} >= {"reference", "sdpa"}
    assert max(r["error"] for r in served) < 1e-12
    assert any(r["reason"] and "softcap" in r["reason"] for r in rows)


def test_explain_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--q-len", "64", "--weights"]) == 0
    assert "backend: reference" in capsys.readouterr().out
    assert main(["explain", "--heads", "3"]) == 2
    assert (
        "query heads Hq (3) must be a multiple of key/value heads Hkv (2)"
        in capsys.readouterr().err
    )
