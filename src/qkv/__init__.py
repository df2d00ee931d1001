"""qkv: exact, fast attention for PyTorch.

``qkv.attention(q, k, v, ...)`` is the function; :mod:`qkv.masks` and :mod:`qkv.scores` describe
what to mask and how to modify scores; :mod:`qkv.backends` holds the implementations and their
dispatch; :mod:`qkv.nn` the modules.
"""

from qkv import masks, nn, scores
from qkv._version import __version__
from qkv.backends import available_backends, register_backend
from qkv.functional import (
    AttentionSummary,
    Explanation,
    attention,
    attention_summary,
    attention_weights,
    explain,
)

__all__ = [
    "AttentionSummary",
    "Explanation",
    "__version__",
    "attention",
    "attention_summary",
    "attention_weights",
    "available_backends",
    "explain",
    "masks",
    "nn",
    "register_backend",
    "scores",
]
