"""Thin ``torch.nn`` modules over :func:`qkv.attention`: they own parameters and reshape, never
carry a second attention implementation."""

from qkv.nn.attention import Attention
from qkv.nn.kv_cache import KVCache
from qkv.nn.multihead import MultiHeadAttention
from qkv.nn.positional import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    alibi_slopes,
)
from qkv.nn.scored import AdditiveAttention, CosineAttention, LuongAttention
from qkv.nn.surgery import set_attention_backend, swap_attention

__all__ = [
    "AdditiveAttention",
    "Attention",
    "CosineAttention",
    "KVCache",
    "LearnedPositionalEmbedding",
    "LuongAttention",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "alibi_slopes",
    "set_attention_backend",
    "swap_attention",
]
