"""Process groups from the torchrun environment, and the few collectives the method needs.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them the run
is a single process and every helper here is a cheap no-op.  NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0, in rank order: [B, ...] -> [W*B, ...].

    Every rank must pass the same shape (the sampler gives every rank the same batch size).  Not
    differentiable: it is used for memory-bank updates, which are detached.
    """
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


@dataclass
class DistEnv:
    """Where this process sits: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, checkpoints and progress bars."""
        return self.rank == 0

    def barrier(self) -> None:
        if is_distributed():
            dist.barrier()


def setup_distributed(device: str | None = None, timeout_s: float = 1800) -> DistEnv:
    """Initialise the process group when launched by torchrun, and pick this rank's device.

    ``device``: "cpu", "cuda" or "cuda:N"; default: this rank's GPU when CUDA is present.
    Safe to call twice (the second call reuses the group).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def all_reduce_mean(value: float, env: DistEnv) -> float:
    """The mean of a Python number over ranks (for logging)."""
    if env.world_size == 1 or not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / env.world_size


def broadcast_int(value: int, env: DistEnv) -> int:
    """Rank 0's integer on every rank."""
    if env.world_size == 1 or not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64,
                     device=env.device if env.device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return int(t.item())


def cleanup_distributed() -> None:
    """Destroy the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
