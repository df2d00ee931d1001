"""`qkv bench` runs end to end and writes its files (a smoke run, not a measurement); what it
times by default; PyTorch's kernels as peers compute the same attention."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

import qkv
from qkv.bench import (
    PEERS,
    BenchCase,
    BenchResult,
    choose_backends,
    expand_sweep,
    fill_matmul_share,
    matmul_tflops,
    memory_gbps,
)
from qkv.bench.measure import attended_pairs, measure, prebuilt_kwargs
from qkv.bench.peers import peer_call
from qkv.bench.report import format_table
from qkv.cli.main import main


def test_attended_pairs_counts_only_unmasked_work() -> None:
    n = 100
    assert attended_pairs(BenchCase("sdpa", "none", n, batch=2, heads=3)) == 2 * 3 * n * n
    assert (
        attended_pairs(BenchCase("sdpa", "causal", n, batch=2, heads=3)) == 2 * 3 * n * (n + 1) // 2
    )
    window = BenchCase("sdpa", "sliding_window", n, heads=1, window=10)
    assert attended_pairs(window) == sum(min(i + 1, 10) for i in range(n))
    docs = BenchCase("sdpa", "documents", n, heads=1, documents=4)
    assert attended_pairs(docs) == 4 * 25 * 25


def test_bench_smoke_writes_table_json_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "bench",
        "--n",
        "32",
        "--masks",
        "none,causal",
        "--backends",
        "sdpa,reference",
        "--modes",
        "fwd",
        "--heads",
        "2",
        "--head-dim",
        "8",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "x sdpa" in captured.out and "4/4" in captured.err
    assert "float32 matmul, same run:" in captured.out and "% mm" in captured.out
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert len(rows) == 4 and all(r["error"] is None and r["seconds"] > 0 for r in rows)
    assert {r["ratio_to_sdpa"] for r in rows if r["backend"] == "sdpa"} == {1.0}
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_bench_prebuilds_dense_masks_for_sdpa_and_block_masks_for_chunked(tmp_path: Path) -> None:
    argv = [
        "bench",
        "--n",
        "40",
        "--masks",
        "sliding_window,relative_bias",
        "--backends",
        "sdpa,chunked",
        "--modes",
        "fwd+bwd",
        "--heads",
        "2",
        "--head-dim",
        "8",
        "--window",
        "8",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    labels = [(r["mask_kind"], r["backend"], r["prebuilt"]) for r in rows]
    assert labels == [
        ("sliding_window", "sdpa", True),
        ("sliding_window", "chunked", False),
        ("sliding_window", "chunked", True),
        ("relative_bias", "sdpa", True),
        ("relative_bias", "chunked", False),
    ]
    assert all(r["error"] is None and r["ratio_to_sdpa"] > 0 for r in rows)
    # SDPA was handed the dense bool mask (40 x 40 bytes) and the dense float bias (2 x 40 x 40).
    assert [r["given_bytes"] for r in rows if r["backend"] == "sdpa"] == [1600, 2 * 1600 * 4]


# --- what is timed: registered backends that serve, and PyTorch's kernels as peers on CUDA ------


def triton_reason_on_cpu() -> str:
    """The triton backend's own reason for a float16 CPU call: that it runs on CUDA only, or,
    where triton is not installed, that it is not."""
    q = torch.randn(1, 2, 8, 16, dtype=torch.float16)
    reason = qkv.explain(q, q, q).reasons["triton"]
    assert reason is not None and ("CUDA" in reason or "triton is not installed" in reason)
    return reason


def test_default_backends_leave_out_those_that_refuse_with_their_reason() -> None:
    chosen, left_out = choose_backends("cpu", "float16", peers=True)
    assert chosen[:3] == ["sdpa", "reference", "chunked"] and chosen[-1] == "flex"
    assert left_out["triton"] == triton_reason_on_cpu()
    assert "CUDA only" in left_out["--peers"] and "FlexAttention" in left_out["--peers"]
    chosen, left_out = choose_backends("cpu", "float32")
    assert "triton" not in chosen and "--peers" not in left_out


def test_bench_cli_notes_what_it_does_not_time(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import qkv.bench

    timed: list[str] = []

    def fake_sweep(cases: list[BenchCase], **_: object) -> list[object]:
        timed.extend(c.backend for c in cases)
        return []

    monkeypatch.setattr(qkv.bench, "run_sweep", fake_sweep)
    argv = ["bench", "--n", "32", "--masks", "none", "--modes", "fwd", "--dtype", "bfloat16"]
    assert main([*argv, "--peers"]) == 0
    out = capsys.readouterr().out
    served = [b for b in timed if b != "flex"]  # the registered backends that serve bfloat16
    assert served[:3] == ["sdpa", "reference", "chunked"] and timed[-1] == "flex"
    assert f"not timed: triton: {triton_reason_on_cpu()}" in out
    assert "not timed: --peers: PyTorch's forced SDPA kernels" in out
    del timed[:]
    assert main([*argv, "--backends", "sdpa,flex", "--peers"]) == 0  # peers can be named anywhere
    assert timed == ["sdpa", "flex"]
    del timed[:]
    assert main([*argv, "--modes", "fwd+bwd", "--backends", "sdpa", "--peers"]) == 0
    assert timed == ["sdpa"]  # no FlexAttention backward on the CPU
    del timed[:]
    out = capsys.readouterr().out
    assert "--peers" in out and "triton" not in out
    monkeypatch.setattr(
        qkv.bench, "choose_backends", lambda *a, **k: (["sdpa", "triton", *PEERS], {})
    )  # what CUDA would offer
    assert main([*argv, "--backends", "triton,flex", "--peers"]) == 0
    assert timed == ["triton", "flex", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient"]
    assert main([*argv, "--backends", "sdpa,nope"]) == 2


def test_sweep_hands_dense_masks_to_sdpa_peers_but_flash() -> None:
    cases = expand_sweep(
        backends=list(PEERS), mask_kinds=["sliding_window"], seq_lens=[64], modes=["fwd"]
    )
    assert [(c.backend, c.prebuilt) for c in cases] == [
        ("sdpa-flash", False),
        ("sdpa-cudnn", True),
        ("sdpa-efficient", True),
        ("flex", False),
    ]
    assert cases[1].backend_label == "sdpa-cudnn+dense"
    # triton, like chunked, also runs with a block mask built once outside the timed calls.
    cases = expand_sweep(
        backends=["triton"], mask_kinds=["documents", "alibi"], seq_lens=[64], modes=["fwd"]
    )
    assert [c.backend_label for c in cases] == ["triton", "triton+bm", "triton"]


def _peer_output(name: str, case: BenchCase) -> tuple[Tensor, Tensor]:
    """The peer's output and qkv's float64 reference on the case's inputs."""
    g = torch.Generator().manual_seed(case.seq_len)
    q = torch.randn(case.batch, case.heads, case.seq_len, case.head_dim, generator=g)
    k, v = (
        torch.randn(case.batch, case.kv_heads, case.seq_len, case.head_dim, generator=g)
        for _ in range(2)
    )
    want = qkv.attention(
        q.double(), k.double(), v.double(), backend="reference", **case.attention_kwargs()
    )
    return peer_call(name, q, k, v, **prebuilt_kwargs(case, q, k, v))(), want


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize(
    "kind", ["none", "causal", "sliding_window", "documents", "alibi", "relative_bias"]
)
def test_peers_compute_the_cases_attention(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # On the CPU: flex uncompiled (same arguments as the compiled one), SDPA's math kernel in
    # place of cuDNN (same dense mask or bias); flash only where it serves, without a mask.
    from torch.nn.attention.flex_attention import flex_attention

    from qkv.bench import peers

    monkeypatch.setattr(peers, "compiled_flex", lambda: flex_attention)
    monkeypatch.setitem(peers.SDPA_KERNELS, "sdpa-cudnn", "MATH")
    names = ["flex", "sdpa-cudnn"] + (["sdpa-flash"] if kind in ("none", "causal") else [])
    for name in names:
        case = BenchCase(name, kind, 48, heads=4, kv_heads=2, head_dim=16, window=9, documents=3)
        case = dataclasses.replace(
            case, prebuilt=name == "sdpa-cudnn" and kind not in ("none", "causal")
        )
        got, want = _peer_output(name, case)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=name)
    with pytest.raises(ValueError, match="sdpa-flash takes no mask"):
        _peer_output(
            "sdpa-flash", BenchCase("sdpa-flash", "sliding_window", 16, heads=2, kv_heads=2)
        )


