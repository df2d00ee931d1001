"""Context parallelism on the CPU: P gloo processes against one process, forward + backward.

    python benchmarks/context_parallel.py --n 32768 --mask causal --world 2 --threads 1 --against-one
    python benchmarks/context_parallel.py --n 65536 --mask window --window 4096 --world 2 --against-one
    python benchmarks/context_parallel.py --n 4096 --fit-mib 256 --world 4 --mask causal

Each rank reports the wall time of ``--repeat`` forward+backward passes (after a warm-up on a
short sequence, which loads the kernel), and its peak resident memory (the kernel's high-water
mark, reset before the inputs are made): ``peak_mib`` counts everything the pass needs,
this rank's inputs included (q, k, v of its shard; the whole sequence is never built), and
``peak_mib_above_inputs`` the same less the inputs (activations, gradients, buffers). Both are
fair against one process (``--world 1`` runs plain :func:`qkv.attention` on the whole sequence,
measured the same way); ``peak_mib`` is what a per-process memory budget has to hold. It also
reports the bytes it sent per pass beside the formula of ``docs/parallel.md``.
``--against-one`` runs one process of ``world x threads`` threads on the same sequence after the
P processes and prints the ratios (time, and the most loaded rank's peaks over one process's).
``--fit-mib`` doubles ``N`` from ``--n`` while the most loaded rank's ``peak_mib`` stays within the
budget, then bisects ``--refine`` times between the last ``N`` that fitted and the first that
did not (multiples of 1024), and prints the longest ``N`` that fitted.

Run it on a quiet machine for times: the figures of a shared machine measure the other jobs too
(memory figures do not depend on the load).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _peak_mib() -> float:
    """Peak resident memory of this process since the last :func:`_reset_peak`, MiB (Linux
    reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Start the high-water mark again from the current resident memory (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _current_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _inputs(args: argparse.Namespace, n: int, world: int, rank: int) -> list[torch.Tensor]:
    """This rank's shards (random values; the whole sequence is never built, so it does not
    count in the memory peak)."""
    from qkv.parallel import SequenceLayout

    length = SequenceLayout(n, world, args.layout).shard_length(rank)
    g = torch.Generator().manual_seed(rank)
    heads = (args.heads, args.kv_heads, args.kv_heads)
    return [torch.randn(1, h, length, args.dim, generator=g).requires_grad_() for h in heads]


def _options(args: argparse.Namespace) -> dict[str, Any]:
    from qkv import masks

    if args.mask == "causal":
        return {"causal": True}
    return {"mask": masks.sliding_window(args.window - 1)}


def _formula(args: argparse.Namespace, n: int, world: int, rank: int) -> int | None:
    """Bytes rank ``rank`` sends in forward + backward by the formulas of docs/parallel.md:
    ``b`` is one shard's K and V (float32, so its gradient is ``b`` too). None where the
    formula depends on more than the table gives (contiguous causal: unbalanced)."""
    if world == 1:
        return 0
    block = args.kv_heads * -(-n // world) * 2 * args.dim * 4
    if args.method == "all_gather":
        return 4 * (world - 1) * block  # gather, gather again, all-reduce of P gradients
    if args.layout == "contiguous" and args.mask == "window" and args.window <= n // world:
        # one hop: K/V to r + 1 in forward and again in backward, the gradient home to r - 1
        return (2 * block if rank < world - 1 else 0) + (block if rank > 0 else 0)
    if args.layout == "zigzag" or args.mask != "causal":
        return 3 * (world - 1) * block  # P - 1 hops; again; gradients P - 2 hops and home
    return None


def _run(rank: int, world: int, port: int, args: argparse.Namespace, n: int, out: str) -> None:
    torch.set_num_threads(args.threads)
    import qkv
    from qkv import parallel as CP

    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    opts = _options(args)
    stats = CP.CommStats()

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int) -> None:
        if world == 1:
            o = qkv.attention(q, k, v, backend=args.backend, **opts)
        else:
            o = CP.attention(
                q, k, v, layout=args.layout, method=args.method, lengths=(length, length),
                stats=stats, pieces=args.pieces, backend=args.backend, **opts,
            )  # fmt: skip
        o.sum().backward()

    # Warm-up on a small sequence: loads the CPU kernel and the communication buffers, so the
    # resident-memory peak below is the attention's own.
    small = 128 * world
    step(*_inputs(args, small, world, rank), small)
    stats.events.clear()
    _reset_peak()
    base = _current_mib()
    q, k, v = _inputs(args, n, world, rank)
    inputs = _current_mib() - base
    start = time.perf_counter()
    for _ in range(args.repeat):
        step(q, k, v, n)
    seconds = (time.perf_counter() - start) / args.repeat
    sent = stats.bytes_sent() // args.repeat
    record = {
        "rank": rank,
        "world": world,
        "threads": args.threads,
        "n": n,
        "mask": args.mask,
        "method": args.method,
        "layout": args.layout,
        "seconds": seconds,
        "peak_mib": _peak_mib() - base,
        "peak_mib_above_inputs": _peak_mib() - base - inputs,
        "bytes_sent": sent,
        "bytes_formula": _formula(args, n, world, rank),
    }
    with open(f"{out}.{rank}", "w") as f:
        f.write(json.dumps(record))
    if world > 1:
        dist.destroy_process_group()


def measure(args: argparse.Namespace, n: int) -> list[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/qkv_cp_bench_{os.getpid()}"
    mp.spawn(_run, args=(args.world, port, args, n, out), nprocs=args.world, join=True)
    records = []
    for rank in range(args.world):
        with open(f"{out}.{rank}") as f:
            records.append(json.loads(f.read()))
        os.remove(f"{out}.{rank}")
    return records


def _ratios(parallel: list[dict[str, Any]], one: dict[str, Any]) -> dict[str, Any]:
    """The most loaded rank against one process."""
    return {
        "world": parallel[0]["world"],
        "n": one["n"],
        "time_ratio": max(r["seconds"] for r in parallel) / one["seconds"],
        "peak_ratio": max(r["peak_mib"] for r in parallel) / one["peak_mib"],
        "peak_above_inputs_ratio": max(r["peak_mib_above_inputs"] for r in parallel)
        / one["peak_mib_above_inputs"],
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--mask", choices=["causal", "window"], default="causal")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--method", choices=["ring", "all_gather"], default="ring")
    parser.add_argument("--layout", choices=["contiguous", "zigzag"], default="zigzag")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--backend", default="cpu", help="every block's backend (both sides)")
    parser.add_argument("--pieces", type=int, default=None, help="pieces per shard (ring)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--fit-mib", type=float, default=None)
    parser.add_argument(
        "--refine", type=int, default=2, help="bisection steps after doubling (--fit-mib)"
    )
    parser.add_argument(
        "--against-one", action="store_true", help="then one process of world x threads"
    )
    args = parser.parse_args(argv)
    if args.fit_mib is None:
        records = measure(args, args.n)
        for record in records:
            print(json.dumps(record))
        if args.against_one and args.world > 1:
            one_args = argparse.Namespace(**{**vars(args), "world": 1})
            one_args.threads = args.threads * args.world
            one = measure(one_args, args.n)[0]
            print(json.dumps(one))
            print(json.dumps(_ratios(records, one)))
        return 0

    def fits(n: int) -> bool:
        peak = max(r["peak_mib"] for r in measure(args, n))
        print(json.dumps({"n": n, "world": args.world, "peak_mib": peak}))
        return peak <= args.fit_mib

    fitted, n = None, args.n
    while fits(n):
        fitted, n = n, 2 * n
    if fitted is not None:
        low, high = fitted, n  # low fits, high does not
        for _ in range(args.refine):
            middle = (low + high) // 2 // 1024 * 1024
            if middle in (low, high):
                break
            low, high = (middle, high) if fits(middle) else (low, middle)
        fitted = low
    print(json.dumps({"world": args.world, "budget_mib": args.fit_mib, "longest_n": fitted}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
