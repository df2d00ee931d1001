"""Extra peak memory of weights on demand: 8 query rows of every head at long N, and their
entropy/top-k summary, each measured in a fresh subprocess as max RSS over a baseline taken after
the inputs exist.

    python benchmarks/weights_memory.py --n 65536 --rows 8
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(what: str, n: int, rows: int) -> None:
    from qkv.functional.weights import attention_summary, attention_weights

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
    picked = torch.linspace(0, n - 1, rows).long()
    kwargs = {"rows": picked, "causal": True}
    baseline = _max_rss()
    start = time.perf_counter()
    if what == "weights":
        result = attention_weights(q, k, v, **kwargs)  # type: ignore[arg-type]
        shape = tuple(result.shape)
    else:
        summary = attention_summary(q, k, v, top_k=5, **kwargs)  # type: ignore[arg-type]
        shape = tuple(summary.top_weights.shape)
    seconds = time.perf_counter() - start
    print(json.dumps({"extra_bytes": _max_rss() - baseline, "seconds": seconds, "shape": shape}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--child", choices=["weights", "summary"])
    args = parser.parse_args()
    if args.child:
        child(args.child, args.n, args.rows)
        return
    print(f"B=1, H=8, D=64, float32, causal, N={args.n}, {args.rows} query rows, CPU")
    for what in ("weights", "summary"):
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                what,
                "--n",
                str(args.n),
                "--rows",
                str(args.rows),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{what:<8} result {tuple(r['shape'])}: extra peak {r['extra_bytes'] / 2**20:.1f} MiB,"
            f" {r['seconds'] * 1e3:.0f} ms"
        )


if __name__ == "__main__":
    main()
