"""Small training-size calls, where ``auto`` must not pick anything slower than SDPA: every
backend and ``auto`` timed interleaved (round-robin, so a busy machine slows them alike).

    python benchmarks/small_calls.py --batch 64 --heads 8 --n 20 --dim 32 --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import qkv
from qkv import masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = (args.batch, args.heads, args.n, args.dim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    lengths = torch.randint(1, args.n + 1, (args.batch,))
    padding = torch.arange(args.n) < lengths[:, None]  # (B, N), True = real token
    cases: dict[str, dict[str, object]] = {
        "none": {},
        "causal": {"causal": True},
        "key_padding fn": {"mask": masks.key_padding(lengths)},
        "padding tensor": {"mask": padding[:, None, None, :]},
        "padding & causal": {"mask": padding[:, None, None, :], "causal": True},
    }
    backends = ["auto", "sdpa", "chunked", "reference"]
    print(f"q, k, v {shape} float32, CPU; median microseconds over {args.rounds} rounds")
    print(f"{'mask':<18} {'mode':<8} " + " ".join(f"{b:>10}" for b in backends) + "  auto picks")
    for name, kwargs in cases.items():
        for mode in ("fwd", "fwd+bwd"):

            def call(backend: str, kw: dict[str, object] = kwargs, m: str = mode) -> None:
                out = qkv.attention(q, k, v, backend=backend, **kw)  # type: ignore[arg-type]
                if m == "fwd+bwd":
                    out.sum().backward()

            times = interleaved({b: (lambda b=b: call(b)) for b in backends}, args.rounds)
            with torch.set_grad_enabled(mode == "fwd+bwd"):
                picked = qkv.explain(q, k, v, **kwargs).chosen  # type: ignore[arg-type]
            cells = " ".join(f"{times[b] * 1e6:>10.0f}" for b in backends)
            print(f"{name:<18} {mode:<8} {cells}  {picked}")


def interleaved(calls: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


if __name__ == "__main__":
    main()
