"""Data-parallel training with ``torch.distributed`` (launched by ``torchrun``).

``torchrun --nproc_per_node N -m qkv.cli.main train ...`` starts N processes and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` reads
them and joins the process group (gloo on the CPU, NCCL on CUDA). Without those variables
everything here is a single process and the collectives are no-ops.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "init_from_env"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job.

    Attributes:
        rank: global index of this process, 0 for the main one.
        world_size: number of processes.
        local_rank: index on this machine (picks the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process (collectives really communicate)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that logs, validates and writes checkpoints."""
        return self.rank == 0

    def sum_int(self, value: int) -> int:
        """Sum of ``value`` over all processes."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.long, device=_collective_device())
        dist.all_reduce(tensor)
        return int(tensor.item())

    def any_true(self, flag: bool) -> bool:
        """Whether ``flag`` is true in any process (e.g. one of them ran out of time)."""
        return self.sum_int(int(flag)) > 0

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value`` (a picklable object), in every process."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(device: torch.device) -> DistributedContext:
    """Join the process group described by ``torchrun``'s environment, if any.

    Args:
        device: this job's device type; CUDA gets NCCL and this process's ``LOCAL_RANK`` GPU.

    Returns:
        The context (single-process when ``WORLD_SIZE`` is unset or 1).
    """
    if dist.is_available() and dist.is_initialized():  # the caller set the group up itself
        rank = dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return DistributedContext(rank, dist.get_world_size(), local_rank)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    logger.info("joined %s process group: rank %d of %d", backend, rank, world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank)
