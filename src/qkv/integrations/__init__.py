"""qkv inside other libraries. Each submodule imports its library when imported itself:

- :mod:`qkv.integrations.hf`: ``attn_implementation="qkv"`` for Hugging Face ``transformers``
  models (``pip install -e '.[hf]'``).
"""
