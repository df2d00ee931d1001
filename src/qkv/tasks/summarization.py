"""Abstractive summarization with a pointer-generator: train, save, summarize, evaluate (ROUGE).

::

    from qkv.tasks.summarization import train_summarization, Summarizer, evaluate_summarizer

    train_summarization("builtin:docstrings", "runs/doc", train=TrainConfig(max_minutes=20))
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

Training runs through the shared :class:`qkv.train.Trainer` with :class:`SummarizationTask`
(summed negative log-likelihood of the summary tokens, plus the coverage loss when enabled;
validation decodes greedily and reports ROUGE-L, which early stopping watches).

Shapes: ``B`` examples, ``Ns`` / ``Nt`` longest document / summary, ``V`` vocabulary, ``X`` the
most OOV words of any document in the batch.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from qkv.data.batching import BucketBatchSampler
from qkv.data.labeled import load_documents
from qkv.data.parallel import Pair
from qkv.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    PairTokenizer,
    TextTokenizer,
    pad_ids,
)
from qkv.models.pointer import PointerGenerator, PointerGeneratorConfig
from qkv.train import (
    LossOutput,
    ModelFolderError,
    SamplerBatches,
    TrainConfig,
    Trainer,
    TrainResult,
    load_model,
    load_training_state,
    prepare_output_folder,
    read_config,
    save_model_folder,
)
from qkv.train.trainer import EvalReport, StepReport

__all__ = [
    "EncodedText",
    "PointerBatch",
    "PointerDataset",
    "SummarizationSetup",
    "SummarizationTask",
    "Summarizer",
    "collate_pointer",
    "detokenize",
    "encode_with_oov",
    "evaluate_summarizer",
    "greedy_decode",
    "lead_baseline",
    "rouge_scores",
    "train_summarization",
    "train_word_tokenizer",
]

logger = logging.getLogger(__name__)

TASK_NAME = "summarization"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_NO_SPACE_BEFORE = re.compile(r" ([.,;:!?)\]}'])")
_NO_SPACE_AFTER = re.compile(r"([(\[{]) ")


# --------------------------------------------------------------------------------------------
# Word vocabulary with per-example OOV ids


def _word_tokenizer(vocab: dict[str, int]) -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def train_word_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 20_000, min_frequency: int = 1
) -> TextTokenizer:
    """A lowercased word-level tokenizer of the ``vocab_size`` most frequent words.

    Ties in frequency are broken by the word, so the vocabulary is the same on every run.

    Raises:
        ValueError: ``vocab_size`` does not exceed the four special tokens.
    """
    from tokenizers import pre_tokenizers

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size ({vocab_size}) must exceed the {len(SPECIAL_TOKENS)} specials"
        )
    split = pre_tokenizers.Whitespace()
    counts = Counter(w for text in texts for w, _ in split.pre_tokenize_str(text.lower()))
    words = sorted(
        (w for w, n in counts.items() if n >= min_frequency and w not in SPECIAL_TOKENS),
        key=lambda w: (-counts[w], w),
    )[: vocab_size - len(SPECIAL_TOKENS)]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    return TextTokenizer(_word_tokenizer(vocab))


@dataclass(frozen=True)
class EncodedText:
    """One text in the fixed and the extended vocabulary.

    Attributes:
        ids: fixed-vocabulary ids (OOV words as ``<unk>``).
        ext_ids: the same with OOV word ``j`` as ``V + j``.
        oovs: the OOV words, in order of first appearance.
        words: every word as read (lowercased), one per id.
    """

    ids: list[int]
    ext_ids: list[int]
    oovs: list[str]
    words: list[str]


def encode_with_oov(
    tokenizer: TextTokenizer, text: str, max_length: int | None = None
) -> EncodedText:
    """Tokenize ``text`` (cut to ``max_length`` words) with per-text OOV ids (See et al.)."""
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)
    V = tokenizer.vocab_size
    ids = list(encoding.ids[:max_length])
    words = [text[a:b].lower() for a, b in encoding.offsets[: len(ids)]]
    oovs: list[str] = []
    ext_ids = []
    for i, word in zip(ids, words, strict=True):
        if i == UNK_ID:
            if word not in oovs:
                oovs.append(word)
            ext_ids.append(V + oovs.index(word))
        else:
            ext_ids.append(i)
    return EncodedText(ids, ext_ids, oovs, words)


def encode_target(
    tokenizer: TextTokenizer, text: str, oovs: Sequence[str], max_length: int | None
) -> list[int]:
    """Summary ids in the source's extended vocabulary, ending with ``<eos>``: a word outside
    the vocabulary is ``V + j`` if it is the source's OOV word ``j``, else ``<unk>``."""
    encoded = encode_with_oov(tokenizer, text, None if max_length is None else max_length - 1)
    V = tokenizer.vocab_size
    out = []
    for i, word in zip(encoded.ids, encoded.words, strict=True):
        out.append(V + oovs.index(word) if i == UNK_ID and word in oovs else i)
    return [*out, EOS_ID]


