"""Peak memory of Bahdanau (additive) attention: the eager formula vs qkv's query-chunked form.

Each measurement runs in a fresh process, and reports how much the process's peak resident set
grew during the call over a baseline taken after the inputs were built.

    python benchmarks/additive_memory.py --n 4096 --hidden 128
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(variant: str, n: int, hidden: int, dim: int, backward: bool) -> dict[str, float]:
    import torch

    from qkv.functional.score_functions import additive_attention, additive_scores, score_attention

    torch.manual_seed(0)
    q = torch.randn(1, n, dim, requires_grad=backward)
    k = torch.randn(1, n, dim, requires_grad=backward)
    w_q, w_k = torch.randn(hidden, dim) / dim**0.5, torch.randn(hidden, dim) / dim**0.5
    v = torch.randn(hidden)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        if variant == "eager":
            context, _ = score_attention(additive_scores(q, k, w_q, w_k, v), k)
        else:
            context, _ = additive_attention(q, k, w_q, w_k, v, k, need_weights=False)
        if backward:
            context.sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_extra_bytes": peak - baseline, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="Nq = Nk")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--modes", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, mode = args.worker
        print(json.dumps(measure(variant, args.n, args.hidden, args.dim, mode == "fwd+bwd")))
        return 0
    rows = {}
    print(f"additive attention, B=1, Nq=Nk={args.n}, hidden={args.hidden}, D={args.dim}, float32")
    print(f"{'mode':<8} {'variant':<8} {'peak extra MiB':>15} {'seconds':>8}")
    for mode in args.modes.split(","):
        for variant in ("eager", "chunked"):
            cmd = [
                sys.executable,
                __file__,
                "--n",
                str(args.n),
                "--hidden",
                str(args.hidden),
                "--dim",
                str(args.dim),
                "--worker",
                variant,
                mode,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(
                    f"{mode:<8} {variant:<8} failed: {(done.stderr.strip().splitlines() or ['killed'])[-1]}"
                )
                continue
            row = json.loads(done.stdout)
            rows[(mode, variant)] = row
            print(
                f"{mode:<8} {variant:<8} {row['peak_extra_bytes'] / 2**20:>15,.0f} {row['seconds']:>8.2f}"
            )
        if (mode, "eager") in rows and (mode, "chunked") in rows:
            ratio = rows[(mode, "eager")]["peak_extra_bytes"] / max(
                rows[(mode, "chunked")]["peak_extra_bytes"], 1
            )
            print(f"{mode:<8} eager / chunked peak memory: {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
