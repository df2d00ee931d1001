"""The compiled CPU kernel against its peers, in one process, with interleaved medians.

For each case every contestant runs once per round, in turn, for ``--rounds`` rounds (after one
untimed warm-up call each, which for compiled FlexAttention is its compilation, reported on its
own line), and the table gives each contestant's median and the ratios the issue's targets are
stated in. Contestants:

- ``cpu``: ``qkv.attention(..., backend="cpu")``, the mask as the mask function;
- ``auto``: ``qkv.attention(...)``, what a user gets;
- ``chunked``: the chunked backend;
- ``sdpa``: ``F.scaled_dot_product_attention`` given the dense bool mask or float bias, built
  before the timed calls (``is_causal`` for causal, nothing for no mask);
- ``flex``: ``torch.compile(flex_attention)`` with a ``create_block_mask`` block mask built
  before the timed calls (forward only: FlexAttention has no backward on the CPU);
- ``prev`` (with ``--previous REV``): the cpu backend on the kernel source of git revision
  ``REV``, built under its own op namespace so that both kernels run in this one process.

Each row also gives the cpu kernel's useful-work throughput (4 D flops per attended query-key
pair and head forward, 3.5 times that forward+backward) as a fraction of the matmul rate of the
dtype measured in the same rounds (a square 1536^3 ``torch.matmul`` in that dtype on the same
threads, timed as one more contestant, so that a loaded machine slows the yardstick too).

    OMP_NUM_THREADS=1 python benchmarks/cpu_kernel.py            # the full table
    OMP_NUM_THREADS=1 python benchmarks/cpu_kernel.py --quick    # N=4096 cases only
    OMP_NUM_THREADS=1 python benchmarks/cpu_kernel.py --dtype bfloat16 --sizes 4096
    OMP_NUM_THREADS=2 python benchmarks/cpu_kernel.py --decode     # decoding, GB/s of K/V
    OMP_NUM_THREADS=1 python benchmarks/cpu_kernel.py --previous HEAD~1   # against a revision
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import qkv
from qkv import masks, scores
from qkv.backends import select_backend
from qkv.request import build_request

B, H, D = 1, 8, 64
DTYPE = torch.float32  # --dtype
MM = 1536  # the yardstick matmul's size


PREVIOUS: object = None  # torch.ops.qkv_cpu_prev once --previous has built it


def build_previous(rev: str) -> object:
    """The kernel source of git revision ``rev`` compiled as ``torch.ops.qkv_cpu_prev`` (its
    ``TORCH_LIBRARY`` renamed, the library's own flags)."""
    from torch.utils import cpp_extension

    from qkv.backends.cpu import build

    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{rev}:src/qkv/backends/cpu/kernel.cpp"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    source = source.replace("TORCH_LIBRARY(qkv_cpu,", "TORCH_LIBRARY(qkv_cpu_prev,")
    name = "qkv_cpu_prev_" + hashlib.sha256(source.encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / name
    folder.mkdir(exist_ok=True)
    (folder / "kernel.cpp").write_text(source)
    start = time.perf_counter()
    cpp_extension.load(
        name=name, sources=[str(folder / "kernel.cpp")], extra_cflags=build.CFLAGS,
        extra_ldflags=["-fopenmp"], build_directory=str(folder), is_python_module=False,
    )  # fmt: skip
    print(f"previous kernel ({rev}) ready ({time.perf_counter() - start:.1f} s)")
    return _OlderSchema(torch.ops.qkv_cpu_prev)


class _OlderSchema:
    """A previous kernel's ops, called with as many arguments as its schema has: the current
    Python side may pass trailing arguments an older kernel lacks (their defaults keep the old
    behaviour)."""

    def __init__(self, ops: Any) -> None:
        self._ops = ops

    def __getattr__(self, name: str) -> Callable[..., Any]:
        op = getattr(self._ops, name)
        count = len(op.default._schema.arguments)
        return lambda *args: op(*args[:count])


@contextlib.contextmanager
def previous_kernel() -> Iterator[None]:
    """The cpu backend's calls (forward and backward) on the ``--previous`` kernel."""
    from qkv.backends.cpu import backend

    current = backend.load_kernel
    backend.load_kernel = lambda: PREVIOUS
    try:
        yield
    finally:
        backend.load_kernel = current


def on_previous(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
    def run() -> Tensor:
        with previous_kernel():
            return fn()

    return run


def inputs(n: int, grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return tuple(  # type: ignore[return-value]
        torch.randn(B, H, n, D, generator=g).to(DTYPE).requires_grad_(grad) for _ in range(3)
    )


def attended_pairs(kind: str, n: int) -> int:
    """Query-key pairs the case's mask keeps, per head."""
    if kind == "causal":
        return n * (n + 1) // 2
    if kind in ("window", "documents"):
        x = torch.empty(1, 1, n, 1)
        request = build_request(x, x, x, **case_kwargs(kind, n))
        total = 0
        for lo in range(0, n, 1024):
            tile = request.mask_tile((lo, min(lo + 1024, n)), request.full_kv)
            assert tile is not None
            total += int(tile.sum())
        return total
    return n * n


def useful_flops(kind: str, n: int, mode: str) -> float:
    forward = 4.0 * D * B * H * attended_pairs(kind, n)
    return forward * (3.5 if mode == "fwd+bwd" else 1.0)


def case_kwargs(kind: str, n: int) -> dict[str, Any]:
    if kind == "causal":
        return {"causal": True}
    if kind == "window":
        return {"mask": masks.sliding_window(255)}  # causal window of 256 keys
    if kind == "documents":
        return {"mask": masks.document(torch.arange(n) * 16 // n)}
    if kind == "alibi":
        return {"bias": scores.alibi(H)}
    if kind == "relative":
        rel = scores.RelativePositionBias(H, max_distance=128)
        torch.nn.init.normal_(rel.table)
        return {"bias": rel}
    return {}


def dense_of(q: Tensor, k: Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
    """SDPA's arguments: the dense bool mask or float bias (built strip by strip)."""
    if not kwargs:
        return {}
    if kwargs.get("causal") and len(kwargs) == 1:
        return {"is_causal": True}
    request = build_request(q.detach(), k.detach(), k.detach(), **kwargs)
    n = q.shape[2]
    if request.score_mod is not None:
        out = torch.empty(1, H, n, n, dtype=DTYPE)
        with torch.no_grad():
            for lo in range(0, n, 512):
                rows = (lo, min(lo + 512, n))
                out[:, :, lo : rows[1]] = request.modify_scores(
                    torch.zeros(1, 1, 1, 1), rows, request.full_kv
                )
        return {"attn_mask": out}
    out_mask = torch.empty(1, 1, n, n, dtype=torch.bool)
    for lo in range(0, n, 512):
        rows = (lo, min(lo + 512, n))
        tile = request.mask_tile(rows, request.full_kv)
        assert tile is not None
        out_mask[:, :, lo : rows[1]] = tile
    return {"attn_mask": out_mask}


def contestants(kind: str, n: int, mode: str, names: list[str]) -> dict[str, Callable[[], Tensor]]:
    grad = mode == "fwd+bwd"
    q, k, v = inputs(n, grad)
    kwargs = case_kwargs(kind, n)
    calls: dict[str, Callable[[], Tensor]] = {}
    for name in names:
        if name in ("cpu", "auto", "chunked"):
            calls[name] = lambda name=name: qkv.attention(q, k, v, backend=name, **kwargs)
        elif name == "prev":
            calls[name] = lambda: qkv.attention(q, k, v, backend="cpu", **kwargs)
        elif name == "sdpa":
            dense = dense_of(q, k, kwargs)
            calls[name] = lambda dense=dense: F.scaled_dot_product_attention(q, k, v, **dense)
        elif name == "flex":
            calls[name] = flex_call(q, k, v, kwargs)

    def with_backward(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
        def run() -> Tensor:
            out = fn()
            out.backward(torch.ones_like(out))
            q.grad = k.grad = v.grad = None
            return out

        return run

    if grad:
        calls = {name: with_backward(fn) for name, fn in calls.items()}
    if "prev" in calls:
        calls["prev"] = on_previous(calls["prev"])
    if "auto" in calls:
        request = build_request(q, k, v, **kwargs)
        print(f"    auto picks {select_backend(request).backend.name}")
    return calls


def flex_call(q: Tensor, k: Tensor, v: Tensor, kwargs: dict[str, Any]) -> Callable[[], Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask

    from qkv.bench.peers import compiled_flex

    request = build_request(q, k, v, **kwargs)
    block = None
    if request.mask_fn is not None:
        n = q.shape[2]
        block = create_block_mask(request.mask_fn, None, None, n, n, device="cpu")
    flex = compiled_flex()
    return lambda: flex(q, k, v, score_mod=request.score_mod, block_mask=block)


def interleaved(calls: dict[str, Callable[[], Tensor]], rounds: int) -> dict[str, float]:
    """Median seconds of each call, measured round-robin; the warm-up call is printed for flex
    (its compilation). A contestant whose warm-up fails is reported and left out."""
    for name, fn in list(calls.items()):
        start = time.perf_counter()
        try:
            fn()
        except Exception as error:  # e.g. inductor failing to compile a score function
            print(f"    {name} failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
            del calls[name]
            continue
        first = time.perf_counter() - start
        if name == "flex":
            print(f"    flex first call (compile + run): {first:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


#: At N = 16384 SDPA with a dense window or document mask takes 40-50x the kernel's time (8.5 s
#: forward, 28 s forward+backward on one thread): FlexAttention is the peer there, and SDPA is
#: timed without a mask and causal only.
CASES: list[tuple[str, int, str, list[str]]] = [
    ("window", 4096, "fwd", ["cpu", "flex", "sdpa", "auto", "chunked"]),
    ("window", 16384, "fwd", ["cpu", "flex", "auto", "chunked"]),
    ("documents", 4096, "fwd", ["cpu", "flex", "sdpa", "auto", "chunked"]),
    ("documents", 16384, "fwd", ["cpu", "flex", "auto", "chunked"]),
    ("causal", 4096, "fwd", ["cpu", "sdpa", "flex", "auto", "chunked"]),
    ("none", 4096, "fwd", ["cpu", "sdpa", "flex", "auto", "chunked"]),
    ("causal", 16384, "fwd", ["cpu", "sdpa", "auto"]),
    ("none", 16384, "fwd", ["cpu", "sdpa", "auto"]),
    ("causal", 4096, "fwd+bwd", ["cpu", "sdpa", "auto", "chunked"]),
    ("none", 4096, "fwd+bwd", ["cpu", "sdpa", "auto", "chunked"]),
    ("causal", 16384, "fwd+bwd", ["cpu", "sdpa", "auto"]),
    ("none", 16384, "fwd+bwd", ["cpu", "sdpa", "auto"]),
    ("window", 16384, "fwd+bwd", ["cpu", "auto", "chunked"]),
    ("documents", 16384, "fwd+bwd", ["cpu", "auto", "chunked"]),
    ("alibi", 4096, "fwd", ["cpu", "sdpa", "flex", "auto"]),
    ("relative", 4096, "fwd", ["cpu", "sdpa", "flex", "auto"]),
    ("relative", 4096, "fwd+bwd", ["cpu", "sdpa", "auto", "chunked"]),
]


def memory_bandwidth(megabytes: int = 256, rounds: int = 5) -> float:
    """Bytes/s of the best of ``rounds`` sums over a float32 tensor of ``megabytes``."""
    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


#: Decoding: (B, Nq, Nk) with GQA 32/8 and D = 128.
DECODE_CASES = [(1, 1, 4096), (1, 8, 4096), (8, 1, 4096), (1, 1, 32768), (1, 8, 32768)]


def decode_calls(q: Tensor, k: Tensor, v: Tensor) -> dict[str, Callable[[], Tensor]]:
    """The new queries see every cached key and each other causally (bottom-right aligned)."""
    nq, nk = q.shape[2], k.shape[2]
    keep = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)  # SDPA's is_causal is top-left
    sdpa_mask = None if nq == 1 else keep
    calls = {
        "cpu": lambda: qkv.attention(q, k, v, backend="cpu", causal="bottom_right"),
        "sdpa": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=sdpa_mask, enable_gqa=True
        ),
    }
    if PREVIOUS is not None:
        calls["prev"] = on_previous(calls["cpu"])
    return calls


def decode_table(rounds: int) -> None:
    """Few queries against a long K/V cache: cpu against SDPA (``enable_gqa``), as the bytes of
    K and V read per second and their fraction of the measured memory bandwidth."""
    bandwidth = memory_bandwidth()
    print(f"memory read bandwidth (sum over 256 MB, best of 5): {bandwidth / 1e9:.1f} GB/s")
    hq, hkv, d = 32, 8, 128
    for b, nq, nk in DECODE_CASES:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(b, hq, nq, d, generator=g).to(DTYPE)
        k, v = (torch.randn(b, hkv, nk, d, generator=g).to(DTYPE) for _ in range(2))
        kv_bytes = 2 * k.numel() * k.element_size()
        calls = decode_calls(q, k, v)
        med = interleaved(calls, rounds)
        cells = "  ".join(
            f"{name} {sec * 1e3:,.2f} ms = {kv_bytes / sec / 1e9:.1f} GB/s "
            f"({kv_bytes / sec / bandwidth:.0%})"
            for name, sec in med.items()
        )
        ratios = f"sdpa/cpu {med['sdpa'] / med['cpu']:.2f}x"
        if "prev" in med:
            ratios += f"  prev/cpu {med['prev'] / med['cpu']:.2f}x"
        print(f"decode B={b} Nq={nq} Nk={nk}: {cells}  {ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="only the N=4096 cases")
    parser.add_argument("--only", nargs="*", help="case kinds to run (window, documents, ...)")
    parser.add_argument("--sizes", nargs="*", type=int, help="sequence lengths to run")
    parser.add_argument("--skip", nargs="*", default=[], help="contestants to leave out")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--decode", action="store_true", help="only the decoding table")
    parser.add_argument(
        "--previous", metavar="REV", help="add the kernel of git revision REV as 'prev'"
    )
    args = parser.parse_args()
    global DTYPE, PREVIOUS
    DTYPE = getattr(torch, args.dtype)
    load = os.getloadavg()[0]
    threads = torch.get_num_threads()
    print(f"load average {load:.2f}, torch threads {threads}, rounds {args.rounds}, {args.dtype}")
    from qkv.backends.cpu import kernel_status
    from qkv.backends.cpu.backend import precision_note

    status = kernel_status()
    print(f"cpu kernel: {'ready' if status.ok else status.reason} ({status.seconds:.1f} s)")
    if (note := precision_note(DTYPE, 64, 256)) is not None:
        print(f"cpu kernel computes: {note}")
    if args.previous:
        PREVIOUS = build_previous(args.previous)
    if args.decode:
        decode_table(args.rounds)
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
        return
    rows = []
    for kind, n, mode, names in CASES:
        if (args.quick and n > 4096) or (args.only and kind not in args.only):
            continue
        if args.sizes and n not in args.sizes:
            continue
        names = [name for name in names if name not in args.skip]
        if PREVIOUS is not None:
            names.insert(1, "prev")
        print(f"{kind} N={n} {mode}", flush=True)
        calls = contestants(kind, n, mode, names)
        a, b = torch.randn(MM, MM).to(DTYPE), torch.randn(MM, MM).to(DTYPE)
        calls["matmul"] = lambda a=a, b=b: a @ b
        med = interleaved(calls, args.rounds)
        mm = 2 * MM**3 / med.pop("matmul")
        cells = "  ".join(f"{name} {sec * 1e3:,.1f} ms" for name, sec in med.items())
        rate = useful_flops(kind, n, mode) / med["cpu"]
        cells += (
            f"\n    cpu useful work {rate / 1e9:,.1f} GFLOP/s = {rate / mm:.0%} of the "
            f"{args.dtype} matmul rate in the same rounds ({mm / 1e9:,.0f} GFLOP/s)"
        )
        ratios = []
        if "prev" in med:
            ratios.append(f"prev/cpu {med['prev'] / med['cpu']:.2f}x")
        if "flex" in med:
            ratios.append(f"cpu/flex {med['cpu'] / med['flex']:.2f}x")
        if "sdpa" in med:
            ratios.append(f"cpu/sdpa {med['cpu'] / med['sdpa']:.2f}x")
            if "auto" in med:
                ratios.append(f"auto/sdpa {med['auto'] / med['sdpa']:.2f}x")
        if "auto" in med:  # against the fastest contestant that auto could have run
            peers = {k: t for k, t in med.items() if k in ("cpu", "sdpa", "chunked")}
            best = min(peers, key=peers.__getitem__)
            ratios.append(f"auto/fastest {med['auto'] / peers[best]:.2f}x ({best})")
        print(f"    {cells}\n    {'  '.join(ratios)}", flush=True)
        rows.append((kind, n, mode, med))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
