"""GPU benchmark: the triton backend against PyTorch's SDPA (each backend forced) and FlexAttention.

Run on a CUDA machine (``benchmarks/gpu_check.sh`` runs it after the GPU tests)::

    python benchmarks/gpu_bench.py --dtypes bf16 fp16 --head-dims 64 128 --lengths 1024 ... 16384

For every (dtype, D, N, mask kind, pass) it prints TFLOP/s counting only unmasked work
(``4 * pairs * D`` forward, ``10 * pairs * D`` backward, where ``pairs`` is the number of
visible (query, key) pairs), and the percentage of a bf16 matmul rate measured in the same run.
The batch is sized so that every row holds ``B * N = 16384`` tokens, with ``H * D = 2048``.

Mask kinds: ``none``; ``causal``; ``window`` (causal sliding window of 1024 keys); ``documents``
(16 equal packed documents, causal inside each). SDPA-flash serves only none/causal; the other
SDPA backends get a dense boolean mask for window/documents. Block masks (ours and
FlexAttention's) are built once per shape, outside the timings, as FlexAttention recommends.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from qkv.bench.peers import compiled_flex, matmul_tflops, sdpa_forced

TOKENS, WIDTH, WINDOW, DOCUMENTS = 16384, 2048, 1024, 16
#: SDPA's cuDNN/efficient backends with a dense mask run only up to this N (they are far behind).
DENSE_MASK_MAX_N = 4096
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (device events, after warm-up)."""
    from triton.testing import do_bench

    fn()  # compile / autotune outside the timing
    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


def visible_pairs(kind: str, n: int) -> int:
    if kind == "none":
        return n * n
    if kind == "causal":
        return n * (n + 1) // 2
    if kind == "window":
        return sum(min(i + 1, WINDOW) for i in range(n))
    if kind == "documents":
        length = n // DOCUMENTS
        return DOCUMENTS * length * (length + 1) // 2
    raise ValueError(kind)


def mask_fn(kind: str, n: int) -> Callable[..., Tensor] | None:
    """The mask as a (b, h, q, kv) function; None for none/causal (passed as causal flags)."""
    if kind == "window":
        return lambda b, h, q, kv: (kv <= q) & (q - kv < WINDOW)
    if kind == "documents":
        doc = torch.arange(n, device="cuda") // (n // DOCUMENTS)
        return lambda b, h, q, kv: (kv <= q) & (doc[q] == doc[kv])
    return None


