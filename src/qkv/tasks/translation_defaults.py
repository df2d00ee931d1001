"""Settings sized to the corpus: what ``qkv train translation`` picks for a small one, and why.

A user's corpus of a few hundred to a few thousand pairs (a product FAQ, a glossary) is not
WMT: an 8,000-subword vocabulary leaves most subwords seen once or never, and a fixed step
limit is either far too short or dozens of needless passes. :func:`size_to_data` fills in the choices
the user left open from the number of training pairs and says why; a choice the user made (a
flag, a ``model_overrides`` key, a ``vocab_size``, a ``preset``, a training limit) is never
changed.

The rules (``n``: training pairs; all of them apply below :data:`SMALL_CORPUS` pairs):

- **BPE vocabulary** ``min(8000, max(500, round(2 n, -2)))``: about two subwords per training
  pair (1,000 for 500 pairs, 4,000 for 2,000), so that most subwords occur several times.
- **model size** the ``tiny`` preset (:func:`sized_preset`): a few hundred thousand weights
  besides the embeddings, which a few thousand pairs can train in minutes on a CPU.
- **dropout** 0.1, not more (measured: within a budget of minutes the tiny model under-fits
  a small corpus; 0.3 scored lower).
- **shared vocabulary and tied embeddings** (already the defaults; reported, since
  ``--separate-vocab`` turns both off): one table learns from both sides' occurrences.
- **training** (:func:`sized_training`): a step budget of about :data:`EPOCHS` passes over the
  data (bounded to ``[1000, 8000]`` steps) at a peak learning rate of :data:`SMALL_LR` with a
  cosine decay over it, validation :data:`VALIDATIONS` times over it, and the weights of the
  best validation kept (500 number phrases peaked at step 600 of 1,000).
  Applied when the caller left the limits open (no ``--steps`` or ``--minutes``; no
  :class:`~qkv.train.TrainConfig` passed to the library), each field unless its flag is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qkv.tasks.translation import TranslationSettings

__all__ = [
    "EPOCHS",
    "SMALL_CORPUS",
    "SMALL_LR",
    "SizedChoices",
    "size_to_data",
    "sized_preset",
    "sized_training",
    "suggested_steps",
]

#: Below this many training pairs a corpus is small and the rules apply.
SMALL_CORPUS = 10_000

#: Passes over a small corpus the step budget aims at.
EPOCHS = 60

#: Validations over a sized step budget (the best one's weights are kept).
VALIDATIONS = 5

#: The peak learning rate of a sized run: the tiny model learns a small corpus faster with it
#: (500 Bible verses, 1,000 steps: validation chrF 16.8 against 12.9 at 1e-3 inverse-sqrt).
SMALL_LR = 3e-3

_DEFAULT_BPE = 8000
_DEFAULT_PRESET = "tiny"
#: Dropout of a sized run: the preset's 0.1, said and saved. Within a budget of minutes the
#: tiny model under-fits a small corpus rather than memorises it (500 Bible verses, 1,000
#: steps at 3e-3: validation chrF 19.1 at 0.1 against 16.8 at 0.3).
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
    """The model size (a preset name) for ``num_pairs`` training pairs: ``tiny`` below
    :data:`SMALL_CORPUS`. ``small`` (d_model 256, 3+3 layers against 64, 2+2) costs about 20
    times as much per step, and within a budget of minutes on a CPU the tiny model still
    under-fits a small corpus (on 500 and 2,000 Bible verses its best validation was the
    last), so the budget is better spent on passes over the data than on width."""
    return _DEFAULT_PRESET


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
    if settings.preset is None:
        preset = sized_preset(num_pairs)
        sizes = _preset_fields(settings, preset)
        overrides.update({k: v for k, v in sizes.items() if k not in settings.model_overrides})
        notes.append(
            f"  model size {preset} ({_describe(sizes)}): the next preset costs about 20 times "
            "as much per step, so within minutes on a CPU it sees the data far fewer times "
            "(--preset)"
        )
    if "dropout" not in settings.model_overrides:
        overrides["dropout"] = _SMALL_DROPOUT
        notes.append(
            f"  dropout {_SMALL_DROPOUT}, not more: within this budget the model under-fits a "
            "small corpus rather than memorises it (--dropout)"
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
    training = sized_training(num_pairs, settings.batch_size)
    notes.append(
        f"  {training['max_steps']} steps (about {EPOCHS} passes over the data) at a peak "
        f"learning rate of {SMALL_LR:g} decayed to zero by a cosine, validating every "
        f"{training['eval_every']} and keeping the best validation's weights (unless --steps "
        "or --minutes; --lr, --schedule, --eval-every, --no-keep-best)"
    )
    return SizedChoices(settings, overrides, training, notes)


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
