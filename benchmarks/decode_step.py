"""One decoding step's attention on the CPU: a few new queries against a long key/value cache,
called the way qkv's decoders call it (SmolLM2-135M's heads by default: Hq = 9, Hkv = 3, D = 64,
float32).

For each shape every exact backend and ``auto`` run interleaved in one process (round-robin, so
a busy machine slows them alike; medians reported), with auto's pick, auto's time over the
fastest backend's, and the bytes of K and V the fastest backend reads per second against the
memory read rate (:func:`qkv.bench.memory_gbps` over ``--read-mib`` MiB, twice the last-level
cache of the machines this ran on, same thread count) measured just before and after each
shape's rounds, so under about the same load.
Columns: each backend's median microseconds; ``picks``: auto's choice (``qkv.explain``);
``p/best``: the picked backend's time over the fastest's (the choice); ``a/best``: auto's own
time over the fastest's (the choice and its dispatch); ``best``: the fastest backend, its K/V
``GB/s`` and their share ``of bw``, the memory read rate ``bw`` (GB/s).

    python benchmarks/decode_step.py [--threads 1] [--batch 1 8] [--queries 1 4]
        [--contexts 512 2048 8192] [--masks causal padding fresh] [--rounds 40]

- The keys and values are what a decoder holds: views of the first ``L`` tokens of preallocated
  ``(B, Hkv, max_len, D)`` cache buffers (``--contiguous`` gives them storage of their own).
- The calls cycle through enough caches (at least ``--rotate-mib`` MiB, as the 30 layers of a
  model do) that each call reads its keys and values from memory, not from the last-level cache.
- ``--masks``: ``causal`` is ``causal="bottom_right"`` alone (an unpadded batch: the decoder
  drops an all-True mask); ``padding`` adds a bool key mask ``(B, 1, 1, L)`` of a left-padded
  batch (row b padded by 3 b tokens), one object for every call, as ``LlamaDecoder`` hands one
  to all its layers (auto's remembered choice serves them); ``fresh`` is that mask as a new
  view on every call (a ``key_padding_mask`` given to ``MultiHeadAttention`` call by call), so
  ``auto`` prices every call again.

Times are wall-clock: on a shared machine they are noisy, and only the ratios measured in one
run mean much.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

import qkv
from qkv.bench import memory_gbps
from qkv.nn.kv_cache import KVCache

Call = Callable[[int], Tensor]  # the cache index -> the output


def caches_for(
    B: int, Hkv: int, L: int, D: int, margin: int, copies: int, contiguous: bool
) -> list[tuple[Tensor, Tensor]]:
    """``copies`` (k, v) pairs ``(B, Hkv, L, D)``: cache views (``margin`` free slots after
    them) or contiguous tensors, random content."""
    pairs = []
    for _ in range(copies):
        if contiguous:
            pairs.append((torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)))
            continue
        cache = KVCache(B, Hkv, L + margin, D)
        pairs.append(cache.update(torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)))
    return pairs


def interleaved(calls: dict[str, Call], rounds: int, copies: int) -> dict[str, float]:
    """Median seconds of each call, run round-robin, each call on the next cache."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    turn = 0
    for r in range(rounds + 1):  # the first round warms up
        for name, fn in calls.items():
            start = time.perf_counter()
            fn(turn % copies)
            elapsed = time.perf_counter() - start
            turn += 1
            if r:
                samples[name].append(elapsed)
    return {name: statistics.median(s) for name, s in samples.items()}


