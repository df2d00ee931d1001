"""Decoding for :class:`~qkv.models.Seq2SeqModel`: greedy and batched beam search, both on the
model's incremental API (one token per step against a KV cache or recurrent state); and text
generation for decoder-only language models (:func:`generate`: greedy or sampled with
temperature, top-k and top-p, a KV cache per layer, left-padded batches, stop tokens).

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
from qkv.decode.sampling import CausalLM, Generation, generate, generate_steps, sample_next

__all__ = [
    "CausalLM",
    "Generation",
    "Hypothesis",
    "PrefixRecompute",
    "PrefixRecomputeState",
    "beam_search",
    "beam_search_hypotheses",
    "generate",
    "generate_steps",
    "greedy_decode",
    "length_penalty",
    "sample_next",
]
