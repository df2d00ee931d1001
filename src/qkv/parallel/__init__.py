"""Context parallelism: exact attention over a sequence sharded across processes.

:func:`context_parallel_attention` (also ``qkv.parallel.attention``) runs on every rank with
that rank's shards of ``q``, ``k``, ``v`` and the mask, bias and causal arguments of the whole
sequence; :func:`shard` and :func:`unshard` cut and join sequences in the contiguous and zigzag
layouts. See ``docs/parallel.md``.
"""

from qkv.parallel.attention import (
    ContextParallel,
    Method,
    context_parallel_attention,
    global_lengths,
    merge,
)
from qkv.parallel.comm import CommEvent, CommStats, gather_sequence, sum_over_ranks
from qkv.parallel.layout import LayoutKind, SequenceLayout, shard, unshard

attention = context_parallel_attention

__all__ = [
    "CommEvent",
    "CommStats",
    "ContextParallel",
    "LayoutKind",
    "Method",
    "SequenceLayout",
    "attention",
    "context_parallel_attention",
    "gather_sequence",
    "global_lengths",
    "merge",
    "shard",
    "sum_over_ranks",
    "unshard",
]
