"""``qkv <command>``: the entry point and its subcommands."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from qkv._version import __version__
from qkv.cli.progress import ProgressBar

DTYPES = ("float16", "bfloat16", "float32", "float64")

#: Modules adding their sub-commands: each defines ``register(commands)`` and imports its
#: heavy dependencies only when its command runs, so ``qkv --help`` stays fast.
COMMAND_MODULES: tuple[str, ...] = (
    "qkv.cli.train",
    "qkv.cli.translate",
    "qkv.cli.evaluate",
    "qkv.cli.demo",
    "qkv.cli.classify",
    "qkv.cli.summarize",
    "qkv.cli.viz",
    "qkv.cli.interpret",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkv",
        description="qkv: exact, fast attention for PyTorch. softmax(QK^T / sqrt(d_k)) V, with masks, "
        "biases and several backends behind one dispatch.",
    )
    parser.add_argument("--version", action="version", version=f"qkv {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = commands.add_parser(
        "check",
        help="run every backend on this machine against the float64 reference: errors and a verdict",
        description="Run every registered backend on a few cases (plain, causal, sliding window, "
        "documents, ALiBi, softcap) and compare it with the reference backend computed in float64. "
        "A backend passes a case when its max abs error stays within a small multiple of the "
        "plain formula's own error in the same dtype (2x in half precision, 10x otherwise). "
        "Exits 0 when every served case passes, 1 when any fails.",
    )
    _add_shape_args(check, q_len=96, kv_len=128)
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")
    check.set_defaults(run=_run_check)

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
    # `qkv bench approx`: approximate attention against exact (qkv.bench.approx).
    importlib.import_module("qkv.bench.approx").register(
        bench.add_subparsers(dest="bench_kind", metavar="KIND")
    )

    explain = commands.add_parser(
        "explain",
        help="say which backend `auto` picks for a call shape, and why",
        description="Say which backend backend='auto' would run for a call of this shape, why "
        "each backend before it in the order was passed over, and the expected peak memory. "
        "Nothing is computed: the tensors are empty.",
    )
    _add_shape_args(explain, q_len=1024, kv_len=None)
    explain.add_argument(
        "--causal",
        choices=["none", "top_left", "bottom_right"],
        default="none",
        help="causal alignment when Nq != Nk (default %(default)s)",
    )
    explain.add_argument(
        "--window", type=int, default=None, help="sliding window: keys this far back"
    )
    explain.add_argument("--weights", action="store_true", help="ask for the attention weights too")
    explain.set_defaults(run=_run_explain)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands)
    return parser


def _add_shape_args(p: argparse.ArgumentParser, *, q_len: int, kv_len: int | None) -> None:
    p.add_argument("--batch", type=int, default=2, help="B (default %(default)s)")
    p.add_argument("--heads", type=int, default=8, help="query heads Hq (default %(default)s)")
    p.add_argument(
        "--kv-heads", type=int, default=2, help="key/value heads Hkv (default %(default)s)"
    )
    p.add_argument("--q-len", type=int, default=q_len, help="Nq (default %(default)s)")
    p.add_argument(
        "--kv-len",
        type=int,
        default=kv_len,
        help="Nk (default: Nq)" if kv_len is None else "Nk (default %(default)s)",
    )
    p.add_argument("--head-dim", type=int, default=64, help="D (default %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="(default %(default)s)")
    p.add_argument("--device", default="cpu", help="(default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random inputs' seed (default %(default)s)")


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _str_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    from qkv.bench import MASK_KINDS

    p.add_argument(
        "--n",
        type=_int_list,
        default=[1024, 4096],
        help="sequence lengths, comma-separated (default 1024,4096)",
    )
    p.add_argument(
        "--masks",
        type=_str_list,
        default=list(MASK_KINDS),
        help=f"mask kinds from {','.join(MASK_KINDS)} (default all)",
    )
    p.add_argument(
        "--backends",
        type=_str_list,
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
        type=_str_list,
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
        on_result=lambda r: bar.step(f"{r.case.backend} {r.case.label()}"),
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
            + (f" and {args.out / 'bench.png'}" if plotted else " (no plot: pip install qkv[viz])")
        )
    return 0


def _run_check(args: argparse.Namespace) -> int:
    import torch

    from qkv.diagnostics import check_backends

    rows = check_backends(
        batch=args.batch,
        q_heads=args.heads,
        kv_heads=args.kv_heads,
        q_len=args.q_len,
        kv_len=args.kv_len or args.q_len,
        head_dim=args.head_dim,
        dtype=getattr(torch, args.dtype),
        device=args.device,
        seed=args.seed,
        progress=None
        if args.json
        else lambda case: print(f"  checking {case} ...", file=sys.stderr),
    )
    served = [row for row in rows if row.passed is not None]
    failed = [row for row in served if not row.passed]
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=2))
        return 1 if failed else 0
    print(f"qkv {__version__}, torch {torch.__version__}, {args.dtype} on {args.device}")
    print(
        f"max |backend - float64 reference| for q ({args.batch}, {args.heads}, {args.q_len}, {args.head_dim}):"
    )
    print(f"{'case':<24} {'backend':<12} {'error':>9} {'limit':>9}  verdict")
    for row in rows:
        if row.error is None:
            print(f"{row.case:<24} {row.backend:<12} {'':>9} {'':>9}  not served: {row.reason}")
        else:
            verdict = "pass" if row.passed else "FAIL"
            print(f"{row.case:<24} {row.backend:<12} {row.error:9.2e} {row.limit:9.2e}  {verdict}")
    if failed:
        names = sorted({f"{row.backend} ({row.case})" for row in failed})
        print(f"FAILED: {len(failed)} of {len(served)} served cases: {', '.join(names)}")
        return 1
    print(f"passed: all {len(served)} served cases within tolerance")
    return 0


def _run_explain(args: argparse.Namespace) -> int:
    import torch

    import qkv

    dtype = getattr(torch, args.dtype)
    kv_len = args.kv_len or args.q_len
    q = torch.empty(
        args.batch, args.heads, args.q_len, args.head_dim, dtype=dtype, device=args.device
    )
    k = torch.empty(
        args.batch, args.kv_heads, kv_len, args.head_dim, dtype=dtype, device=args.device
    )
    mask = qkv.masks.sliding_window(args.window) if args.window is not None else None
    causal = False if args.causal == "none" else args.causal
    print(qkv.explain(q, k, k, mask=mask, causal=causal, return_weights=args.weights))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.run(args))
    except (ValueError, TypeError) as error:  # bad arguments, data, model folders
        print(f"qkv {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (OSError, ImportError) as error:  # unreadable files, missing optional packages
        print(f"qkv {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
