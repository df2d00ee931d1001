"""Abstractive summarization with a pointer-generator: train, save, summarize, evaluate (ROUGE).

::

    from qkv.tasks import train_task
    from qkv.tasks.summarization import SummarizationSettings, Summarizer, evaluate_summarizer

    settings = SummarizationSettings(data="builtin:docstrings")
    train_task("summarization", settings, TrainConfig(max_minutes=20), "runs/doc")
    summarizer = Summarizer.load("runs/doc")
    summarizer.summarize(["Return the sum of the items; raise ValueError if empty."])
    evaluate_summarizer(summarizer, load_documents("builtin:docstrings").test)

The model is :class:`qkv.models.pointer.PointerGenerator` (docs/summarization.md says why).
Its vocabulary is **word-level** (lowercased; ``\\w+`` runs and punctuation runs, a
``tokenizers`` ``WordLevel`` model saved as ``tokenizer.json``) because copying needs words the
fixed vocabulary lacks: each example's out-of-vocabulary source words get the extended ids
``V, V + 1, ...`` (:func:`encode_with_oov`), a target word found among them is trained as a
copy, and decoding maps an extended id back to the source word. (With byte-level BPE no word is
ever out of vocabulary, and the pointer would only copy subword pieces.)

Modules, one concern each: :mod:`~.vocab` (the word vocabulary and OOV ids),
:mod:`~.batches` (padded batches), :mod:`~.decoding` (the pointer-generator's own greedy
decoder), :mod:`~.metrics` (ROUGE, lead baseline), :mod:`~.task` (loss, validation, settings,
the :class:`~qkv.tasks.base.TaskSpec`), :mod:`~.inference` (:class:`Summarizer`).

Shapes: ``B`` examples, ``Ns`` / ``Nt`` longest document / summary, ``V`` vocabulary, ``X`` the
most OOV words of any document in the batch.
"""

from qkv.tasks.summarization.batches import PointerBatch, PointerDataset, collate_pointer
from qkv.tasks.summarization.decoding import decode_dataset, pointer_greedy_decode
from qkv.tasks.summarization.inference import Summarizer, Summary, evaluate_summarizer
from qkv.tasks.summarization.metrics import lead_baseline, rouge_scores
from qkv.tasks.summarization.task import (
    SPEC,
    SummarizationSettings,
    SummarizationSetup,
    SummarizationSpec,
    SummarizationTask,
    lead_sentences_for,
)
from qkv.tasks.summarization.vocab import (
    EncodedText,
    detokenize,
    encode_target,
    encode_with_oov,
    ids_to_words,
    train_word_tokenizer,
)

__all__ = [
    "SPEC",
    "EncodedText",
    "PointerBatch",
    "PointerDataset",
    "SummarizationSettings",
    "SummarizationSetup",
    "SummarizationSpec",
    "SummarizationTask",
    "Summarizer",
    "Summary",
    "collate_pointer",
    "decode_dataset",
    "detokenize",
    "encode_target",
    "encode_with_oov",
    "evaluate_summarizer",
    "ids_to_words",
    "lead_baseline",
    "lead_sentences_for",
    "pointer_greedy_decode",
    "rouge_scores",
    "train_word_tokenizer",
]
