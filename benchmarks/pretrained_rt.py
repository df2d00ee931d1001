"""Fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes (builtin:rt) and report the test accuracy.

    OMP_NUM_THREADS=1 python benchmarks/pretrained_rt.py --out runs/rt-minilm   # 2 epochs

Prints the wall and CPU (process) minutes, the steps and the test accuracy of the kept
(best-validation) model, with the machine's load average. On a shared machine the CPU minutes
are the figure to compare with a budget: the wall clock counts time the process waited for a core.
``--minutes`` adds a wall-clock limit (the cosine then also follows it).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from qkv.data.labeled import load_labeled
from qkv.tasks.pretrained_sentiment import (
    PretrainedSetup,
    PretrainedTextClassifier,
    default_finetune_config,
    evaluate_pretrained,
    train_pretrained_sentiment,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/rt-minilm")
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--steps", type=int, default=428)  # two epochs at batch 32
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pooling", default="mean", choices=["mean", "attention"])
    parser.add_argument("--eval-every", type=int, default=107)  # half an epoch at batch 32
    args = parser.parse_args()

    load = os.getloadavg()
    start, cpu_start = time.perf_counter(), time.process_time()

    def cpu_minutes() -> float:
        return (time.process_time() - cpu_start) / 60

    result = train_pretrained_sentiment(
        "builtin:rt",
        args.out,
        setup=PretrainedSetup(pooling=args.pooling, batch_size=args.batch_size),
        train=default_finetune_config(
            lr=args.lr,
            max_steps=args.steps,
            max_minutes=args.minutes,
            warmup_steps=max(args.steps // 10, 1),
            eval_every=args.eval_every,
            log_every=50,
            device="cpu",
        ),
        on_step=lambda r: print(
            f"step {r.step} loss {r.loss:.4f} lr {r.lr:.2e} wall {r.elapsed_s / 60:.1f} min "
            f"cpu {cpu_minutes():.1f} min load {os.getloadavg()[0]:.1f}",
            flush=True,
        ),
        on_eval=lambda r: print(f"eval step {r.step} {r.metrics} best={r.improved}", flush=True),
        overwrite=True,
    )
    train_minutes, train_cpu = (time.perf_counter() - start) / 60, cpu_minutes()
    clf = PretrainedTextClassifier.load(args.out)
    metrics = evaluate_pretrained(clf, load_labeled("builtin:rt").test)
    print(
        json.dumps(
            {
                "test_accuracy": metrics["accuracy"],
                "test_macro_f1": metrics["macro_f1"],
                "train_wall_minutes": round(train_minutes, 2),
                "train_cpu_minutes": round(train_cpu, 2),
                "total_cpu_minutes": round(cpu_minutes(), 2),
                "steps": result.state.step,
                "stopped": result.stopped,
                "threads": torch.get_num_threads(),
                "load_at_start": [round(x, 2) for x in load],
                "load_at_end": [round(x, 2) for x in os.getloadavg()],
                "args": vars(args),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