def detokenize(words: Sequence[str]) -> str:
    """Join words with spaces, then drop the space before closing punctuation and after
    opening brackets."""
    text = " ".join(words)
    return _NO_SPACE_AFTER.sub(r"\1", _NO_SPACE_BEFORE.sub(r"\1", text))


# --------------------------------------------------------------------------------------------
# Batches

Item = tuple[int, EncodedText, list[int]]


@dataclass(frozen=True)
class PointerBatch:
    """A padded batch for the pointer-generator.

    Attributes:
        source: ``(B, Ns)`` int64 fixed-vocabulary ids.
        source_ext: ``(B, Ns)`` int64 extended ids.
        target_in: ``(B, Nt)`` int64 ``<bos> y1 .. y(n-1)``, OOV words as ``<unk>``.
        target_out: ``(B, Nt)`` int64 ``y1 .. yn <eos>`` in extended ids (padding 0).
        index: ``(B,)`` int64 positions in the dataset.
        num_oov: ``X``.
        oovs: each example's OOV words (to turn extended ids back into words).
    """

    source: Tensor
    source_ext: Tensor
    target_in: Tensor
    target_out: Tensor
    index: Tensor
    num_oov: int
    oovs: list[list[str]]

    def to(self, device: torch.device | str) -> PointerBatch:
        source, source_ext, target_in, target_out, index = (
            t.to(device, non_blocking=True) for t in self._tensors()
        )
        return PointerBatch(
            source, source_ext, target_in, target_out, index, self.num_oov, self.oovs
        )

    def _tensors(self) -> tuple[Tensor, ...]:
        return (self.source, self.source_ext, self.target_in, self.target_out, self.index)

    def __len__(self) -> int:
        return int(self.source.shape[0])


class PointerDataset(Dataset[Item]):
    """Tokenized (document, summary) pairs; item ``i`` is ``(i, document, target_ext_ids)``."""

    def __init__(self, documents: Sequence[EncodedText], targets: Sequence[list[int]]) -> None:
        if len(documents) != len(targets):
            raise ValueError(
                f"documents ({len(documents)}) and targets ({len(targets)}) must align"
            )
        self.documents = list(documents)
        self.targets = list(targets)

    @classmethod
    def from_pairs(
        cls,
        pairs: Sequence[Pair],
        tokenizer: TextTokenizer,
        *,
        max_source_length: int | None,
        max_target_length: int | None,
    ) -> PointerDataset:
        documents = [encode_with_oov(tokenizer, p.source, max_source_length) for p in pairs]
        targets = [
            encode_target(tokenizer, p.target, d.oovs, max_target_length)
            for p, d in zip(pairs, documents, strict=True)
        ]
        return cls(documents, targets)

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> Item:
        return index, self.documents[index], self.targets[index]

    def lengths(self) -> list[int]:
        return [max(len(d.ids), len(t)) for d, t in zip(self.documents, self.targets, strict=True)]


