"""``qkv bench``: time and memory of every backend over a sweep, with ratios to SDPA.

Each case runs in a fresh subprocess on the CPU so its peak resident memory can be measured
against a baseline; on CUDA, the allocator's peak statistics are used instead.
"""

from qkv.bench.cases import MASK_KINDS, BenchCase, expand_sweep
from qkv.bench.run import BenchResult, run_sweep

__all__ = ["MASK_KINDS", "BenchCase", "BenchResult", "expand_sweep", "run_sweep"]
