"""Process groups from the torchrun environment, and the few collectives the method needs.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them the run
is a single process and every helper here is a cheap no-op.  NCCL on GPUs, gloo on CPU.

How a data-parallel PIRL run stays one run (see docs/distributed.md):

* the sampler gives rank r the r-th contiguous slice of every global batch, so gathering in rank
  order reproduces the single-process batch;
* DDP averages the gradients, so every rank takes the same optimizer step;
* the memory bank is a full replica per rank, outside the DDP module; every rank gathers
  (index, embedding) from all ranks (:func:`all_gather_ragged`) and applies the same update;
* negatives come from one generator whose state is the same on every rank: each rank draws the
  negatives of the whole global batch and keeps its own rows, so the draws do not depend on the
  number of processes and one saved generator state resumes every rank;
* :func:`check_replicas` compares cheap checksums of the bank and the parameters at every
  checkpoint and raises :class:`ReplicaDriftError` on every rank if they differ.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


class ReplicaDriftError(RuntimeError):
    """Ranks hold different copies of state that must be identical (memory bank, parameters,
    training position); raised on every rank at once, so the whole job stops."""


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def comm_device() -> torch.device:
    """Where tensors must live for a collective: this rank's GPU under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


def gather_sizes(n: int) -> list[int]:
    """Every rank's ``n``, in rank order (``[n]`` outside a process group)."""
    if not is_distributed():
        return [n]
    t = torch.tensor([n], dtype=torch.long, device=comm_device())
    return [int(v) for v in all_gather_cat(t).tolist()]


def all_gather_ragged(t: torch.Tensor, sizes: Sequence[int] | None = None,
                      chunk_rows: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """Concatenate ``t`` ``[B_r, ...]`` from every rank along dim 0 when the ``B_r`` may differ.

    Returns ``([sum_r B_r, ...]`` in rank order, on ``t``'s device; ``[B_0, B_1, ...]``).  Ranks
    may pass ``sizes`` when they already know them (saves one collective).  Each rank pads to the
    largest size, so ranks whose batches lost unreadable images still meet in one all_gather.
    ``chunk_rows`` bounds the rows gathered per round (large feature matrices: at most
    ``world x chunk_rows`` rows are in flight at once).
    """
    if not is_distributed():
        return t, [t.shape[0]]
    sizes = list(sizes) if sizes is not None else gather_sizes(t.shape[0])
    if sizes[dist.get_rank()] != t.shape[0]:
        raise ValueError(f"all_gather_ragged: this rank has {t.shape[0]} rows but sizes says "
                         f"{sizes[dist.get_rank()]}")
    biggest = max(sizes)
    step = max(1, biggest if not chunk_rows else min(chunk_rows, biggest))
    dev = comm_device()
    pieces: list[list[torch.Tensor]] = [[] for _ in sizes]
    for lo in range(0, max(biggest, 1), step):
        mine = t[lo:lo + step].to(dev)
        if mine.shape[0] < step:
            pad = mine.new_zeros((step - mine.shape[0], *t.shape[1:]))
            mine = torch.cat([mine, pad], dim=0)
        parts = [torch.empty_like(mine) for _ in sizes]
        dist.all_gather(parts, mine.contiguous())
        for r, part in enumerate(parts):
            keep = max(0, min(step, sizes[r] - lo))
            pieces[r].append(part[:keep].to(t.device))
    return torch.cat([p for per_rank in pieces for p in per_rank], dim=0), sizes


def any_rank(flags: Sequence[bool]) -> list[bool]:
    """Element-wise OR of boolean flags over ranks, so every rank takes the same branch (a stop
    request or a non-finite loss seen by one rank must stop all of them, or the others would wait
    in the next collective forever)."""
    if not is_distributed():
        return [bool(f) for f in flags]
    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def parameter_checksum(module: nn.Module) -> float:
    """A cheap position-sensitive fingerprint of ``module``'s parameters (not its buffers:
    BatchNorm running statistics legitimately differ between ranks between two forwards).

    Sum over tensors k of (k + 1) * sum(tensor_k), in float64.  Data-parallel replicas take the
    same optimizer step on the same all-reduced gradients, so they agree exactly.
    """
    total = torch.zeros((), dtype=torch.float64)
    for k, p in enumerate(module.parameters()):
        total += (k + 1) * p.detach().sum(dtype=torch.float64).cpu()
    return float(total)


def check_replicas(values: dict[str, float], when: str) -> None:
    """Compare named numbers (checksums, the step) across ranks; raise on every rank if any
    differs.

    Every rank sends the same vector and receives everyone's, so every rank reaches the same
    verdict and raises the same :class:`ReplicaDriftError` (no rank is left waiting).  The
    comparison is exact: replicas are updated by the same operations on the same inputs.
    """
    if not is_distributed():
        return
    names = list(values)
    mine = torch.tensor([float(values[k]) for k in names], dtype=torch.float64,
                        device=comm_device())
    table = all_gather_cat(mine.unsqueeze(0)).cpu()  # [W, len(names)]
    bad = [k for j, k in enumerate(names) if not bool((table[:, j] == table[0, j]).all())]
    if bad:
        rows = "; ".join(f"{k}: " + ", ".join(f"rank {r}={table[r, names.index(k)].item():.17g}"
                                               for r in range(table.shape[0])) for k in bad)
        raise ReplicaDriftError(
            f"{when}: the ranks' replicas differ ({rows}). Every rank must hold the same memory "
            "bank and parameters; the job stops here so that no inconsistent checkpoint is "
            "written (the last good checkpoint is kept). If this happened right after a resume, "
            "the ranks read different checkpoint files: --out must be on a file system shared "
            "by every node.")


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP does this at the start of every training forward, but evaluation calls the unwrapped
    trunk, which would otherwise use each rank's own statistics of its last batch.
    """
    if not is_distributed():
        return
    dev = comm_device()
    for buf in module.buffers():
        if buf.device == dev:
            dist.broadcast(buf, src=0)
        else:
            tmp = buf.to(dev)
            dist.broadcast(tmp, src=0)
            buf.copy_(tmp)


def shard(n: int) -> range:
    """This rank's contiguous share of ``range(n)`` (sizes differ by at most one; rank order =
    index order, so concatenating the shards in rank order gives ``range(n)`` back)."""
    if not is_distributed():
        return range(n)
    w, r = dist.get_world_size(), dist.get_rank()
    return range(r * n // w, (r + 1) * n // w)


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

    def describe(self, global_batch: int) -> str:
        """One line for the start of a run: processes, backend, device, per-rank/global batch."""
        if self.world_size == 1:
            return f"1 process on {self.device}; batch {global_batch}"
        backend = dist.get_backend() if is_distributed() else "none"
        return (f"{self.world_size} processes ({backend}, {self.device.type}); global batch "
                f"{global_batch} = {self.world_size} x {global_batch // self.world_size} per "
                "process")


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
    t = torch.tensor([float(value)], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return float(t.item()) / env.world_size


def broadcast_int(value: int, env: DistEnv) -> int:
    """Rank 0's integer on every rank."""
    if env.world_size == 1 or not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=comm_device())
    dist.broadcast(t, src=0)
    return int(t.item())


def cleanup_distributed() -> None:
    """Destroy the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
