"""The training stream of a shard set: shards split across ranks and workers, deterministic per
epoch, equal step counts on every rank, exact mid-epoch resume.

Epoch ``e`` of a run with ``W`` processes and ``K`` DataLoader workers each (``K = 1`` without
workers), global batch ``B = W * b``:

1. **Shards to slots.** The shard order is a permutation seeded by ``(seed, e)``; slot
   ``s = rank * K + worker`` reads shards ``order[s::W*K]`` (``W * K`` must not exceed the
   number of shards: each slot needs one).
2. **Samples of a slot.** The slot's shards are read in that order by webdataset's tar reader
   and shuffled in a buffer seeded by ``(seed, e, rank, worker)``.  The stream is cycled (read
   again, same order) when the slot needs more samples than its shards hold.
3. **Steps.** Every epoch has ``|D| // B`` steps, as for map-style data, so the schedule and
   the DDP step count do not depend on how the shards fall.  Rank batch ``j`` comes from worker
   ``j % K`` (the DataLoader takes its workers' batches in turn), so a worker yields
   ``len(range(worker, steps, K))`` batches of ``b`` samples; the rest of its stream is dropped
   that epoch, and a short slot repeats the start of its stream.  When every slot holds exactly
   the samples its batches take (equal shards, their number a multiple of ``W * K``, the steps a
   multiple of ``K`` and no remainder ``|D| % B``), every sample is seen exactly once per epoch;
   otherwise up to about one shard per slot is repeated or left out, different ones each epoch.
4. **Bad samples.** An image that does not decode is skipped and the next one takes its place
   (the count travels in the sample's ``skipped`` field, as for map-style data); too many in a
   row, or ``strict``, raise :class:`~pirl.data.source.UnreadableDataError`.
5. **Resume.** Resuming at batch ``t`` of an epoch, worker ``k`` skips its first
   ``len(range(k, t, K))`` batches (DataLoader worker ``(k - t) % K`` plays worker ``k``, since
   the DataLoader starts every epoch at its worker 0): it re-reads and decodes (without
   augmenting) those samples, so bad images shift the stream exactly as they did.  The stream
   depends on ``W`` and ``K``: resume with the same ``train.workers`` and number of processes.

Every augmentation is seeded by ``(seed, e, index)`` (:class:`pirl.data.sampler.SeededViews`'s
rule), and ``index`` is the manifest's global index (the bank row).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from pirl.data.sampler import _mix, seed_everything
from pirl.data.shards import ShardSource, require_webdataset
from pirl.data.source import BadImageError, DatasetError, UnreadableDataError, decode_image

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 1000


def slot_shards(n_shards: int, seed: int, epoch: int, slots: int) -> list[list[int]]:
    """The shards each of ``slots`` slots reads in ``epoch`` (lists of shard positions)."""
    if slots > n_shards:
        raise DatasetError(f"{n_shards} shard(s) cannot feed {slots} readers (processes x "
                           "DataLoader workers): lower train.workers or write more, smaller "
                           "shards (`pirl data shard --shard-size`)")
    g = torch.Generator().manual_seed(_mix(seed, epoch, 2))
    order = torch.randperm(n_shards, generator=g).tolist()
    return [order[s::slots] for s in range(slots)]


class ShardViews:
    """The training views of a :class:`ShardSource` (what :class:`SeededViews` is for
    map-style data): ``transform(PIL) -> dict`` of views, the run's seed, ``strict``."""

    def __init__(self, source: ShardSource, transform: Callable[[Any], dict[str, Any]], seed: int,
                 strict: bool = False, max_substitutes: int = 64) -> None:
        require_webdataset()
        self.source, self.transform, self.seed = source, transform, seed
        self.strict, self.max_substitutes = strict, max_substitutes

    def __len__(self) -> int:
        return len(self.source)

    def epoch(self, epoch: int, global_batch: int, rank: int, world: int, start_batch: int,
              collate: Callable[[list[Any]], Any], workers: int) -> ShardEpoch:
        """This rank's stream of collated batches for ``epoch`` from batch ``start_batch`` on."""
        slot_shards(len(self.source.shards), self.seed, epoch, world * max(workers, 1))
        return ShardEpoch(self, epoch, global_batch, rank, world, start_batch, collate,
                          max(workers, 1))


