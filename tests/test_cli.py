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
    assert all(r["passed"] and r["error"] <= r["limit"] for r in served)
    assert any(r["reason"] and "softcap" in r["reason"] for r in rows)


class _OffByAFraction:
    """A backend that is wrong by 0.1 %: small, but far outside the float32 tolerance."""

    name = "off-by-a-fraction"

    def supports(self, request: object) -> str | None:
        return None

    def forward(self, request: object) -> tuple[object, None]:
        from qkv.backends import get_backend

        out, _ = get_backend("reference").forward(request)  # type: ignore[arg-type]
        return out * 1.001, None


def test_check_gives_a_verdict_and_fails_a_wrong_backend(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from qkv.backends import register_backend, unregister_backend

    small = ["check", "--q-len", "9", "--kv-len", "13", "--head-dim", "8"]
    assert main(small) == 0
    assert "passed: all" in capsys.readouterr().out
    register_backend(_OffByAFraction())  # type: ignore[arg-type]
    try:
        assert main(small) == 1
        out = capsys.readouterr().out
        assert "FAIL" in out and "FAILED: 6 of" in out and "off-by-a-fraction (ALiBi)" in out
        assert main([*small, "--json"]) == 1
        rows = json.loads(capsys.readouterr().out)
        wrong = [r for r in rows if r["backend"] == "off-by-a-fraction"]
        assert len(wrong) == 6 and not any(r["passed"] for r in wrong)
    finally:
        unregister_backend("off-by-a-fraction")


def test_check_help_shows_the_real_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    for command, expected in [("check", "Nk (default 128)"), ("explain", "Nk (default: Nq)")]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert expected in text and "(default float32)" in text
    for command in ("check", "bench", "explain"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        _usage, _, rest = capsys.readouterr().out.partition("\n\n")
        assert rest.split("\n")[0] != "options:", f"qkv {command} --help has no description"


def test_explain_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--q-len", "64", "--weights"]) == 0
    assert "backend: reference" in capsys.readouterr().out
    assert main(["explain", "--heads", "3"]) == 2
    assert (
        "query heads Hq (3) must be a multiple of key/value heads Hkv (2)"
        in capsys.readouterr().err
    )
