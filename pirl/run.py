"""What a pretraining run sets up around its loop (:func:`pirl.train.pretrain`).

The run folder and its checks before any heavy work, the loop's position and how it resumes, the
data loader of an epoch, the run log with its resume marker, the stop signals, and the result a
run leaves behind.  The model, the objective and the step itself are :mod:`pirl.train`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader

from pirl import config as C
from pirl.checkpoint import load_run_checkpoint
from pirl.data import ViewDataset, open_source
from pirl.data.sampler import EpochSampler, SeededViews, usable_workers
from pirl.data.shard_stream import ShardViews
from pirl.data.shards import ShardSource
from pirl.data.source import ImageSource
from pirl.data.views import ColourCollate
from pirl.distributed import DistEnv
from pirl.logs import LOG_NAME, RunLogger
from pirl.methods import build_train_transform, fit_to_dataset, permutation_set

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What :func:`pirl.train.pretrain` leaves behind.

    ``trunk_path`` is where the trunk weights go when the run finishes; a stopped run
    (``stopped``: a stop signal or ``stop_after_steps``) writes only its checkpoint, so a file
    there is then from an earlier, finished run of the folder or absent.  ``steps`` is the
    global step reached, ``epochs`` the completed epochs."""

    run_dir: Path
    trunk_path: Path
    steps: int
    epochs: int
    resumed_from_step: int
    last_record: dict[str, Any]
    stopped: bool = False

    def summary(self) -> str:
        """The line a command ends with: where the trunk weights are or, for a stopped run, its
        step and how to go on.  trunk.pt is named only when the file exists."""
        trunk = self.trunk_path
        if not self.stopped:
            weights = f"trunk weights: {trunk}" if trunk.is_file() else "no trunk.pt written"
            return f"run folder: {self.run_dir}  ({weights})"
        line = (f"stopped at step {self.steps}; checkpoint in {self.run_dir}. Rerun the same "
                "command to resume from it")
        if trunk.is_file():
            line += f" ({trunk} is from an earlier, finished run of this folder)"
        return line


@dataclass
class LoopState:
    """Where the loop is: global step, completed epochs, batches done in the current epoch,
    unreadable images skipped so far (by this process), and for a shard set the readers
    (processes x workers) that the current epoch's stream is dealt to (0: map-style data)."""

    step: int
    epoch: int
    batch: int
    skipped: int = 0
    readers: int = 0

    @classmethod
    def from_position(cls, pos: dict[str, Any]) -> LoopState:
        """The state saved in a checkpoint's ``position``.  ``skipped`` (the total over all
        ranks) is absent from checkpoints written before it was saved: those count from 0."""
        return cls(step=int(pos["step"]), epoch=int(pos["epoch"]), batch=int(pos["batch"]),
                   skipped=int(pos.get("skipped", 0)), readers=int(pos.get("readers", 0)))