def run_shape(args: argparse.Namespace, B: int, Nq: int, L: int, mask_kind: str) -> str:
    Hq, Hkv, D = args.heads, args.kv_heads, args.dim
    kv_bytes = 2 * B * Hkv * L * D * 4
    copies = max(2, min(args.max_copies, math.ceil(args.rotate_mib * 2**20 / kv_bytes)))
    pairs = caches_for(B, Hkv, L, D, args.margin, copies, args.contiguous)
    q = torch.randn(B, Nq, Hq * D).unflatten(-1, (Hq, D)).transpose(1, 2)  # (B, Hq, Nq, D)
    pad = 3 * torch.arange(B)[:, None]  # (B, 1) left padding of each row
    real = torch.arange(L) >= pad  # (B, L) True = real token
    shared = real[:, None, None, :]  # (B, 1, 1, L)

    def kwargs() -> dict[str, object]:
        if mask_kind == "padding":
            return {"causal": "bottom_right", "mask": shared}
        if mask_kind == "fresh":
            return {"causal": "bottom_right", "mask": real[:, None, None, :]}
        return {"causal": "bottom_right"}

    def call(backend: str) -> Call:
        def run(i: int) -> Tensor:
            k, v = pairs[i]
            return qkv.attention(q, k, v, backend=backend, **kwargs())  # type: ignore[arg-type]

        return run

    names = [*args.backends, "auto"]
    before = memory_gbps("cpu", mib=args.read_mib)
    times = interleaved({name: call(name) for name in names}, args.rounds, copies)
    bandwidth = (before + memory_gbps("cpu", mib=args.read_mib)) / 2  # under the same load
    k, v = pairs[0]
    explanation = qkv.explain(q, k, v, **kwargs())  # type: ignore[arg-type]
    fastest = min(args.backends, key=lambda name: times[name])
    picked = times.get(explanation.chosen)
    pick_ratio = f"{picked / times[fastest]:>6.2f}" if picked is not None else f"{'':>6}"
    rate = kv_bytes / times[fastest] / 1e9
    cells = " ".join(f"{times[name] * 1e6:>8.0f}" for name in names)
    return (
        f"{mask_kind:<8} {B:>2} {Nq:>3} {L:>6} {cells}  {explanation.chosen:<9}{pick_ratio}"
        f"{times['auto'] / times[fastest]:>7.2f} {fastest:<9}{rate:>6.1f} {rate / bandwidth:>5.0%}{bandwidth:>6.1f}"
    )


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--masks", nargs="+", default=["causal", "padding", "fresh"])
    parser.add_argument("--backends", nargs="+", default=["sdpa", "cpu", "chunked", "reference"])
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--margin", type=int, default=256, help="free cache slots after L")
    parser.add_argument("--contiguous", action="store_true", help="K, V not cache views")
    parser.add_argument("--rotate-mib", type=float, default=128.0)
    parser.add_argument("--read-mib", type=int, default=64, help="buffer of the memory rate")
    parser.add_argument("--max-copies", type=int, default=256)
    parser.add_argument(
        "--measure",
        action="store_true",
        help="let auto time close candidates (qkv.backends.measured); off: the cost model picks",
    )
    args = parser.parse_args()
    for choice in args.masks:
        if choice not in ("causal", "padding", "fresh"):
            parser.error(f"--masks takes causal, padding and fresh; got {choice!r}")
    if not args.measure:
        os.environ["QKV_AUTO_MEASURE"] = "0"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start_load = os.getloadavg()[0]
    layout = "contiguous" if args.contiguous else f"cache views (max_len = L + {args.margin})"
    print(
        f"decode step, float32 CPU, {args.threads} thread(s): Hq = {args.heads}, Hkv = "
        f"{args.kv_heads}, D = {args.dim}; K, V {layout}; auto measures: "
        f"{args.measure}; median microseconds over {args.rounds} interleaved rounds"
    )
    names = [*args.backends, "auto"]
    print(
        f"{'mask':<8} {'B':>2} {'Nq':>3} {'L':>6} "
        + " ".join(f"{name:>8}" for name in names)
        + f"  {'picks':<9}{'p/best':>6}{'a/best':>7} {'best':<9}{'GB/s':>6} {'of bw':>5}{'bw':>6}"
    )
    for mask_kind in args.masks:
        for B in args.batch:
            for Nq in args.queries:
                for L in args.contexts:
                    print(run_shape(args, B, Nq, L, mask_kind), flush=True)
    print(f"load average at the start {start_load:.2f}, at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
