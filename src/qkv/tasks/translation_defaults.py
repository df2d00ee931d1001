"""Settings sized to the corpus: what ``qkv train translation`` picks for a small one, and why.

A user's corpus of a few hundred to a few thousand pairs (a product FAQ, a glossary) is not
WMT: an 8,000-subword vocabulary leaves most subwords seen once or never, and a model with
little dropout memorises the training pairs within a few hundred steps. :func:`size_to_data`
fills in the choices the user left open from the number of training pairs and says why; a
choice the user made (a flag, a ``model_overrides`` key, a ``vocab_size``) is never changed.

The rules (``n``: training pairs; all of them apply below :data:`SMALL_CORPUS` pairs):

- **BPE vocabulary** ``min(8000, max(500, round(2 n, -2)))``: about two subwords per training
  pair (1,000 for 500 pairs, 4,000 for 2,000), so that most subwords occur several times.
- **dropout** 0.3 (instead of the preset's 0.1) below :data:`SMALL_CORPUS` pairs.
- **shared vocabulary and tied embeddings** (already the defaults; reported, since
  ``--separate-vocab`` turns both off): one table learns from both sides' occurrences.
- **step budget**: a suggestion of about :data:`EPOCHS` passes over the data (bounded to
  ``[1000, 8000]`` steps), printed; the step limit itself stays ``--steps``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qkv.tasks.translation import TranslationSettings

__all__ = ["EPOCHS", "SMALL_CORPUS", "size_to_data", "suggested_steps"]

#: Below this many training pairs a corpus is small and the rules apply.
SMALL_CORPUS = 10_000

#: Passes over a small corpus the suggested step budget aims at.
EPOCHS = 60

_DEFAULT_BPE = 8000
_SMALL_DROPOUT = 0.3


def suggested_steps(num_pairs: int, batch_size: int) -> int:
    """About :data:`EPOCHS` passes over ``num_pairs`` in batches of ``batch_size``, within
    ``[1000, 8000]`` steps."""
    steps = EPOCHS * max(1, -(-num_pairs // batch_size))
    return int(min(8000, max(1000, round(steps, -2))))


def size_to_data(
    settings: TranslationSettings, num_pairs: int
) -> tuple[TranslationSettings, dict[str, Any], list[str]]:
    """The open choices sized to ``num_pairs`` training pairs.

    Returns:
        ``settings`` with ``vocab_size`` filled in (saved; a resumed run reads it back), the
        model config overrides to build with (saved in the model's config, not in the
        settings, so that resuming with the same settings is not a change), and one line per
        choice saying what was picked and why (nothing for a large corpus or with
        ``size_defaults=False``).
    """
    overrides: dict[str, Any] = {}
    if not settings.size_defaults or num_pairs >= SMALL_CORPUS:
        return settings, overrides, []
    notes = [f"a small corpus ({num_pairs} training pairs): sizing the choices left open to it"]
    if settings.tokenizer_mode == "bpe" and settings.vocab_size is None:
        vocab = int(min(_DEFAULT_BPE, max(500, round(2 * num_pairs, -2))))
        settings = replace(settings, vocab_size=vocab)
        notes.append(
            f"  BPE vocabulary {vocab} (not {_DEFAULT_BPE}): about two subwords per pair, so "
            "most subwords are seen several times (--vocab-size)"
        )
    if "dropout" not in settings.model_overrides:
        overrides["dropout"] = _SMALL_DROPOUT
        notes.append(
            f"  dropout {_SMALL_DROPOUT} (not the preset's): a small corpus is memorised "
            "quickly without it (--dropout)"
        )
    if settings.shared_vocab and settings.model == "transformer":
        notes.append(
            "  one shared vocabulary with tied source, target and output embeddings: every "
            "table learns from both sides (--separate-vocab turns this off)"
        )
    if not settings.copy:
        notes.append(
            "  consider --copy (copy attention) when targets repeat names, numbers or terms "
            "of their sources"
        )
    steps = suggested_steps(num_pairs, settings.batch_size)
    notes.append(
        f"  about {steps} steps ({EPOCHS} passes over the data) suit this corpus (--steps)"
    )
    notes.append("  (--no-size-defaults keeps every default as it is)")
    return settings, overrides, notes
