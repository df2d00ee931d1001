"""Decoding for :class:`~qkv.models.Seq2SeqModel`: greedy and batched beam search, both on the
model's incremental API (one token per step against a KV cache or recurrent state).

::

    from qkv.decode import beam_search, greedy_decode

    ids = greedy_decode(model, source, max_len=40)                  # list of B id lists
    ids = beam_search(model, source, beam_size=4, length_penalty=0.6, max_len=40)

:class:`PrefixRecompute` wraps a model so that every step recomputes the decoder over the whole
prefix instead: the no-cache baseline for tests and ``benchmarks/beam_cache.py``.
"""

from qkv.decode.beam import Hypothesis, beam_search, beam_search_hypotheses, length_penalty
from qkv.decode.greedy import greedy_decode
from qkv.decode.recompute import PrefixRecompute, PrefixRecomputeState

__all__ = [
    "Hypothesis",
    "PrefixRecompute",
    "PrefixRecomputeState",
    "beam_search",
    "beam_search_hypotheses",
    "greedy_decode",
    "length_penalty",
]