def collate_pointer(items: Sequence[Item], vocab_size: int) -> PointerBatch:
    """Pad items into a :class:`PointerBatch` (``vocab_size`` maps copies back to ``<unk>``)."""
    documents = [d for _, d, _ in items]
    source = pad_ids([d.ids or [UNK_ID] for d in documents])
    source_ext = pad_ids([d.ext_ids or [UNK_ID] for d in documents])
    target_out = pad_ids([t for _, _, t in items])
    target_in = pad_ids(
        [[BOS_ID, *(UNK_ID if i >= vocab_size else i for i in t[:-1])] for _, _, t in items]
    )
    index = torch.tensor([i for i, _, _ in items], dtype=torch.long)  # (B,)
    num_oov = max(len(d.oovs) for d in documents)
    return PointerBatch(
        source.ids,
        source_ext.ids,
        target_in.ids,
        target_out.ids,
        index,
        num_oov,
        [d.oovs for d in documents],
    )


# --------------------------------------------------------------------------------------------
# Decoding and metrics


def _blocked(history: list[int], n: int) -> set[int]:
    """Tokens that would repeat an ``n``-gram already in ``history``."""
    if n < 1 or len(history) < n - 1:
        return set()
    prefix = tuple(history[len(history) - (n - 1) :]) if n > 1 else ()
    return {
        history[i + n - 1]
        for i in range(len(history) - n + 1)
        if tuple(history[i : i + n - 1]) == prefix
    }


@torch.no_grad()
def greedy_decode(
    model: PointerGenerator,
    batch: PointerBatch,
    *,
    max_length: int = 40,
    no_repeat_ngram: int = 3,
) -> tuple[list[list[int]], list[Tensor]]:
    """Greedy decoding of a batch.

    Args:
        model: the pointer-generator (eval mode).
        batch: a :class:`PointerBatch` on the model's device (targets are not read).
        max_length: most tokens per summary (``<eos>`` excluded).
        no_repeat_ngram: never produce an ``n``-gram twice (0 turns it off); a cheap guard
            against the loops greedy decoding falls into.

    Returns:
        Extended ids per example (without ``<eos>``) and the attention of each step
        ``(len, Ns)`` per example.
    """
    encoding = model.encode(batch.source, batch.source_ext, batch.num_oov)
    state = model.start_decoding(encoding)
    B = len(batch)
    tokens = torch.full((B,), BOS_ID, dtype=torch.long, device=batch.source.device)
    outputs: list[list[int]] = [[] for _ in range(B)]
    weights: list[list[Tensor]] = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(max_length + 1):
        log_probs, attn = model.decode_step(state, tokens)  # (B, V + X), (B, Ns)
        # Never emit <pad>, <bos> or <unk>: copy or generate a word (or end with <eos>).
        log_probs[:, [PAD_ID, BOS_ID, UNK_ID]] = float("-inf")
        for b in range(B):
            blocked = _blocked(outputs[b], no_repeat_ngram)
            if blocked:
                log_probs[b, list(blocked)] = float("-inf")
        tokens = log_probs.argmax(dim=-1)  # (B,)
        for b, token in enumerate(tokens.tolist()):
            if done[b]:
                continue
            if token == EOS_ID or len(outputs[b]) >= max_length:
                done[b] = True
            else:
                outputs[b].append(token)
                weights[b].append(attn[b].cpu())
        if all(done):
            break
    return outputs, [
        torch.stack(w) if w else torch.zeros(0, batch.source.shape[1]) for w in weights
    ]


def ids_to_words(ids: Sequence[int], tokenizer: TextTokenizer, oovs: Sequence[str]) -> list[str]:
    """Words of extended ids (``V + j`` is the source's OOV word ``j``)."""
    V = tokenizer.vocab_size
    return [oovs[i - V] if i >= V else str(tokenizer.hf.id_to_token(i)) for i in ids]


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (x100) with the Porter stemmer (``rouge-score``, Google's
    reimplementation of Lin 2004).

    Raises:
        ValueError: the two lists differ in length or are empty.
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"need as many predictions ({len(predictions)}) as references ({len(references)}), >0"
        )
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for key in totals:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * value / len(predictions) for key, value in totals.items()}


