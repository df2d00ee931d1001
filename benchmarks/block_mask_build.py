"""Time to summarise a mask tile by tile: built-in masks (classified from index ranges) against
the same mask function without its classifier (evaluated on every pair causal leaves).

    python benchmarks/block_mask_build.py --n 16384 --window 256 --documents 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qkv import masks
from qkv.backends.block_mask import build_block_mask


def seconds(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = args.n
    ids = torch.arange(n) * args.documents // n
    cases = {
        f"sliding_window({args.window - 1})": masks.sliding_window(args.window - 1),
        f"document({args.documents})": masks.document(ids),
        f"document({args.documents}) & causal": masks.document(ids) & masks.causal(),
    }
    print(f"N={n}, tiles {build_block_mask(None, q_len=n, kv_len=n).tile_q}^2, CPU fp32")
    print(f"{'mask':<28} {'classified ms':>14} {'evaluated ms':>13} {'ratio':>7}  visited")
    for name, mask in cases.items():
        plain = masks.MaskFn(mask.fn, name)  # the same function without its classifier
        hinted_s = seconds(lambda m=mask: build_block_mask(m, q_len=n, kv_len=n), args.repeats)
        plain_s = seconds(lambda m=plain: build_block_mask(m, q_len=n, kv_len=n), args.repeats)
        bm = build_block_mask(mask, q_len=n, kv_len=n)
        same = torch.equal(bm.status, build_block_mask(plain, q_len=n, kv_len=n).status)
        print(
            f"{name:<28} {hinted_s * 1e3:>14.2f} {plain_s * 1e3:>13.1f} {plain_s / hinted_s:>7.0f}"
            f"  {bm.visited_tiles}/{bm.num_tiles}{'' if same else '  (summaries differ!)'}"
        )


if __name__ == "__main__":
    main()