def test_peer_case_is_measured_in_process() -> None:
    figures = measure(
        BenchCase("sdpa-flash", "causal", 32, heads=2, kv_heads=2, head_dim=8, repeats=1)
    )
    assert figures["seconds"] > 0 and figures["estimated_bytes"] is None


def test_memory_read_rate_is_positive_and_checks_its_size() -> None:
    assert memory_gbps("cpu", mib=1) > 0
    with pytest.raises(ValueError, match="mib must be >= 1; got 0"):
        memory_gbps("cpu", mib=0)


def test_rates_as_a_share_of_the_matmul_rate_measured_in_the_run() -> None:
    assert matmul_tflops("cpu", dtype=torch.float32, n=64) > 0
    fast = BenchResult(BenchCase("triton", "none", 4096), seconds=1e-3, gflops=400_000.0)
    failed = BenchResult(BenchCase("sdpa-flash", "documents", 4096), error="takes no mask")
    fill_matmul_share([fast, failed], 800.0)
    assert fast.matmul_share == pytest.approx(0.5) and failed.matmul_share is None
    table = format_table([fast, failed], 800.0)
    assert "bf16 matmul, same run: 800 TFLOP/s" in table and "TFLOP/s" in table.splitlines()[1]
    assert table.splitlines()[3].split()[4:6] == ["1.0", "400.0"]
    assert table.splitlines()[3].endswith("50%")
    assert "GFLOP/s" in format_table([fast]) and "% mm" not in format_table([fast])
    # the CPU: the run's dtype, in GFLOP/s
    cpu = format_table([fast], 0.1, matmul_dtype="float32", tera=False)
    assert "float32 matmul, same run: 100 GFLOP/s" in cpu and "% mm" in cpu
    assert cpu.splitlines()[3].endswith("50%")  # the share filled in above