def lead_baseline(document: str, sentences: int = 1) -> str:
    """The first ``sentences`` sentences of ``document`` (split after ``.``, ``!``, ``?``)."""
    return " ".join(_SENTENCE_END.split(document.strip())[:sentences])


# --------------------------------------------------------------------------------------------
# The task the trainer runs


class SummarizationTask:
    """Summed NLL of the summary tokens (+ coverage loss); validation decodes and scores.

    Args:
        validation: validation pairs, tokenized, with their reference summaries.
        references: the reference summary texts, aligned with ``validation``.
        tokenizer: the word tokenizer.
        coverage_weight: weight of the coverage loss (used if the model has coverage).
        batch_size: validation batch size.
        max_length: decoding limit.
    """

    name = TASK_NAME
    metric = "rougeL"
    higher_is_better = True

    def __init__(
        self,
        validation: PointerDataset,
        references: Sequence[str],
        tokenizer: TextTokenizer,
        *,
        coverage_weight: float = 1.0,
        batch_size: int = 32,
        max_length: int = 40,
    ) -> None:
        self.validation = validation
        self.references = list(references)
        self.tokenizer = tokenizer
        self.coverage_weight = coverage_weight
        self.batch_size = batch_size
        self.max_length = max_length

    def loss(self, model: nn.Module, batch: PointerBatch) -> LossOutput:
        out = model(batch.source, batch.source_ext, batch.num_oov, batch.target_in)
        real = batch.target_out != PAD_ID  # (B, Nt)
        nll = -out.log_probs.gather(2, batch.target_out.unsqueeze(-1)).squeeze(-1)  # (B, Nt)
        total = (nll * real).sum()
        if self.coverage_weight > 0:
            total = total + self.coverage_weight * (out.coverage_loss * real).sum()
        tokens = int((batch.source != PAD_ID).sum() + real.sum())
        return LossOutput(total, int(real.sum()), tokens)

    def validate(self, model: nn.Module) -> dict[str, float]:
        if not len(self.validation):
            return {self.metric: float("nan")}
        predictions = decode_dataset(
            _unwrap(model), self.validation, self.tokenizer, self.batch_size, self.max_length
        )
        return rouge_scores(predictions, self.references)


def _unwrap(model: nn.Module) -> PointerGenerator:
    inner = getattr(model, "module", model)  # DistributedDataParallel keeps it in .module
    if not isinstance(inner, PointerGenerator):
        raise TypeError(f"expected a PointerGenerator, got {type(inner).__name__}")
    return inner


def decode_dataset(
    model: PointerGenerator,
    dataset: PointerDataset,
    tokenizer: TextTokenizer,
    batch_size: int,
    max_length: int,
) -> list[str]:
    """Greedy summaries of every example, in dataset order."""
    device = next(model.parameters()).device
    sampler = BucketBatchSampler(dataset.lengths(), batch_size=batch_size, shuffle=False)
    summaries: dict[int, str] = {}
    for indices in sampler.batches():
        batch = collate_pointer([dataset[i] for i in indices], tokenizer.vocab_size).to(device)
        outputs, _ = greedy_decode(model, batch, max_length=max_length)
        for i, ids, oovs in zip(batch.index.tolist(), outputs, batch.oovs, strict=True):
            summaries[i] = detokenize(ids_to_words(ids, tokenizer, oovs))
    return [summaries[i] for i in range(len(dataset))]


