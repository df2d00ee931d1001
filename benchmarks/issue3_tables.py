"""The issue-3 benchmark tables (CPU, fp32, B=1, H=8, D=64), each case in its own subprocess.

    python benchmarks/issue3_tables.py plain      # none and causal at N=4096: auto, sdpa, chunked
    python benchmarks/issue3_tables.py masked     # window 256 and 16 documents at N=16384
    python benchmarks/issue3_tables.py linear     # chunked fwd+bwd peak memory, N = 4096..65536
    python benchmarks/issue3_tables.py scores     # ALiBi and a learnable relative bias, N=4096

``qkv bench`` runs the same measurements (:mod:`qkv.bench`); this script adds ``auto`` as a
backend and fixes the sweeps the issue's targets name. Repeats are kept low because the machine
is shared.
"""

from __future__ import annotations

import argparse

from qkv.bench.cases import BenchCase
from qkv.bench.report import format_table
from qkv.bench.run import run_sweep


def plain(repeats: int) -> list[BenchCase]:
    return [
        BenchCase(backend=b, mask_kind=m, seq_len=4096, mode=mode, repeats=repeats)
        for m in ("none", "causal")
        for mode in ("fwd", "fwd+bwd")
        for b in ("sdpa", "auto", "chunked")
    ]


def masked(repeats: int) -> list[BenchCase]:
    cases = []
    for m in ("sliding_window", "documents"):
        for mode in ("fwd", "fwd+bwd"):
            cases.append(BenchCase("sdpa", m, 16384, mode, prebuilt=True, repeats=repeats))
            cases.append(BenchCase("auto", m, 16384, mode, repeats=repeats))
            cases.append(BenchCase("chunked", m, 16384, mode, prebuilt=True, repeats=repeats))
    return cases


def linear(repeats: int) -> list[BenchCase]:
    return [
        BenchCase("chunked", m, n, "fwd+bwd", repeats=1)
        for m in ("none", "sliding_window")
        for n in (4096, 8192, 16384, 32768, 65536)
        if m == "sliding_window" or n <= 16384  # full N^2 work beyond that takes minutes
    ]


def scores(repeats: int) -> list[BenchCase]:
    return [
        BenchCase(b, m, 4096, mode, prebuilt=b == "sdpa", repeats=repeats)
        for m in ("alibi", "relative_bias")
        for mode in ("fwd", "fwd+bwd")
        for b in ("sdpa", "auto", "chunked")
    ]


SWEEPS = {"plain": plain, "masked": masked, "linear": linear, "scores": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweep", choices=list(SWEEPS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    results = run_sweep(
        SWEEPS[args.sweep](args.repeats),
        timeout_s=args.timeout,
        on_result=lambda r: print(f"  done {r.case.backend_label} {r.case.label()}", flush=True),
    )
    print(format_table(results))


if __name__ == "__main__":
    main()
