"""Beam search with the KV cache vs recomputing the decoder over the whole prefix every step.

Both runs decode the same sources with the same model and must return the same hypotheses
(asserted); the script prints each one's best time and the speed ratio. The eos id is set
outside the vocabulary so that every source decodes exactly ``--max-len`` steps, whatever the
(untrained) weights: decoding speed does not depend on what the weights say.

    python benchmarks/beam_cache.py                                  # small Transformer, CPU
    python benchmarks/beam_cache.py --model rnn --preset small
    python benchmarks/beam_cache.py --device cuda --batch 64 --max-len 128
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["transformer", "rnn"], default="transformer")
    parser.add_argument("--preset", choices=["tiny", "small", "base"], default="small")
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8, help="sources decoded together")
    parser.add_argument("--src-len", type=int, default=32)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=48, help="tokens generated per source")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sharpen", type=float, default=4.0, help="output weight scale")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args()


def build(args: argparse.Namespace) -> Any:
    import torch

    from qkv.models import RNNConfig, TransformerConfig, build_model

    torch.manual_seed(args.seed)
    config_cls = TransformerConfig if args.model == "transformer" else RNNConfig
    config = config_cls.from_name(
        args.preset, src_vocab_size=args.vocab, tgt_vocab_size=args.vocab, dropout=0.0
    )
    model = build_model(config)
    # Sharpen the untrained model's output: with near-uniform logits, two candidates can tie
    # to within float rounding, and the cached and recomputed runs (which sum in different
    # orders) may then pick differently, which says nothing about the cache.
    with torch.no_grad():
        model.output.weight.mul_(args.sharpen)
    return model.to(args.device).eval()


def timed(fn: Any, device: str) -> tuple[float, Any]:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    import torch

    from qkv.decode import PrefixRecompute, beam_search_hypotheses

    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    g = torch.Generator().manual_seed(args.seed)
    source = torch.randint(3, args.vocab, (args.batch, args.src_len), generator=g).to(args.device)
    options = {"beam_size": args.beam, "max_len": args.max_len, "eos": args.vocab}

    def cached() -> Any:
        return beam_search_hypotheses(model, source, **options)

    def recomputed() -> Any:
        return beam_search_hypotheses(PrefixRecompute(model), source, **options)

    cached()  # warm-up: allocator, kernels, RoPE/sinusoid tables
    # Interleaved and best-of-N, so that load from other processes hits both alike.
    t_cached = t_recomputed = float("inf")
    for _ in range(args.repeats):
        seconds, out_cached = timed(cached, args.device)
        t_cached = min(t_cached, seconds)
        seconds, out_recomputed = timed(recomputed, args.device)
        t_recomputed = min(t_recomputed, seconds)
    same = [[h.tokens for h in row] for row in out_cached] == [
        [h.tokens for h in row] for row in out_recomputed
    ]
    assert same, "cached and recomputed beam search disagree"
    result = {
        "model": args.model,
        "preset": args.preset,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "beam": args.beam,
        "src_len": args.src_len,
        "max_len": args.max_len,
        "cached_s": round(t_cached, 4),
        "recomputed_s": round(t_recomputed, 4),
        "speedup": round(t_recomputed / t_cached, 2),
        "same_outputs": same,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{args.model} {args.preset} on {args.device} ({result['threads']} threads): "
        f"{args.batch} sources x beam {args.beam}, {args.max_len} tokens each"
    )
    print(f"  KV cache / incremental state  {t_cached:8.3f} s")
    print(f"  recompute the prefix          {t_recomputed:8.3f} s")
    print(f"  speedup                       {result['speedup']:8.2f}x   (same hypotheses: {same})")


if __name__ == "__main__":
    main()
