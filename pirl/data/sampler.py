"""Epoch-seeded sampling that makes every augmentation a pure function of (seed, epoch, index).

Why: a run resumed mid-epoch, or run with a different number of DataLoader workers, must see
exactly the same samples with exactly the same augmentations as an uninterrupted one.  Worker RNG
streams cannot give that (which worker draws which batch shifts on resume), so the sampler yields
*draw ids* ``epoch * |D| + index`` and :class:`SeededViews` reseeds every RNG from
``(seed, draw id)`` before building the views of one sample.

Global batch ``k`` of an epoch is ``order[k*B : (k+1)*B]`` of a seeded permutation; rank ``r`` of
``W`` takes the ``r``-th contiguous slice of ``B / W`` samples.  Gathering the ranks' slices in
rank order therefore reproduces the single-process batch exactly.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pirl.data.source import UnreadableDataError

log = logging.getLogger(__name__)

def usable_workers(requested: int) -> int:
    """``requested`` DataLoader workers, capped at the CPUs this process may run on: more only
    adds contention (torch warns about it), and since every augmentation is a function of (seed,
    draw id), the number of workers never changes the data."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(requested, cpus) if cpus else requested


_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads consecutive seeds apart


def _mix(*values: int) -> int:
    """A deterministic 63-bit hash of integers (Python's ``hash`` of tuples is stable for ints,
    but spelling the mixing out keeps it identical across Python versions)."""
    h = 0
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFFFFFF)) * _MIX + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``range(n)`` used in ``epoch``: LongTensor [n]."""
    g = torch.Generator().manual_seed(_mix(seed, epoch, 1))
    return torch.randperm(n, generator=g)


class EpochSampler(Sampler[int]):
    """Yields this rank's draw ids for one epoch, from global batch ``start_batch`` on.

    Incomplete last batches are dropped (every step has the full global batch), so an epoch has
    ``n // global_batch`` steps.
    """

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1,
                 epoch: int = 0, start_batch: int = 0) -> None:
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
        if n < global_batch:
            raise ValueError(f"dataset of {n} images is smaller than one batch of {global_batch}")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world = rank, world
        self.epoch, self.start_batch = epoch, start_batch

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_batch) * (self.global_batch // self.world)

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(self.n, self.seed, self.epoch)
        per_rank = self.global_batch // self.world
        base = self.epoch * self.n
        for k in range(self.start_batch, self.steps_per_epoch):
            lo = k * self.global_batch + self.rank * per_rank
            for idx in order[lo:lo + per_rank].tolist():
                yield base + idx


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's ``random`` in this process."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class SeededViews(Dataset):
    """Wraps a :class:`~pirl.data.datasets.ViewDataset`: index by draw id, reseed, build views.

    A bad image (the inner dataset returns ``None``) is replaced by the next readable index so
    that every rank's batch keeps its size (DDP gathers need equal sizes); the sample dict then
    carries ``skipped=1`` so the loop can count it.
    """

    def __init__(self, inner: Any, seed: int, max_substitutes: int = 64) -> None:
        self.inner, self.seed, self.max_substitutes = inner, seed, max_substitutes

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, draw_id: int) -> dict[str, Any]:
        n = len(self.inner)
        epoch, index = divmod(int(draw_id), n)
        for attempt in range(self.max_substitutes):
            i = (index + attempt) % n
            seed_everything(_mix(self.seed, epoch, i))
            sample = self.inner[i]
            if sample is not None:
                sample["skipped"] = attempt  # the unreadable images passed over to reach i
                return sample
        raise UnreadableDataError(
            f"{self.max_substitutes} consecutive unreadable images from "
            f"{getattr(self.inner, 'source', self.inner)!r} index {index}: is the dataset "
            "readable? `pirl data check` lists the bad files")
