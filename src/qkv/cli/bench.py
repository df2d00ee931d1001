"""``qkv bench``: time every backend over a sweep; ``qkv bench decode``: decoding steps against
the memory read rate (:mod:`qkv.bench.decode`); ``qkv bench approx``: approximate attention
against exact (:mod:`qkv.bench.approx`: error vs knob, time and memory vs N).

The experiments that train models with approximate attention are not a ``qkv`` command: see
``benchmarks/approx_lab.py``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from qkv.cli.args import DTYPES, int_list, str_list
from qkv.cli.progress import ProgressBar

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``qkv bench`` and its ``decode`` and ``approx`` sub-commands."""
    bench = commands.add_parser(
        "bench",
        help="time every backend over a sweep of N and mask kinds, with ratios to SDPA",
        description="Time the attention backends (and, with --peers, PyTorch's own kernels) over a "
        "sweep of sequence lengths and mask kinds, one subprocess per case so each case's peak "
        "memory is its own. Prints the median time, GFLOP/s, peak memory and the ratio to SDPA "
        "given the same mask as a dense tensor.",
    )
    _add_bench_args(bench)
    bench.set_defaults(run=_run_bench)
    kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND")
    _register_decode(kinds)
    _register_approx(kinds)


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    from qkv.bench import MASK_KINDS

    p.add_argument(
        "--n",
        type=int_list,
        default=[1024, 4096],
        help="sequence lengths, comma-separated (default 1024,4096)",
    )
    p.add_argument(
        "--masks",
        type=str_list,
        default=list(MASK_KINDS),
        help=f"mask kinds from {','.join(MASK_KINDS)} (default all)",
    )
    p.add_argument(
        "--backends",
        type=str_list,
        default=None,
        help="backends and peers (default: every registered backend that serves --dtype on "
        "--device)",
    )
    p.add_argument(
        "--peers",
        action="store_true",
        help="on CUDA, also time PyTorch's SDPA with each kernel forced (sdpa-flash, sdpa-cudnn, "
        "sdpa-efficient) and compiled FlexAttention (flex); on the CPU, flex (forward only, its "
        "compile time reported on its own line)",
    )
    p.add_argument(
        "--modes",
        type=str_list,
        default=["fwd", "fwd+bwd"],
        help="fwd and/or fwd+bwd (default both)",
    )
    p.add_argument("--batch", type=int, default=1, help="B (default %(default)s)")
    p.add_argument("--heads", type=int, default=8, help="query heads Hq (default %(default)s)")
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--head-dim", type=int, default=64, help="D (default %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="(default %(default)s)")
    p.add_argument("--device", default="cpu", help="(default %(default)s)")
    p.add_argument(
        "--window", type=int, default=256, help="sliding window size (default %(default)s)"
    )
    p.add_argument(
        "--documents",
        type=int,
        default=16,
        help="documents packed in a sequence (default %(default)s)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed calls per case after a warm-up; the median is reported (default %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds allowed per case (default %(default)s)",
    )
    p.add_argument("--out", type=Path, default=None, help="folder for bench.json and bench.png")


def _run_bench(args: argparse.Namespace) -> int:
    import torch

    from qkv.backends import available_backends
    from qkv.bench import (
        PEERS,
        choose_backends,
        expand_sweep,
        fill_matmul_share,
        matmul_tflops,
        run_sweep,
    )
    from qkv.bench.report import format_table, write_json, write_plot

    backends, left_out = choose_backends(args.device, args.dtype, peers=args.peers)
    if args.backends:  # as named, plus the peers --peers added
        peers = [b for b in backends if b in PEERS and b not in args.backends]
        backends = [*args.backends, *peers]
        left_out = {name: why for name, why in left_out.items() if name == "--peers"}
    for name, reason in left_out.items():
        print(f"not timed: {name}: {reason}")
    known = [*available_backends(), *PEERS]
    unknown = sorted(set(backends) - set(known))
    if unknown:
        raise ValueError(f"--backends: unknown {unknown}; known: {known}")
    cases = expand_sweep(
        backends=backends,
        mask_kinds=args.masks,
        seq_lens=args.n,
        modes=args.modes,
        batch=args.batch,
        heads=args.heads,
        kv_heads=args.kv_heads or args.heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
        device=args.device,
        window=args.window,
        documents=args.documents,
        repeats=args.repeats,
    )
    bar = ProgressBar(len(cases))
    results = run_sweep(
        cases,
        timeout_s=args.timeout,
        on_result=lambda r: bar.step(f"{r.case.backend_label} {r.case.label()}"),
    )
    # the yardstick, measured in this run: bf16 on CUDA; on the CPU the run's own dtype on the
    # same threads (1024^3: about a second on one core)
    if args.device.startswith("cuda"):
        rate = matmul_tflops(args.device)
        fill_matmul_share(results, rate)
        print(format_table(results, rate))
    else:
        rate = matmul_tflops(args.device, dtype=getattr(torch, args.dtype), n=1024)
        fill_matmul_share(results, rate)
        print(format_table(results, rate, matmul_dtype=args.dtype, tera=False))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(results, args.out / "bench.json")
        plotted = write_plot(results, args.out / "bench.png")
        print(
            f"wrote {args.out / 'bench.json'}"
            + (
                f" and {args.out / 'bench.png'}"
                if plotted
                else " (no plot: pip install -e '.[viz]')"
            )
        )
    return 0


