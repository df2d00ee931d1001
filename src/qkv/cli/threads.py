"""How many CPU threads a command's PyTorch work uses: ``--threads N``, else ``OMP_NUM_THREADS``,
else half the CPUs this process may run on (at least one).

PyTorch's own default is one thread per core. That is the fastest on an idle machine, but a
training process that takes every core of a busy one is descheduled mid-step again and again:
on a shared 2-core machine a run with two threads went at 1k tokens/s where it reached 25k
alone. Half the CPUs leaves room for the rest of the machine (one thread on two cores) and
loses little on an idle one for qkv's small models; ``--threads`` takes more.
"""

from __future__ import annotations

import os

__all__ = ["apply_threads", "default_threads", "usable_cpus"]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS says, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> tuple[int, str]:
    """The thread count without ``--threads``, and where it comes from (for the run header)."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given), "OMP_NUM_THREADS"
    # under torchrun, the processes of one machine share its CPUs
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    cpus = usable_cpus()
    return max(1, cpus // (2 * processes)), f"half of {cpus} CPUs"


def apply_threads(requested: int | None) -> tuple[int, str]:
    """Set torch's intra-op thread count; return it and where it comes from.

    Raises:
        ValueError: ``requested`` below 1.
    """
    import torch

    if requested is not None and requested < 1:
        raise ValueError(f"--threads must be >= 1; got {requested}")
    threads, source = (requested, "--threads") if requested is not None else default_threads()
    torch.set_num_threads(threads)
    return threads, source