class ShardEpoch(IterableDataset):
    """One epoch of one rank: yields collated batches of ``global_batch // world`` samples
    (use with ``DataLoader(batch_size=None)``); each worker takes its shards (module doc)."""

    def __init__(self, views: ShardViews, epoch: int, global_batch: int, rank: int, world: int,
                 start_batch: int, collate: Callable[[list[Any]], Any], readers: int = 1) -> None:
        self.views, self.epoch, self.rank, self.world = views, epoch, rank, world
        self.readers = readers
        self.per_rank = global_batch // world
        self.steps = len(views) // global_batch
        self.start_batch, self.collate = start_batch, collate

    def __len__(self) -> int:
        return self.steps - self.start_batch

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != self.readers:
            raise RuntimeError(f"ShardEpoch built for {self.readers} reader(s) per process but "
                               f"read by {workers}: give the DataLoader num_workers={self.readers}"
                               " (0 or 1 for one)")
        # The DataLoader takes the first batch from its worker 0: resumed at batch t, that is
        # rank batch t, whose data is the stream of worker t % K in an uninterrupted epoch.
        yield from self.worker_batches((worker + self.start_batch) % workers, workers)

    def worker_batches(self, worker: int, workers: int) -> Iterator[Any]:
        """The batches worker ``worker`` of ``workers`` yields (module doc, step 3)."""
        skip = len(range(worker, self.start_batch, workers))
        todo = len(range(worker, self.steps, workers)) - skip
        samples = self._samples(worker, workers, skip * self.per_rank)
        for _ in range(todo):
            yield self.collate([next(samples) for _ in range(self.per_rank)])

    def _raw(self, worker: int, workers: int) -> Iterator[tuple[int, bytes, str, str]]:
        """(global index or -1, encoded image, name, what is wrong) of the slot's samples,
        shuffled, cycled."""
        wds = require_webdataset()
        src, v = self.views.source, self.views
        slots = slot_shards(len(src.shards), v.seed, self.epoch, self.world * workers)
        mine = slots[self.rank * workers + worker]
        for cycle in range(1 << 30):
            shuffle = wds.filters.shuffle(bufsize=SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER,
                                          seed=_mix(v.seed, self.epoch, self.rank, worker, cycle))
            seen = 0
            for s in shuffle(self._members(mine)):
                seen += 1
                name = f"{s['__url__']}:{s['__key__']}"
                key = str(s["__key__"])
                img = next((s[k] for k in s if not k.startswith("__") and k != "cls"), None)
                if "__missing__" in s:
                    yield -1, b"", str(s["__url__"]), s["__missing__"]
                elif not key.isdigit() or not 0 <= int(key) < len(src) or img is None:
                    yield -1, b"", name, "no image under a global index key"
                else:
                    yield int(key), img, name, ""
            if not seen:
                raise UnreadableDataError(f"no sample in shards {[src.shards[k] for k in mine]}")

    def _members(self, shards: list[int]) -> Iterator[dict[str, Any]]:
        """webdataset's samples of ``shards`` in order; a shard that ends early (truncated) is
        followed by one ``__missing__`` placeholder per sample the manifest counts but it
        lacks, so that they are counted as skipped."""
        wds = require_webdataset()
        src = self.views.source
        for k in shards:
            url, n = str(src.shards[k]), 0
            for sample in wds.tariterators.tarfile_samples([{"url": url}],
                                                           handler=_warn_and_continue):
                n += 1
                yield sample
            for j in range(src.counts[k] - n):
                yield {"__url__": url, "__key__": f"missing{j}",
                       "__missing__": f"sample missing: the shard holds {n} of the manifest's "
                                      f"{src.counts[k]}"}

    def _samples(self, worker: int, workers: int, skip: int) -> Iterator[dict[str, Any]]:
        """Decoded, augmented samples; the first ``skip`` readable ones are passed over."""
        v, targets = self.views, self.views.source.targets
        bad = 0
        for index, data, name, wrong in self._raw(worker, workers):
            try:
                if index < 0:
                    raise BadImageError(name, wrong)
                img = decode_image(data, name)
            except BadImageError as e:
                if skip:  # counted by the run that got here first
                    continue
                if v.strict:
                    raise UnreadableDataError(
                        f"unreadable image {e.path}: {e.reason} (fatal because of --strict-data "
                        "/ train.strict_data; without it bad images are skipped and counted)"
                    ) from e
                log.warning("skipping unreadable image %s: %s", e.path, e.reason)
                bad += 1
                if bad > v.max_substitutes:
                    raise UnreadableDataError(f"{bad} consecutive unreadable images in the shards "
                                              f"of {v.source.spec}: `pirl data check` lists "
                                              "them") from e
                continue
            if skip:
                skip -= 1
                continue
            seed_everything(_mix(v.seed, self.epoch, index))
            yield {**v.transform(img), "index": index, "label": int(targets[index]),
                   "skipped": bad}
            bad = 0


def _warn_and_continue(exn: Exception) -> bool:
    """webdataset's error handler: a shard that cannot be read further (truncated, not a tar)
    is logged and the stream goes on with the next shard."""
    log.warning("shard read error (rest of the shard skipped): %s", exn)
    return True