def _register_decode(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``qkv bench decode``."""
    p = kinds.add_parser(
        "decode",
        help="decoding steps: K/V bytes read per second against the memory read rate",
        description="Decoding steps on the CPU (a few new queries against a long key/value "
        "cache, causal bottom-right) on each backend, interleaved in one process: the median "
        "time, the bytes of K and V read per second and their share of the memory read rate "
        "(a sum over 256 MiB) measured in the same run, and the time over SDPA's.",
    )
    p.add_argument("--batch", type=int_list, default=[1], help="batch sizes (default 1)")
    p.add_argument("--queries", type=int_list, default=[1, 8], help="new queries (default 1,8)")
    p.add_argument(
        "--contexts", type=int_list, default=[4096, 32768], help="cached keys (default 4096,32768)"
    )
    p.add_argument("--heads", type=int, default=32, help="query heads (default 32)")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (default 8)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="(default bfloat16)")
    p.add_argument("--backends", type=str_list, default=["cpu", "sdpa"], help="(default cpu,sdpa)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (default 10)")
    p.set_defaults(run=_run_decode)


def _run_decode(args: argparse.Namespace) -> int:
    import torch

    from qkv.backends import available_backends
    from qkv.bench.decode import decode_cases, format_decode_table, time_decode

    unknown = sorted(set(args.backends) - set(available_backends()))
    if unknown:
        raise ValueError(f"--backends: unknown {unknown}; known: {available_backends()}")
    cases = decode_cases(
        args.batch,
        args.queries,
        args.contexts,
        q_heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        dtype=getattr(torch, args.dtype),
    )
    bar = ProgressBar(len(cases))
    results = []
    for case in cases:
        results += time_decode(case, args.backends, rounds=args.rounds)
        bar.step(f"B={case.batch} Nq={case.queries} Nk={case.context}")
    print(format_decode_table(results))
    return 0


def _register_approx(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``approx`` to the ``qkv bench`` sub-commands."""
    p = kinds.add_parser(
        "approx",
        help="approximate attention vs exact: error vs knob, time and memory vs N",
        description="Approximate attention (qkv.approx) against exact: relative error and row "
        "KL vs each method's knob on synthetic inputs, and forward time and peak memory vs N "
        "(each case in a fresh process) with the crossover N. The experiments that train "
        "models are benchmarks/approx_lab.py.",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: seconds, for tests")
    p.add_argument(
        "--parts",
        default="error,speed",
        help="comma-separated parts from error,speed (default all)",
    )
    p.add_argument("--n", default=None, help="speed part's sequence lengths, comma-separated")
    p.add_argument("--out", type=Path, default=None, help="folder for approx.json and the plot")
    p.set_defaults(run=_run_approx)


def _run_approx(args: argparse.Namespace) -> int:
    from qkv.bench.approx import BenchSizes, format_tables, parse_lengths, run_bench, save_result

    sizes = BenchSizes.quick() if args.quick else BenchSizes()
    if args.n:
        sizes = replace(sizes, speed_ns=parse_lengths(args.n))
    parts = [p for p in args.parts.split(",") if p]
    result = run_bench(sizes, parts, progress=lambda text: print(f"  {text} ...", file=sys.stderr))
    print(format_tables(result))
    if args.out is not None:
        print("wrote " + " and ".join(str(path) for path in save_result(result, args.out)))
    return 0
