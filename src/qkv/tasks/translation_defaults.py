"""Settings sized to the corpus: what ``qkv train translation`` picks for a small one, and why.

A user's corpus of a few hundred to a few thousand pairs (a product FAQ, a glossary) is not
WMT: an 8,000-subword vocabulary leaves most subwords seen once or never, and a fixed step
limit is either far too short or dozens of needless passes. :func:`size_to_data` fills in the
choices the user left open from the number of training pairs and says why; a choice the user
made (a flag, a ``model_overrides`` key, a ``vocab_size``, a ``batch_size``, a ``preset``, a
training limit) is never changed.

The rules (``n``: training pairs; all of them apply below :data:`SMALL_CORPUS` pairs):

- **BPE vocabulary** ``min(8000, max(500, round(2 n, -2)))``: about two subwords per training
  pair (1,000 for 500 pairs, 4,000 for 2,000), so that most subwords occur several times.
- **batch size** :data:`SMALL_BATCH` pairs (not 64): twice the updates per pass at about half
  the cost each (500 Bible verses, 1,000 steps: validation chrF 19.2 at 32 in 161 s against
  19.1 at 64 in 479 s; test chrF 21.9 against 21.4).
- **model size** the ``tiny`` preset's depth (2+2 layers, 4 heads) at a width of
  :data:`SMALL_WIDTH` (:func:`sized_preset`, :func:`sized_model`): about twice the cost per
  step of width 64 and a better model within the same minutes (500 Bible verses, batch 32,
  1,000 steps: best validation chrF 21.7 against 19.2); the ``small`` preset (d_model 256,
  3+3 layers) costs about 20 times as much per step as ``tiny``.
- **dropout** 0.1, not more (measured: 0.3 scored lower within the budget; the best
  validation's weights are kept, which stops a model that starts to memorise).
- **shared vocabulary and tied embeddings** (already the defaults; reported, since
  ``--separate-vocab`` turns both off): one table learns from both sides' occurrences.
- **translation memory** (:mod:`qkv.tasks.translation_memory`, ``memory``) off
  (:data:`SMALL_MEMORY`): among a few hundred Bible verses the nearest training verse is rarely
  close (median leave-one-out chrF 32 at 500 verses), and ``--memory`` reached a best
  validation chrF of 21.0 (21.6 with ``--copy``) against 21.7 without at 500 verses, 29.2
  against 30.1 at 2,000, in about twice the time (the input is twice as long); said, and saved
  as ``memory=False``.
- **training** (:func:`sized_training`): a step budget of about :data:`EPOCHS` passes over the
  data (bounded to ``[1000, 8000]`` steps) at a peak learning rate of :data:`SMALL_LR` with a
  cosine decay over it, validation :data:`VALIDATIONS` times over it, and the weights of the
  best validation kept. For 2,000 pairs (1,900 after validation) that is 3,000 steps, about
  15 minutes on one CPU thread (852 s on a loaded machine): 2,000 Bible verses reached a
  best validation chrF of 30.1 (25.4 with the earlier defaults: batch 64, width 64, 1,800
  steps) and a test BLEU / chrF of 10.89 / 33.5 against 7.69 / 28.7, above the retrieval
  baseline's 8.14 / 31.7 (docs/small-corpus.md; 500 verses stay below it). Applied when the
  caller left the limits open (no ``--steps`` or ``--minutes``; no
  :class:`~qkv.train.TrainConfig` passed to the library), each field unless its flag is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qkv.tasks.translation import TranslationSettings

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "EPOCHS",
    "SMALL_BATCH",
    "SMALL_CORPUS",
    "SMALL_LR",
    "SMALL_MEMORY",
    "SMALL_WIDTH",
    "SizedChoices",
    "size_to_data",
    "sized_model",
    "sized_preset",
    "sized_training",
    "suggested_steps",
]

#: Below this many training pairs a corpus is small and the rules apply.
SMALL_CORPUS = 10_000

#: Passes over a small corpus the step budget aims at (at :data:`SMALL_BATCH` pairs a batch,
#: 3,000 steps for 2,000 pairs).
EPOCHS = 50

#: Pairs per batch of a sized run (``batch_size`` left open).
SMALL_BATCH = 32

#: Pairs per batch when ``batch_size`` is left open and the corpus is not sized.
DEFAULT_BATCH_SIZE = 64

#: The model width (``d_model``) of a sized Transformer, at the ``tiny`` preset's depth.
SMALL_WIDTH = 128

#: Whether a sized run gives the model a translation memory
#: (:mod:`qkv.tasks.translation_memory`) when ``memory`` is left open.
SMALL_MEMORY = False

#: Validations over a sized step budget (the best one's weights are kept).
VALIDATIONS = 5

#: The peak learning rate of a sized run: the tiny model learns a small corpus faster with it
#: (500 Bible verses, 1,000 steps: validation chrF 16.8 against 12.9 at 1e-3 inverse-sqrt).
SMALL_LR = 3e-3

_DEFAULT_BPE = 8000
_DEFAULT_PRESET = "tiny"
#: Dropout of a sized run: the preset's 0.1, said and saved (500 Bible verses, 1,000 steps at
#: 3e-3: validation chrF 19.1 at 0.1 against 16.8 at 0.3 at width 64 and batch 64, 21.7
#: against 21.3 at width 128 and batch 32).
_SMALL_DROPOUT = 0.1


@dataclass(frozen=True)
class SizedChoices:
    """What :func:`size_to_data` picked.

    Attributes:
        settings: the settings with ``vocab_size`` filled in (saved; a resumed run reads it
            back).
        model_overrides: model config fields to build with (saved in the model's config, not
            in the settings, so that resuming with the same settings is not a change).
        training: :class:`~qkv.train.TrainConfig` fields sized to the corpus, applied when
            the caller left the limits open (see :class:`qkv.tasks.base.Prepared`).
        notes: one line per choice saying what was picked and why (nothing for a large
            corpus or with ``size_defaults=False``).
    """

    settings: TranslationSettings
    model_overrides: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def suggested_steps(num_pairs: int, batch_size: int) -> int:
    """About :data:`EPOCHS` passes over ``num_pairs`` in batches of ``batch_size``, within
    ``[1000, 8000]`` steps."""
    steps = EPOCHS * max(1, -(-num_pairs // batch_size))
    return int(min(8000, max(1000, round(steps, -2))))


def sized_training(num_pairs: int, batch_size: int) -> dict[str, Any]:
    """The :class:`~qkv.train.TrainConfig` fields a corpus of ``num_pairs`` trains with: the
    step budget of :func:`suggested_steps` (and no time limit), a peak learning rate of
    :data:`SMALL_LR` decayed to zero over the budget (a cosine, which a known budget allows),
    :data:`VALIDATIONS` validations over it, and the best validation's weights kept."""
    steps = suggested_steps(num_pairs, batch_size)
    return {
        "max_steps": steps,
        "max_minutes": None,
        "lr": SMALL_LR,
        "schedule": "cosine",
        "eval_every": max(1, steps // VALIDATIONS),
        "keep_best": True,
    }


def sized_preset(num_pairs: int) -> str:
    """The preset (a model size by name) whose depth a corpus of ``num_pairs`` training pairs
    gets: ``tiny`` below :data:`SMALL_CORPUS` (:func:`sized_model` widens it)."""
    return _DEFAULT_PRESET


def sized_model(settings: TranslationSettings, num_pairs: int) -> dict[str, Any]:
    """The model size fields for ``num_pairs`` training pairs: the :func:`sized_preset`'s, with
    a Transformer's ``d_model`` at :data:`SMALL_WIDTH` (an RNN keeps the preset's sizes).

    Within a budget of minutes on a CPU a small corpus is better served by a model between
    ``tiny`` (d_model 64, 2+2 layers) and ``small`` (256, 3+3; about 20 times the cost per
    step of ``tiny``): on 500 Bible verses at batch 32, 1,000 steps, width 128 reached a best
    validation chrF of 21.7 against 19.2 at width 64, in 305 s against 161 s."""
    sizes = _preset_fields(settings, sized_preset(num_pairs))
    if settings.model == "transformer":
        sizes["d_model"] = SMALL_WIDTH
    return sizes


def size_to_data(settings: TranslationSettings, num_pairs: int) -> SizedChoices:
    """The open choices sized to ``num_pairs`` training pairs (see the module's rules)."""
    if not settings.size_defaults or num_pairs >= SMALL_CORPUS:
        return SizedChoices(settings)
    notes = [
        f"a small corpus ({num_pairs} training pairs): sizing the choices left open to it "
        "(--no-size-defaults keeps every default as it is)"
    ]
    overrides: dict[str, Any] = {}
    if settings.tokenizer_mode == "bpe" and settings.vocab_size is None:
        vocab = int(min(_DEFAULT_BPE, max(500, round(2 * num_pairs, -2))))
        settings = replace(settings, vocab_size=vocab)
        notes.append(
            f"  BPE vocabulary {vocab} (not {_DEFAULT_BPE}): about two subwords per pair, so "
            "most subwords are seen several times (--vocab-size)"
        )
    if settings.batch_size is None:
        settings = replace(settings, batch_size=SMALL_BATCH)
        notes.append(
            f"  batch size {SMALL_BATCH} (not {DEFAULT_BATCH_SIZE}): twice the updates per pass "
            "over the data at about half the cost each (--batch-size)"
        )
    if settings.preset is None:
        sizes = sized_model(settings, num_pairs)
        overrides.update({k: v for k, v in sizes.items() if k not in settings.model_overrides})
        shown = {**sizes, **{k: v for k, v in settings.model_overrides.items() if k in sizes}}
        if settings.model == "transformer":
            why = (
                f" (the {sized_preset(num_pairs)} preset's depth, wider): about twice the cost "
                "per step of width 64 and a better model within the same minutes; the small "
                "preset costs about 20 times as much as tiny (--preset, --d-model)"
            )
        else:
            why = f" (the {sized_preset(num_pairs)} preset; --preset)"
        notes.append(f"  model size {_describe(shown)}{why}")
    if "dropout" not in settings.model_overrides:
        overrides["dropout"] = _SMALL_DROPOUT
        notes.append(
            f"  dropout {_SMALL_DROPOUT}, not more: more scored lower within this budget, and "
            "the best validation's weights are kept (--dropout)"
        )
    if settings.shared_vocab and settings.model == "transformer":
        notes.append(
            "  one shared vocabulary with tied source, target and output embeddings: every "
            "table learns from both sides (--separate-vocab turns this off)"
        )
    if settings.memory is None:
        settings = replace(settings, memory=SMALL_MEMORY)
        notes.append(_memory_note(SMALL_MEMORY))
    if not settings.copy:
        notes.append(
            "  consider --copy (copy attention) when targets repeat names, numbers or terms "
            "of their sources"
        )
    batch = settings.batch_size if settings.batch_size is not None else DEFAULT_BATCH_SIZE
    training = sized_training(num_pairs, batch)
    notes.append(
        f"  {training['max_steps']} steps (about {EPOCHS} passes over the data, bounded to "
        f"1000-8000) at a peak learning rate of {SMALL_LR:g} decayed to zero by a cosine, "
        f"validating every {training['eval_every']} and keeping the best validation's weights "
        "(unless --steps or --minutes; --lr, --schedule, --eval-every, --no-keep-best)"
    )
    return SizedChoices(settings, overrides, training, notes)


def _memory_note(memory: bool) -> str:
    if memory:
        return (
            "  a translation memory (neural fuzzy repair): each source is given with the target "
            "of the most similar training pair, which the model learns to repair "
            "(--no-memory, --memory-threshold)"
        )
    return (
        "  no translation memory: it scored lower by validation on 500 and 2000 Bible verses, "
        "whose nearest training verses are rarely close, and costs about twice the time; try "
        "it when many sentences have a near twin among the training pairs (--memory)"
    )


def _preset_fields(settings: TranslationSettings, preset: str) -> dict[str, Any]:
    """The size fields of ``preset`` for the settings' model kind."""
    from qkv.models import RNNConfig, TransformerConfig

    kind = TransformerConfig if settings.model == "transformer" else RNNConfig
    return dict(kind.presets[preset])


def _describe(sizes: dict[str, Any]) -> str:
    if "d_model" in sizes:
        layers = f"{sizes.get('num_encoder_layers')}+{sizes.get('num_decoder_layers')}"
        return f"d_model {sizes['d_model']}, {layers} layers, {sizes.get('num_heads')} heads"
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sizes.items())
