"""``qkv explain``: which backend ``auto`` picks for a call shape, and why."""

from __future__ import annotations

import argparse

from qkv.cli.args import add_shape_args

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``qkv explain``."""
    explain = commands.add_parser(
        "explain",
        help="say which backend `auto` picks for a call shape, and why",
        description="Say which backend backend='auto' would run for a call of this shape, why "
        "each backend before it in the order was passed over, and the expected peak memory. "
        "Nothing is computed: the tensors are empty.",
    )
    add_shape_args(explain, q_len=1024, kv_len=None)
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
    explain.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
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