# --------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class SummarizationSetup:
    """What to build before training (saved in ``config.json`` under ``"data"``).

    Attributes:
        preset: a :data:`qkv.models.pointer.POINTER_PRESETS` name.
        vocab_size: words in the fixed vocabulary.
        max_source_length: words kept per document.
        max_target_length: words kept per summary (``<eos>`` included).
        batch_size: examples per training batch.
        coverage_weight: weight of the coverage loss (with a coverage model).
        validation_limit: decode at most this many validation examples per validation.
        model_overrides: fields of :class:`PointerGeneratorConfig` replacing the preset's.
        data_options: options of :func:`qkv.data.load_documents`.
    """

    preset: str = "small"
    vocab_size: int = 10_000
    max_source_length: int = 200
    max_target_length: int = 40
    batch_size: int = 32
    coverage_weight: float = 1.0
    validation_limit: int = 300
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_source_length", "max_target_length", "batch_size", "validation_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_target_length < 2:
            raise ValueError(f"max_target_length must be >= 2, got {self.max_target_length}")
        if self.vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must exceed 4, got {self.vocab_size}")
        if self.coverage_weight < 0:
            raise ValueError(f"coverage_weight must be >= 0, got {self.coverage_weight}")


def _build(config: dict[str, Any]) -> PointerGenerator:
    return PointerGenerator(PointerGeneratorConfig.from_dict(config))


def train_summarization(
    data: str,
    out: str | os.PathLike[str],
    *,
    setup: SummarizationSetup | None = None,
    train: TrainConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[StepReport], None] | None = None,
    on_eval: Callable[[EvalReport], None] | None = None,
) -> TrainResult:
    """Train a pointer-generator on ``data`` and write the model folder ``out``.

    Args:
        data: a spec for :func:`qkv.data.load_documents` (``builtin:docstrings``, a JSONL/TSV
            file, a folder).
        out: the model folder.
        setup: vocabulary, model and batching choices (default :class:`SummarizationSetup`).
        train: the trainer's settings.
        resume: continue the run saved in ``out``.
        overwrite: replace a model already in ``out``.
        on_step, on_eval: progress callbacks.
    """
    setup = setup or SummarizationSetup()
    train = train or TrainConfig()
    prepare_output_folder(out, resume=resume, overwrite=overwrite)
    splits = load_documents(data, **setup.data_options)
    if resume:
        saved = read_config(out)
        tokenizer = TextTokenizer.load(Path(out) / "tokenizer.json")
        config = PointerGeneratorConfig.from_dict(saved["model"])
    else:
        tokenizer = train_word_tokenizer(
            [t for p in splits.train for t in (p.source, p.target)], vocab_size=setup.vocab_size
        )
        config = PointerGeneratorConfig.from_name(
            setup.preset, vocab_size=tokenizer.vocab_size, **setup.model_overrides
        )
    logger.info("summarization: %s, %s", splits.sizes(), config)
    lengths = {
        "max_source_length": setup.max_source_length,
        "max_target_length": setup.max_target_length,
    }
    train_set = PointerDataset.from_pairs(splits.train, tokenizer, **lengths)
    held = splits.validation[: setup.validation_limit]
    task = SummarizationTask(
        PointerDataset.from_pairs(held, tokenizer, **lengths),
        [p.target for p in held],
        tokenizer,
        coverage_weight=setup.coverage_weight if config.coverage else 0.0,
        batch_size=2 * setup.batch_size,
        max_length=setup.max_target_length,
    )
    folder_config = {
        "task": TASK_NAME,
        "model": config.to_dict(),
        "data": {"spec": data, "options": setup.data_options, **lengths, "preset": setup.preset},
        "training": train.to_dict(),
    }

    def save(module: nn.Module, state: dict[str, Any], step: int) -> None:
        save_model_folder(
            out,
            model=module,
            config=folder_config,
            tokenizer=PairTokenizer(tokenizer),
            training_state=state,
            step=step,
        )

    model = PointerGenerator(config)
    state = None
    if resume:
        loaded, saved = load_model(out, _build)
        model.load_state_dict(loaded.state_dict())
        state = load_training_state(out, expected_step=saved["step"])
    sampler = BucketBatchSampler(train_set.lengths(), batch_size=setup.batch_size, seed=train.seed)
    batches = SamplerBatches(
        train_set, sampler, lambda items: collate_pointer(items, tokenizer.vocab_size)
    )
    trainer = Trainer(model, task, batches, train, save=save, on_step=on_step, on_eval=on_eval)
    return trainer.fit(resume=state)