class Case:
    """Inputs and the callables of every implementation for one (dtype, D, N, mask)."""

    def __init__(self, dtype: torch.dtype, head_dim: int, n: int, kind: str) -> None:
        self.kind, self.n, self.head_dim = kind, n, head_dim
        self.batch, self.heads = max(1, TOKENS // n), WIDTH // head_dim
        shape = (self.batch, self.heads, n, head_dim)
        self.q, self.k, self.v = (
            torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)
        )
        self.dout = torch.randn(shape, device="cuda", dtype=dtype)
        self.fn = mask_fn(kind, n)

    @property
    def pairs(self) -> int:
        return self.batch * self.heads * visible_pairs(self.kind, self.n)

    def triton(self) -> Callable[[], Tensor]:
        from qkv.backends.block_mask import build_block_mask
        from qkv.backends.triton.launch import triton_attention
        from qkv.request import build_request

        if self.fn is None:
            causal = self.kind == "causal"
            return lambda: triton_attention(build_request(self.q, self.k, self.v, causal=causal))
        bm = build_block_mask(self.fn, q_len=self.n, kv_len=self.n, device="cuda")
        return lambda: triton_attention(build_request(self.q, self.k, self.v, mask=bm))

    def sdpa(self, backend: str) -> Callable[[], Tensor] | None:
        """SDPA with its kernel ``backend`` (flash, cudnn, efficient) forced."""
        mask = None
        if self.fn is not None:
            if backend == "flash":
                return None  # flash takes no mask tensor
            if self.n > DENSE_MASK_MAX_N:
                return None  # 10-70 TFLOP/s at 4k already; an N^2 mask is minutes at 16k
            i = torch.arange(self.n, device="cuda")
            mask = self.fn(None, None, i[:, None], i[None, :])
        causal = self.kind == "causal"
        return sdpa_forced(
            f"sdpa-{backend}", self.q, self.k, self.v, attn_mask=mask, is_causal=causal
        )

    def flex(self) -> Callable[[], Tensor]:
        from torch.nn.attention.flex_attention import create_block_mask

        compiled = compiled_flex()
        fn = self.fn
        if fn is None and self.kind == "causal":

            def fn(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
                return kv <= q

        block = None
        if fn is not None:
            block = create_block_mask(fn, None, None, self.n, self.n, device="cuda")
        return lambda: compiled(self.q, self.k, self.v, block_mask=block)


def implementation(case: Case, impl: str) -> Callable[[], Tensor] | None:
    if impl == "triton":
        return case.triton()
    if impl == "flex":
        return case.flex()
    return case.sdpa(impl)


def timings(case: Case, impl: Callable[[], Tensor] | None) -> tuple[float | None, float | None]:
    """Forward and backward milliseconds, or None where the implementation cannot run."""
    if impl is None:
        return None, None
    try:
        with torch.no_grad():
            forward = bench(impl)
        out = impl()
        backward = bench(lambda: out.backward(case.dout, retain_graph=True))
        for t in (case.q, case.k, case.v):
            t.grad = None
        return forward, backward
    except Exception as error:  # an SDPA backend refusing the shape or mask, out of memory
        print(f"#   {type(error).__name__}: {str(error).splitlines()[0][:120]}", file=sys.stderr)
        torch.cuda.empty_cache()
        return None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=list(DTYPES))
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--masks", nargs="+", default=["none", "causal", "window", "documents"])
    parser.add_argument(
        "--impls", nargs="+", default=["triton", "flash", "cudnn", "efficient", "flex"]
    )
    parser.add_argument("--flex-dtypes", nargs="+", default=["bf16"], choices=list(DTYPES))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--budget-s", type=float, default=0, help="start no new case after this many seconds"
    )
    parser.add_argument("--flex-head-dims", nargs="+", type=int, default=[64, 128])
    args = parser.parse_args()

    import triton

    print(
        f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    )
    peak = matmul_tflops("cuda")
    print(f"# bf16 matmul 8192^3: {peak:.0f} TFLOP/s")
    impls = args.impls
    header = ["dtype", "D", "N", "mask", "pass", *impls, "vs flash", "vs flex", "% matmul"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = []
    start = time.perf_counter()
    for dname in args.dtypes:
        for head_dim in args.head_dims:
            for n in args.lengths:
                for kind in args.masks:
                    if args.budget_s and time.perf_counter() - start > args.budget_s:
                        print(f"# time budget reached: skipped {dname} D={head_dim} N={n} {kind}")
                        continue
                    case = Case(DTYPES[dname], head_dim, n, kind)
                    result: dict[str, tuple[float | None, float | None]] = {}
                    for impl in impls:
                        flex_off = (
                            dname not in args.flex_dtypes or head_dim not in args.flex_head_dims
                        )
                        if impl == "flex" and flex_off:
                            result[impl] = (None, None)
                            continue
                        try:
                            fn = implementation(case, impl)
                        except Exception as error:
                            print(f"# {impl}: {error}", file=sys.stderr)
                            fn = None
                        result[impl] = timings(case, fn)
                    for p, (label, flops) in enumerate((("fwd", 4), ("bwd", 10))):
                        work = flops * case.pairs * head_dim
                        rate = {
                            i: (work / ms / 1e9 if ms else None)
                            for i, ms in ((i, result[i][p]) for i in impls)
                        }

                        def ratio(other: str, rate: dict[str, float | None] = rate) -> str:
                            a, b = rate.get("triton"), rate.get(other)
                            return f"{a / b:.2f}x" if a and b else "-"

                        share = f"{100 * rate['triton'] / peak:.0f}%" if rate.get("triton") else "-"
                        cells = [f"{rate[i]:.0f}" if rate[i] else "-" for i in impls]
                        line = [dname, str(head_dim), str(n), kind, label, *cells]
                        line += [ratio("flash"), ratio("flex"), share]
                        print("| " + " | ".join(line) + " |", flush=True)
                        rows.append(
                            {
                                "dtype": dname,
                                "D": head_dim,
                                "N": n,
                                "mask": kind,
                                "pass": label,
                                "tflops": rate,
                                "peak": peak,
                            }
                        )
                    del case
                    torch.cuda.empty_cache()
                    if args.json:
                        args.json.write_text(json.dumps(rows, indent=1))
    from qkv.backends.triton.tuning import TUNED

    for key, config in TUNED.items():
        print(f"# tuned {key[0]} D={key[1]} Dv={key[2]} {key[3]}: {config}")


if __name__ == "__main__":
    main()
