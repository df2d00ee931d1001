"""The functional core: attention and the classic score functions as pure functions."""

from qkv.functional.attention import Explanation, attention, explain

__all__ = ["Explanation", "attention", "explain"]
