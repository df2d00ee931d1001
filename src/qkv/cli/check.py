"""``qkv check``: every backend on this machine against the float64 reference."""

from __future__ import annotations

import argparse
import json
import sys

from qkv._version import __version__
from qkv.cli.args import add_shape_args

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``qkv check``."""
    check = commands.add_parser(
        "check",
        help="run every backend on this machine against the float64 reference: errors and a verdict",
        description="Run every registered backend on a few cases (plain, causal, sliding window, "
        "documents, ALiBi, softcap) and compare it with the reference backend computed in float64. "
        "A backend passes a case when its max abs error stays within a small multiple of the "
        "plain formula's own error in the same dtype (2x in half precision, 10x otherwise). "
        "Exits 0 when every served case passes, 1 when any fails.",
    )
    add_shape_args(check, q_len=96, kv_len=128)
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")
    check.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
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
    # A backend that serves none of the cases for one reason (triton on a CPU machine) is
    # said once below the table, not once per case.
    reasons: dict[str, set[str | None]] = {}
    for row in rows:
        reasons.setdefault(row.backend, set()).add(None if row.error is not None else row.reason)
    never = {name: next(iter(r)) for name, r in reasons.items() if len(r) == 1 and None not in r}
    for row in rows:
        if row.backend in never:
            continue
        if row.error is None:
            print(f"{row.case:<24} {row.backend:<12} {'':>9} {'':>9}  not served: {row.reason}")
        else:
            verdict = "pass" if row.passed else "FAIL"
            print(f"{row.case:<24} {row.backend:<12} {row.error:9.2e} {row.limit:9.2e}  {verdict}")
    for name, reason in never.items():
        print(f"{name}: serves none of these cases: {reason}")
    if failed:
        names = sorted({f"{row.backend} ({row.case})" for row in failed})
        print(f"FAILED: {len(failed)} of {len(served)} served cases: {', '.join(names)}")
        return 1
    print(f"passed: all {len(served)} served cases within tolerance")
    return 0
