"""The functional core: attention, the classic score functions and RoPE as pure functions."""

from qkv.functional.attention import Explanation, attention, explain
from qkv.functional.rotary import apply_rotary, rotary_frequencies
from qkv.functional.score_functions import (
    additive_scores,
    concat_scores,
    cosine_scores,
    dot_scores,
    general_scores,
    scaled_dot_scores,
    score_attention,
)
from qkv.functional.weights import AttentionSummary, attention_summary, attention_weights

__all__ = [
    "AttentionSummary",
    "Explanation",
    "additive_scores",
    "apply_rotary",
    "attention",
    "attention_summary",
    "attention_weights",
    "concat_scores",
    "cosine_scores",
    "dot_scores",
    "explain",
    "general_scores",
    "rotary_frequencies",
    "scaled_dot_scores",
    "score_attention",
]
