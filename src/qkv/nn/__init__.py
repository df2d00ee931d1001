"""Thin ``torch.nn`` modules over :func:`qkv.attention`: they own parameters, never a second
attention implementation."""
