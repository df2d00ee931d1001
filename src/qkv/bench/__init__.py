"""``qkv bench``: time and memory of every backend over a sweep, with ratios to SDPA.

Each case runs in a fresh subprocess on the CPU so its peak resident memory can be measured
against a baseline; on CUDA, the allocator's peak statistics are used instead.
"""

from qkv.bench.cases import MASK_KINDS, BenchCase, choose_backends, expand_sweep
from qkv.bench.peers import PEERS, matmul_tflops, memory_gbps
from qkv.bench.run import BenchResult, fill_matmul_share, run_sweep

__all__ = [
    "MASK_KINDS",
    "PEERS",
    "BenchCase",
    "BenchResult",
    "choose_backends",
    "expand_sweep",
    "fill_matmul_share",
    "matmul_tflops",
    "memory_gbps",
    "run_sweep",
]