def prepare_run_dir(out: Path) -> Path:
    """Create ``out`` and check it is writable, before any heavy work."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise C.ConfigError(f"--out {out}: cannot write there ({e.strerror})") from None
    return out


def check_resume_compatible(ckpt: dict[str, Any], cfg: C.Config, dataset_size: int,
                            path: Path) -> None:
    """Refuse to resume a checkpoint of another architecture, method, dataset size or
    permutation-set size."""
    saved = ckpt.get("config", {})
    # Checkpoints written before model.width / model.head existed hold the defaults' networks.
    before = {"width": 1, "head": "linear"}
    for section, key in (("model", "arch"), ("model", "small_stem"), ("model", "width"),
                         ("model", "head"), ("model", "embed_dim"),
                         ("objective", "method"), ("objective", "pretext")):
        old = saved.get(section, {}).get(key, before.get(key))
        new = getattr(getattr(cfg, section), key)
        if old != new:
            raise C.ConfigError(f"{path}: checkpoint has {section}.{key}={old!r} but this run asks "
                                f"for {new!r}; use another --out folder or the same setting")
    permutation_set(cfg, 0, ckpt.get("permutations"), resuming=True)  # the same |T| / set size
    if ckpt.get("dataset_size") != dataset_size:
        raise C.ConfigError(f"{path}: checkpoint was trained on {ckpt.get('dataset_size')} images "
                            f"(memory bank rows) but the data now has {dataset_size}; use another "
                            "--out folder or the same data")


def open_run(cfg: C.Config, data: str, out: Path, env: DistEnv
             ) -> tuple[Path, ImageSource, dict[str, Any] | None]:
    """Check the run against its data and folder before any heavy work; returns the run folder,
    the training images and the checkpoint to resume from (None for a fresh run).

    ``cfg`` is fitted to the dataset here (:func:`pirl.methods.fit_to_dataset`, notes logged) and
    written to ``out/config.yaml``; rank 0 creates the folder and the other ranks wait for it, so
    every rank reads the same checkpoint.
    """
    out = prepare_run_dir(out) if env.is_main else Path(out)
    source = open_source(data)
    n = len(source)
    for note in fit_to_dataset(cfg, n, source, data):
        if env.is_main:
            log.info(note)
    if cfg.optim.batch_size % env.world_size:
        raise C.ConfigError(f"optim.batch_size={cfg.optim.batch_size}: must be divisible by the "
                            f"number of processes ({env.world_size})")
    if cfg.optim.batch_size > n:
        raise C.ConfigError(f"optim.batch_size={cfg.optim.batch_size}: larger than the dataset "
                            f"({n} images in {data})")
    env.barrier()  # rank 0 has created the run folder; every rank now reads the same checkpoint
    ckpt = load_run_checkpoint(out)
    if ckpt is not None:
        check_resume_compatible(ckpt, cfg, n, out / "checkpoint.pt")
    if env.is_main:
        C.save_yaml(cfg, out / "config.yaml")
    return out, source, ckpt


def open_run_log(out: Path, state: LoopState, resumed: bool, env: DistEnv) -> RunLogger:
    """The run's log (written by rank 0), from ``state`` (``state.skipped``: the total over all
    ranks, as a checkpoint holds it).

    A log already there (a crash, a stop, or a run killed before its first checkpoint) gets a
    resume marker: the records it holds after this checkpoint's step are about to be
    superseded, and :func:`pirl.logs.read_log` drops them."""
    log_path = out / LOG_NAME
    restarting = resumed or (log_path.is_file() and log_path.stat().st_size > 0)
    resume = ({"step": state.step, "epoch": state.epoch, "batch": state.batch,
               "skipped_total": state.skipped} if restarting else None)
    return RunLogger(out, enabled=env.is_main, resume=resume)


def training_data(cfg: C.Config, source: ImageSource, permutations: Tensor | None,
                  colour_backend: str, env: DistEnv
                  ) -> tuple[SeededViews | ShardViews, ColourCollate, int]:
    """The training views of ``source`` (indexed by draw id, see :mod:`pirl.data.sampler`),
    the collate function that colours them, and the number of DataLoader workers to use.

    The workers draw every sample's crops and colour parameters (seeded per sample), and colour
    the whole batch in one call in the collate function (ColourCollate), also in the workers:
    the same pixels as colouring sample by sample, with less overhead per image.  A shard set
    is streamed instead (:class:`~pirl.data.shard_stream.ShardViews`).
    """
    transform = build_train_transform(cfg, permutations, defer_colour=True)
    dataset: SeededViews | ShardViews
    if isinstance(source, ShardSource):  # streamed (pirl.data.shard_stream)
        dataset = ShardViews(source, transform, cfg.train.seed, strict=cfg.train.strict_data)
    else:
        dataset = SeededViews(ViewDataset(source, transform, strict=cfg.train.strict_data),
                              seed=cfg.train.seed)
    workers = usable_workers(cfg.train.workers)
    if workers < cfg.train.workers and env.is_main:
        log.info("train.workers=%d exceeds the %d CPU(s) available; using %d",
                 cfg.train.workers, workers, workers)
    if env.is_main:
        log.info("colour augmentation: %s backend (views.colour_backend=%s)", colour_backend,
                 cfg.views.colour_backend)
    return dataset, ColourCollate(backend=colour_backend), workers


def epoch_loader(dataset: SeededViews | ShardViews, cfg: C.Config, env: DistEnv,
                 state: LoopState, collate: ColourCollate, workers: int) -> DataLoader[Any]:
    """This rank's batches of epoch ``state.epoch`` from batch ``state.batch`` on (a resumed
    epoch goes on where it stopped), ``optim.batch_size / world_size`` samples each."""
    if isinstance(dataset, ShardViews):  # the workers collate whole batches: batch_size=None
        readers = _stream_workers(state, env, workers)
        state.readers = env.world_size * readers
        stream = dataset.epoch(state.epoch, cfg.optim.batch_size, env.rank, env.world_size,
                               state.batch, collate, readers)
        workers = readers if readers > 1 or workers > 0 else 0
        return DataLoader(stream, batch_size=None, num_workers=workers,
                          pin_memory=env.device.type == "cuda", persistent_workers=False,
                          prefetch_factor=4 if workers > 0 else None)
    sampler = EpochSampler(len(dataset), cfg.optim.batch_size, cfg.train.seed, env.rank,
                           env.world_size, epoch=state.epoch, start_batch=state.batch)
    return DataLoader(dataset, batch_size=cfg.optim.batch_size // env.world_size,
                      sampler=sampler, drop_last=True, collate_fn=collate, num_workers=workers,
                      pin_memory=env.device.type == "cuda", persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None)


def _stream_workers(state: LoopState, env: DistEnv, workers: int) -> int:
    """Readers per process for a shard set's epoch: ``train.workers`` (at least 1), except in
    an epoch resumed mid-way, which keeps the readers it started with, since they decide which
    samples each batch holds (a machine with fewer CPUs gets more workers than CPUs for it)."""
    k = max(workers, 1)
    if state.batch and state.readers and state.readers != env.world_size * k:
        if state.readers % env.world_size == 0:
            k = state.readers // env.world_size
            if env.is_main:
                log.info("finishing epoch %d with %d reader(s) per process, as it started",
                         state.epoch + 1, k)
        elif env.is_main:
            log.warning("epoch %d started with %d shard readers, now %d processes: the rest of "
                        "it is dealt anew (bank rows stay right; some images may repeat or be "
                        "left out this epoch)", state.epoch + 1, state.readers, env.world_size)
    return k


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (cluster pre-emption) or a first Ctrl-C (SIGINT): the loop
    checkpoints and exits cleanly at its next logging step (``train.log_every``, or the end of
    the epoch), where the ranks agree on stopping.  A second Ctrl-C aborts at once
    (KeyboardInterrupt), losing only the steps since the last checkpoint."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            # ValueError: not the main thread (e.g. inside a test runner thread)
            with contextlib.suppress(ValueError):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a DataLoader worker forked with this handler: the main process decides
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt
            log.warning("Ctrl-C: checkpointing and stopping at the next logging step (press it "
                        "again to abort without a checkpoint)")
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