# --------------------------------------------------------------------------------------------
# Inference


@dataclass(frozen=True)
class Summary:
    """One generated summary.

    Attributes:
        text: the summary.
        words: its words (lowercased, as generated).
        source_words: the document's words as the model read them (after truncation).
        attention: ``(len(words), len(source_words))`` copy attention of each step.
    """

    text: str
    words: list[str]
    source_words: list[str]
    attention: Tensor


class Summarizer:
    """A trained pointer-generator with its vocabulary, loaded from a model folder."""

    def __init__(
        self,
        model: PointerGenerator,
        tokenizer: TextTokenizer,
        *,
        max_source_length: int,
        max_target_length: int,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> Summarizer:
        """Load a folder written by :func:`train_summarization`.

        Raises:
            ModelFolderError: not a summarization model folder, or inconsistent files.
        """
        config = read_config(folder)
        if config.get("task") != TASK_NAME:
            raise ModelFolderError(
                f"{folder}: holds a {config.get('task')!r} model, not a {TASK_NAME!r} model"
            )
        model, config = load_model(folder, _build)
        if not isinstance(model, PointerGenerator):
            raise ModelFolderError(f"{folder}: the model is not a pointer-generator")
        tokenizer = TextTokenizer.load(Path(folder) / "tokenizer.json")
        data = config["data"]
        return cls(
            model,
            tokenizer,
            max_source_length=int(data["max_source_length"]),
            max_target_length=int(data["max_target_length"]),
        )

    def summarize(self, documents: Sequence[str], *, batch_size: int = 32) -> list[Summary]:
        """Summarize ``documents`` (greedy decoding, no repeated trigram).

        Raises:
            ValueError: an empty (or whitespace-only) document, naming its position.
        """
        for i, document in enumerate(documents):
            if not isinstance(document, str) or not document.strip():
                raise ValueError(f"document {i} is empty: there is nothing to summarize")
        encoded = [encode_with_oov(self.tokenizer, d, self.max_source_length) for d in documents]
        device = next(self.model.parameters()).device
        summaries: list[Summary] = []
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            items = [(i, d, [EOS_ID]) for i, d in enumerate(chunk)]
            batch = collate_pointer(items, self.tokenizer.vocab_size).to(device)
            outputs, weights = greedy_decode(self.model, batch, max_length=self.max_target_length)
            for d, ids, w in zip(chunk, outputs, weights, strict=True):
                words = ids_to_words(ids, self.tokenizer, d.oovs)
                summaries.append(Summary(detokenize(words), words, d.words, w[:, : len(d.words)]))
        return summaries


def evaluate_summarizer(
    summarizer: Summarizer, pairs: Sequence[Pair], *, lead_sentences: int = 1
) -> dict[str, Any]:
    """ROUGE-1/2/L of the model and of the lead baseline on ``pairs``.

    Args:
        summarizer: the model.
        pairs: ``Pair(document, reference summary)``.
        lead_sentences: sentences of the lead baseline (1: first sentence; 3: lead-3).

    Returns:
        ``{"model": {...}, "lead": {...}, "count": n, "lead_sentences": k}``.
    """
    if not pairs:
        raise ValueError("no pairs to evaluate")
    references = [p.target for p in pairs]
    predictions = [s.text for s in summarizer.summarize([p.source for p in pairs])]
    lead = [lead_baseline(p.source, lead_sentences) for p in pairs]
    return {
        "model": rouge_scores(predictions, references),
        "lead": rouge_scores(lead, references),
        "count": len(pairs),
        "lead_sentences": lead_sentences,
    }