def test_flex_compile_time_is_reported_on_its_own_line() -> None:
    timed = BenchResult(BenchCase("flex", "causal", 4096), seconds=0.2, gflops=1.0)
    timed.first_seconds = 31.0
    table = format_table([timed])
    assert "flex compile + first call, causal N=4096 fwd: 31.0 s" in table
    assert "compile" not in format_table(
        [BenchResult(BenchCase("sdpa", "causal", 64), 1.0, gflops=1.0)]
    )


def test_decode_bench_reports_kv_bytes_per_second_against_the_memory_rate(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from qkv.bench.decode import DecodeCase, format_decode_table, time_decode

    case = DecodeCase(2, 3, 40, 4, 2, 16, torch.float32)
    assert case.kv_bytes == 2 * 2 * 2 * 40 * 16 * 4
    results = time_decode(case, ["cpu", "sdpa", "triton"], rounds=2)
    assert [r.backend for r in results] == ["cpu", "sdpa", "triton"]
    for r in results[:2]:
        assert r.seconds is not None and r.seconds > 0 and r.error is None
        assert r.kv_gbps == pytest.approx(case.kv_bytes / r.seconds / 1e9)
        assert r.memory_gbps > 0
    assert results[2].seconds is None and "CUDA" in (results[2].error or "")
    table = format_decode_table(results).splitlines()
    assert "% bw" in table[0] and "x sdpa" in table[0]
    cpu, sdpa, triton = table[2:]
    assert cpu.split()[5] == "cpu" and sdpa.endswith("1.00") and "failed:" in triton
    share = results[0].kv_gbps / results[0].memory_gbps  # type: ignore[operator]
    assert cpu.split()[-2] == f"{share:.0%}"
    # the command prints the same table; bad shapes are refused naming the argument
    argv = ["bench", "decode", "--contexts", "40", "--queries", "1", "--rounds", "1"]
    shape = ["--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32"]
    assert main([*argv, *shape]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [line.split()[5] for line in rows[-2:]] == ["cpu", "sdpa"]
    with pytest.raises(ValueError, match=r"q_heads \(6\) must be a multiple of kv_heads \(4\)"):
        DecodeCase(1, 1, 8, 6, 4, 16, torch.float32)
    with pytest.raises(ValueError, match=r"queries \(9\) must be at most context \(8\)"):
        DecodeCase(1, 9, 8, 4, 4, 16, torch.float32)
