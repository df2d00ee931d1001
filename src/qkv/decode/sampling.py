r"""Text generation with a decoder-only language model: greedy or sampled, one token per step
against a KV cache, for a left-padded batch of prompts.

::

    from qkv.decode import generate
    from qkv.models import load_pretrained

    model, tokenizer = load_pretrained("smollm2")
    ids, mask = tokenizer.encode_batch([tokenizer.chat_prompt("What is attention?")])
    out = generate(model, ids, mask, max_new_tokens=64, stop_ids=tokenizer.stop_ids)
    print(tokenizer.decode(out.tokens[0]))

The model is any :class:`CausalLM`: ``model(ids, mask, caches) -> logits (B, n, V)`` and
``model.make_caches(B, max_len)`` (one :class:`~qkv.nn.kv_cache.KVCache` per layer), as
:class:`~qkv.models.pretrained.llama.LlamaDecoder` provides. The prompt is run once (prefill,
all prompt tokens in one call), then every step feeds the newest token only; attention of that
one query against the whole cache is what a decoding step spends its attention time on.

Choosing the next token from the last position's logits ``z (B, V)``:

- ``temperature == 0``: greedy, ``argmax z``;
- otherwise ``softmax(z / temperature)``, restricted to the ``top_k`` most likely tokens and to
  the smallest set whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020,
  "The Curious Case of Neural Text Degeneration"), sampled with a ``torch.Generator`` seeded by
  ``seed`` (the same seed gives the same text).

A row stops at its first token in ``stop_ids`` (the end-of-turn token of a chat model); finished
rows keep being fed ``pad`` until every row has stopped or ``max_new_tokens`` is reached.

Notation: ``B`` prompts, ``N`` tokens of the longest prompt, ``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from qkv.nn.kv_cache import KVCache

__all__ = ["CausalLM", "Generation", "generate", "generate_steps", "sample_next"]


@runtime_checkable
class CausalLM(Protocol):
    """A decoder-only language model with a KV cache per layer."""

    def __call__(
        self, ids: Tensor, mask: Tensor | None = None, caches: Sequence[KVCache] | None = None
    ) -> Tensor:
        """``ids (B, n)``, ``mask (B, L + n)`` bool True at real tokens, ``caches`` holding
        ``L`` tokens -> logits ``(B, n, V)``."""
        ...

    def make_caches(self, batch_size: int, max_len: int) -> list[KVCache]: ...


@dataclass(frozen=True)
class Generation:
    """What :func:`generate` produced.

    Attributes:
        tokens: ``B`` lists of new ids, without the stop token.
        stopped: per row, whether it ended on a stop token (else it hit ``max_new_tokens``).
        steps: forward calls after the prefill (decoding steps run).
    """

    tokens: list[list[int]]
    stopped: list[bool]
    steps: int


def _check_options(
    max_new_tokens: object, temperature: object, top_k: object, top_p: object
) -> None:
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be an int >= 1; got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy); got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1; got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1
    ):
        raise ValueError(f"top_p must be None or a number in (0, 1]; got {top_p!r}")


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The next token of every row from its logits.

    Args:
        logits: ``(B, V)`` float.
        temperature: 0 for greedy (argmax); else the softmax temperature.
        top_k: keep only the ``top_k`` most likely tokens (None: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (None: all). The most likely token is always kept.
        generator: the random source of sampling.

    Returns:
        ``(B,)`` int64 ids.
    """
    _check_options(1, temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    z = logits.float() / temperature  # (B, V)
    if top_k is not None and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_z, order = z.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_z.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = before >= top_p  # (B, V); position 0 is never dropped
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    probs = z.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def generate_steps(
    model: CausalLM,
    ids: Tensor,
    mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: Collection[int] = (),
    pad_id: int = 0,
    use_cache: bool = True,
) -> Iterator[Tensor]:
    """Yield the new token of every row, one ``(B,)`` tensor per step (for streaming).

    Arguments as in :func:`generate`. A row that has stopped yields ``pad_id``. Runs under
    ``torch.no_grad()``; the caller sets eval mode.
    """
    _check_options(max_new_tokens, temperature, top_k, top_p)
    B, N = _check_prompt(ids, mask)
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=ids.device)
    generator: torch.Generator | None = None
    if temperature > 0:
        generator = torch.Generator(device=ids.device)
        generator.manual_seed(seed if seed is not None else int(torch.seed()))
    with torch.no_grad():
        caches = model.make_caches(B, N + max_new_tokens) if use_cache else None
        logits = model(ids, mask, caches)[:, -1]  # (B, V)
        seen, seen_mask = ids, mask
        finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
        for step in range(max_new_tokens):
            token = sample_next(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            token = token.masked_fill(finished, pad_id)  # (B,)
            finished = finished | torch.isin(token, stops)
            yield token
            if bool(finished.all()) or step == max_new_tokens - 1:
                return
            real = torch.ones_like(token, dtype=torch.bool)[:, None]
            seen_mask = torch.cat((seen_mask, real), dim=1)  # (B, N + step + 1)
            if caches is not None:  # the newest token against the cache
                logits = model(token[:, None], seen_mask, caches)[:, -1]
            else:  # the whole prefix again
                seen = torch.cat((seen, token[:, None]), dim=1)  # (B, N + step + 1)
                logits = model(seen, seen_mask, None)[:, -1]


def generate(
    model: CausalLM,
    ids: Tensor,
    mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: Collection[int] = (),
    pad_id: int = 0,
    use_cache: bool = True,
) -> Generation:
    """Continue every prompt of a left-padded batch.

    Args:
        model: a :class:`CausalLM` (in eval mode).
        ids: ``(B, N)`` int64 prompt ids, left-padded.
        mask: bool ``(B, N)``, True at real tokens; None: no padding.
        max_new_tokens: the most tokens generated per row (the stop token included).
        temperature: 0 (the default) for greedy decoding; > 0 to sample.
        top_k: sample among the ``top_k`` most likely tokens only.
        top_p: sample from the nucleus of probability ``top_p``.
        seed: seeds sampling (None: a fresh random seed).
        stop_ids: ids that end a row (e.g. ``tokenizer.stop_ids``).
        pad_id: fed to (and yielded for) rows that have stopped.
        use_cache: False recomputes the whole prefix every step (the no-cache baseline; same
            result, quadratic cost).

    Returns:
        a :class:`Generation`.

    Raises:
        ValueError: a bad option or prompt (named, with its value or shape).
    """
    stops = set(stop_ids)
    steps = list(
        generate_steps(
            model,
            ids,
            mask,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_ids=stops,
            pad_id=pad_id,
            use_cache=use_cache,
        )
    )
    rows = torch.stack(steps, dim=1).tolist()  # (B, steps)
    tokens, stopped = [], []
    for row in rows:
        end = next((i for i, t in enumerate(row) if t in stops), None)
        tokens.append(row if end is None else row[:end])
        stopped.append(end is not None)
    return Generation(tokens=tokens, stopped=stopped, steps=len(steps) - 1)


def _check_prompt(ids: object, mask: object) -> tuple[int, int]:
    if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.dtype != torch.long or not ids.numel():
        shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"ids must be a non-empty int64 tensor of shape (B, N); got {shape}")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != ids.shape:
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(
                f"mask must be a bool tensor of the shape of ids {tuple(ids.shape)}; got {shape}"
            )
        if not bool(mask[:, -1].all()):
            raise ValueError(
                "mask must be left-padded: the last position of every row must be a real token"
            )
    return ids.shape[0], ids.shape[1]
