"""``qkv generate``: continue a prompt with a pretrained decoder, streaming the tokens.

::

    qkv generate --model smollm2 "The three primary colours are"
    qkv generate --model smollm2 --chat "What is attention in a transformer?"
    qkv generate --model smollm2 --chat --temperature 0.7 --top-p 0.9 --seed 1 "Tell a story"
    qkv generate --model model.gguf --max-new-tokens 200 --backend chunked "def fib(n):"

Greedy by default; ``--temperature`` > 0 samples (with ``--top-k`` / ``--top-p``, seeded by
``--seed``). With ``--chat`` the prompt is wrapped in the model's chat template and generation
stops at the end of the assistant's turn. The text is printed as it is generated; the prefill
time and the decoding speed (tokens/s) follow on stderr (``--json``: one JSON object instead).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``qkv generate``."""
    p = commands.add_parser(
        "generate",
        help="continue a prompt with a pretrained decoder (smollm2), streaming tokens",
        description='qkv generate --model smollm2 [--chat] "prompt"',
    )
    p.add_argument(
        "--model",
        default="smollm2",
        help="a named decoder (smollm2), a .gguf file or a Llama folder (default %(default)s)",
    )
    p.add_argument("prompt", help="the text to continue; '-' reads stdin")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--system", default=None, help="a system message (with --chat)")
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="most tokens generated (default 128)"
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples"
    )
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the nucleus of mass p")
    p.add_argument("--seed", type=int, default=0, help="seeds sampling (default 0)")
    p.add_argument("--backend", default="auto", help="attention backend (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda ... (default %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="recompute the prefix every step")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    from qkv.cli.train import add_threads_arg

    add_threads_arg(p)
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from qkv.decode import generate_steps
    from qkv.models.pretrained import load_decoder

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise ValueError("the prompt is empty: there is nothing to continue")
    if args.system is not None and not args.chat:
        raise ValueError("--system needs --chat")
    model, tokenizer = load_decoder(args.model, backend=args.backend)
    model.to(args.device)
    if args.chat:
        messages = [{"role": "user", "content": prompt}]
        if args.system is not None:
            messages.insert(0, {"role": "system", "content": args.system})
        prompt = tokenizer.chat_prompt(messages)
    ids, mask = tokenizer.encode_batch([prompt])
    ids, mask = ids.to(args.device), mask.to(args.device)
    stops = tokenizer.stop_ids if args.chat else {tokenizer.eos_id}
    steps = generate_steps(
        model,
        ids,
        mask,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_ids=stops,
        pad_id=tokenizer.pad_id,
        use_cache=not args.no_cache,
    )
    tokens: list[int] = []
    printed = ""
    start = time.perf_counter()
    first: float | None = None
    for token in steps:
        if first is None:
            first = time.perf_counter()  # the prefill and the first token
        value = int(token[0])
        if value in stops:
            break
        tokens.append(value)
        text = tokenizer.decode(tokens)
        if not args.json and not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
    end = time.perf_counter()
    prefill = (first or end) - start
    decoded = max(len(tokens) - 1, 0)
    rate = decoded / (end - (first or end)) if decoded and end > (first or end) else 0.0
    report = {
        "model": str(args.model),
        "backend": args.backend,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": len(tokens),
        "prefill_seconds": round(prefill, 4),
        "decode_tokens_per_second": round(rate, 2),
        "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps({"text": tokenizer.decode(tokens), **report}))
    else:
        sys.stdout.write(tokenizer.decode(tokens)[len(printed) :] + "\n")
        print(
            f"[{report['prompt_tokens']} prompt tokens, prefill {prefill:.2f} s; "
            f"{len(tokens)} new tokens, {rate:.1f} tokens/s decoding on {args.backend}]",
            file=sys.stderr,
        )
    return 0
