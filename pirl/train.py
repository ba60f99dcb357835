"""The pretraining loop: forward -> loss -> backward -> step -> bank update, with checkpoints.

One readable loop for every method (pirl, npid, jigsaw, rotation): the differences live in the
model (:func:`pirl.models.pirl.build_model`) and the objective (:class:`pirl.methods.Objective`).
Running the same command twice resumes from the run folder's checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pirl import config as C
from pirl.checkpoint import (
    CheckpointError,
    load_run_checkpoint,
    rng_state,
    save_run_checkpoint,
    set_rng_state,
)
from pirl.data import ViewDataset, open_source
from pirl.data.augment import resolve_colour_backend
from pirl.data.sampler import EpochSampler, SeededViews, seed_everything, usable_workers
from pirl.data.views import (
    ColourCollate,
    build_train_transform,
    maximal_hamming_permutations,
    normalize,
)
from pirl.distributed import (
    DistEnv,
    all_reduce_mean,
    any_rank,
    broadcast_buffers,
    check_replicas,
    parameter_checksum,
    setup_distributed,
)
from pirl.logs import LOG_NAME, RunLogger
from pirl.methods import Objective
from pirl.models.pirl import build_model
from pirl.schedule import build_optimizer, lr_at, peak_lr, set_lr

log = logging.getLogger(__name__)

IMAGE_KEYS = ("image", "patches", "rotated")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and what to try."""


@dataclass
class RunResult:
    """What :func:`pretrain` leaves behind.

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
    """Refuse to resume a checkpoint of another architecture, method or dataset size."""
    saved = ckpt.get("config", {})
    for section, key in (("model", "arch"), ("model", "small_stem"), ("model", "embed_dim"),
                         ("objective", "method"), ("objective", "pretext")):
        old = saved.get(section, {}).get(key)
        new = getattr(getattr(cfg, section), key)
        if old != new:
            raise C.ConfigError(f"{path}: checkpoint has {section}.{key}={old!r} but this run asks "
                                f"for {new!r}; use another --out folder or the same setting")
    if ckpt.get("dataset_size") != dataset_size:
        raise C.ConfigError(f"{path}: checkpoint was trained on {ckpt.get('dataset_size')} images "
                            f"(memory bank rows) but the data now has {dataset_size}; use another "
                            "--out folder or the same data")


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    """Move a collated batch to ``device``; uint8 images become normalised float there."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if not torch.is_tensor(value):
            out[key] = value
            continue
        value = value.to(device, non_blocking=True)
        if key in IMAGE_KEYS:
            value = normalize(value)
            if channels_last and value.ndim == 4:
                value = value.contiguous(memory_format=torch.channels_last)
        out[key] = value
    return out


def _autocast(device: torch.device, enabled: bool) -> Any:
    """bfloat16 autocast on CUDA (no loss scaling needed); a no-op elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=enabled and device.type == "cuda")


class _StopFlag:
    """Set by SIGTERM / SIGUSR1 (cluster pre-emption) or a first Ctrl-C (SIGINT): the loop
    checkpoints at the end of the step and exits cleanly.  A second Ctrl-C aborts at once
    (KeyboardInterrupt), losing only the steps since the last checkpoint."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> _StopFlag:
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
            log.warning("Ctrl-C: checkpointing after this step and stopping (press it again to "
                        "abort without a checkpoint)")
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def pretrain(cfg: C.Config, data: str, out: Path, val_data: str | None = None,
             device: str | None = None, stop_after_steps: int | None = None) -> RunResult:
    """Pretrain on ``data`` into the run folder ``out`` (resuming if it holds a checkpoint).

    Args:
        cfg: the resolved config, fitted here to the dataset (:func:`pirl.config.fit_to_dataset`:
            a preset's num_negatives is capped at |D| - 1, an explicitly set one must be below
            |D|).
        data: training images: a folder, an ImageFolder .tar, or ``synthetic``.
        out: run folder: config.yaml, log.jsonl, checkpoint.pt, and trunk.pt at the end.
        val_data: labelled images for the kNN monitor (optional).
        device: "cpu", "cuda", "cuda:1"...; default: this rank's GPU if any, else CPU.
        stop_after_steps: stop (with a checkpoint) after this many steps of this call; for tests
            of interrupted runs.
    """
    env = setup_distributed(device)
    # Resolved (numba's kernel imported) before the run folder is touched, so a missing numba
    # leaves nothing behind, and before any DataLoader worker forks.
    colour_backend = resolve_colour_backend(cfg.views.colour_backend)
    out = prepare_run_dir(out) if env.is_main else Path(out)
    source = open_source(data)
    n = len(source)
    for note in C.fit_to_dataset(cfg, n):
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

    seed_everything(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
    dev = env.device
    on_gpu = dev.type == "cuda"
    channels_last = cfg.train.channels_last and on_gpu

    permutations = None
    if cfg.objective.method == "jigsaw":
        permutations = (ckpt["permutations"] if ckpt is not None else
                        maximal_hamming_permutations(cfg.objective.num_permutations,
                                                     cfg.views.grid, seed=cfg.train.seed))
    model = build_model(cfg, num_permutations=cfg.objective.num_permutations).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    objective = Objective(cfg, n, dev)
    optimizer = build_optimizer(model, cfg.optim)

    steps_per_epoch = n // cfg.optim.batch_size
    total_steps = steps_per_epoch * cfg.optim.epochs
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    peak = peak_lr(cfg.optim)
    if env.is_main:
        log.info("%s; peak lr %.4g = base_lr %g x %d / 256", env.describe(cfg.optim.batch_size),
                 peak, cfg.optim.base_lr, cfg.optim.batch_size)
    state = _LoopState(step=0, epoch=0, batch=0)
    if ckpt is not None:
        _restore(ckpt, model, objective, optimizer)
        state = _position(ckpt["position"])
        if env.is_main:
            log.info("resuming from %s at epoch %d, step %d", out / "checkpoint.pt", state.epoch,
                     state.step)
    # The checkpoint holds the total over all ranks; rank 0 carries it on so that the sum over
    # ranks (what is logged and saved) continues from it.
    skipped_at_start = state.skipped
    if env.rank != 0:
        state.skipped = 0
    resumed_from = state.step

    train_model: nn.Module = model
    if env.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if on_gpu else None)
        # DDP has broadcast rank 0's weights; the bank and the position are each rank's own, so
        # a rank that resumed from another checkpoint file (no shared file system) stops here.
        _check_replicas(model, objective, state.step, "at start" if ckpt is None else
                        f"after resuming from {out / 'checkpoint.pt'}")

    # The workers draw every sample's crops and colour parameters (seeded per sample), and
    # colour the whole batch in one call in the collate function (ColourCollate), also in the
    # workers: the same pixels as colouring sample by sample, with less overhead per image.
    transform = build_train_transform(cfg, permutations, defer_colour=True)
    dataset = SeededViews(ViewDataset(source, transform, strict=cfg.train.strict_data),
                          seed=cfg.train.seed)
    per_rank = cfg.optim.batch_size // env.world_size
    # A log already there (a crash, a stop, or a run killed before its first checkpoint) gets a
    # resume marker: the records it holds after this checkpoint's step are about to be
    # superseded, and pirl.logs.read_log drops them.
    log_path = out / LOG_NAME
    restarting = ckpt is not None or (log_path.is_file() and log_path.stat().st_size > 0)
    resume = ({"step": state.step, "epoch": state.epoch, "batch": state.batch,
               "skipped_total": skipped_at_start} if restarting else None)
    logger = RunLogger(out, enabled=env.is_main, resume=resume)

    def skipped_total() -> int:
        """Unreadable images skipped so far on all ranks together (a collective)."""
        return round(all_reduce_mean(state.skipped, env) * env.world_size)

    def save() -> None:
        _check_replicas(model, objective, state.step, f"checkpoint at step {state.step}")
        _check_finite(model, objective, state.step, out)
        skipped_all = skipped_total()
        if env.is_main:
            save_run_checkpoint(_checkpoint_state(cfg, n, model, objective, optimizer,
                                                  permutations, state, skipped_all), out)
        env.barrier()

    workers = usable_workers(cfg.train.workers)
    if workers < cfg.train.workers and env.is_main:
        log.info("train.workers=%d exceeds the %d CPU(s) available; using %d",
                 cfg.train.workers, workers, workers)
    # The backends agree to float rounding only, so the log says which one drew the pixels.
    collate = ColourCollate(backend=colour_backend)
    if env.is_main:
        log.info("colour augmentation: %s backend (views.colour_backend=%s)", colour_backend,
                 cfg.views.colour_backend)
    logger.log({"kind": "event", "step": state.step, "epoch": state.epoch,
                "event": "colour_backend", "colour_backend": colour_backend})
    last: dict[str, Any] = {}
    steps_this_call = 0
    with _StopFlag() as stop:
        while state.epoch < cfg.optim.epochs:
            sampler = EpochSampler(n, cfg.optim.batch_size, cfg.train.seed, env.rank,
                                   env.world_size, epoch=state.epoch, start_batch=state.batch)
            loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, drop_last=True,
                                collate_fn=collate, num_workers=workers,
                                pin_memory=on_gpu,
                                persistent_workers=False,
                                prefetch_factor=4 if workers > 0 else None)
            model.train()
            bar = tqdm(total=steps_per_epoch, initial=state.batch, unit="step",
                       desc=f"epoch {state.epoch + 1}/{cfg.optim.epochs}", dynamic_ncols=True,
                       disable=cfg.train.quiet or not env.is_main, leave=False)
            t_last, samples_since = time.perf_counter(), 0
            for raw in loader:
                lr = lr_at(state.step, total_steps, warmup_steps, peak, cfg.optim.min_lr_ratio)
                set_lr(optimizer, lr)
                batch = to_device(raw, dev, channels_last)
                with _autocast(dev, cfg.train.amp):
                    outputs = train_model(batch)
                outputs = {k: v.float() for k, v in outputs.items()}
                loss, terms = objective.loss(outputs, batch)
                # One small all-reduce: a non-finite loss or a stop signal seen by any rank is
                # acted on by all of them at the same step (otherwise the others would wait in the
                # next collective).
                non_finite, stop_now = any_rank([not math.isfinite(loss.item()), stop.requested])
                if non_finite:
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at step {state.step} (epoch {state.epoch + 1}) on "
                        f"rank {env.rank} (a non-finite loss on any rank stops all of them); "
                        f"the last good checkpoint is {out / 'checkpoint.pt'}. Try a lower "
                        "optim.base_lr, a larger objective.tau, or train.amp=false")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                objective.after_step(outputs, batch)
                state.step += 1
                state.batch += 1
                steps_this_call += 1
                samples_since += cfg.optim.batch_size
                bar.update(1)
                skipped = int(raw["skipped"].sum()) if "skipped" in raw else 0
                state.skipped += skipped
                if state.step % cfg.train.log_every == 0 or state.batch == steps_per_epoch:
                    now = time.perf_counter()
                    rate = samples_since / max(now - t_last, 1e-9)
                    t_last, samples_since = now, 0
                    terms = {k: all_reduce_mean(v, env) for k, v in terms.items()}
                    skipped_all = skipped_total()
                    last = {"kind": "train", "step": state.step, "epoch": state.epoch + 1,
                            "lr": lr, "samples_per_s": rate, "skipped_total": skipped_all,
                            **terms}
                    logger.log(last)
                    bar.set_postfix(loss=f"{terms.get('loss', float('nan')):.3f}",
                                    samples_s=f"{rate:.0f}")
                if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
                    save()
                if stop_now or (stop_after_steps is not None
                                and steps_this_call >= stop_after_steps):
                    bar.close()
                    save()
                    if env.is_main:
                        log.info("stopped at step %d; rerun the same command to resume",
                                 state.step)
                    logger.close()
                    return RunResult(out, out / "trunk.pt", state.step, state.epoch,
                                     resumed_from, last, stopped=True)
            bar.close()
            state.epoch += 1
            state.batch = 0
            if val_data and cfg.train.knn_every and state.epoch % cfg.train.knn_every == 0:
                trunk = model.trunk
                assert isinstance(trunk, nn.Module)  # every pirl model has a trunk module
                knn = knn_monitor(trunk, cfg, source, val_data, dev, env)
                if env.is_main:
                    logger.log({"kind": "eval", "step": state.step, "epoch": state.epoch, **knn})
                    log.info("epoch %d: kNN top-1 %.2f%%", state.epoch, knn["knn_top1"])
            save()
    skipped_all = skipped_total()
    if skipped_all and env.is_main:
        log.warning("%d unreadable image(s) were skipped in total (see the warnings above); "
                    "`pirl data check %s` lists them", skipped_all, data)
    trunk_path = out / "trunk.pt"
    if env.is_main:
        from pirl.export import trunk_state_dict
        torch.save(trunk_state_dict(model.trunk), trunk_path)
        log.info("done: %d steps; trunk weights in %s", state.step, trunk_path)
    logger.close()
    env.barrier()
    return RunResult(out, trunk_path, state.step, state.epoch, resumed_from, last)


@dataclass
class _LoopState:
    """Where the loop is: global step, completed epochs, batches done in the current epoch, and
    unreadable images skipped so far (by this process)."""

    step: int
    epoch: int
    batch: int
    skipped: int = 0


def _position(pos: dict[str, Any]) -> _LoopState:
    """The loop state saved in a checkpoint's ``position``.  ``skipped`` (the total over all
    ranks) is absent from checkpoints written before it was saved: those count from 0."""
    return _LoopState(step=int(pos["step"]), epoch=int(pos["epoch"]), batch=int(pos["batch"]),
                      skipped=int(pos.get("skipped", 0)))


def _check_replicas(model: nn.Module, objective: Objective, step: int, when: str) -> None:
    """Stop every rank with :class:`pirl.distributed.ReplicaDriftError` unless all ranks hold
    the same memory bank, parameters and step (a no-op in a single process)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    values = {"step": float(step), "parameters": parameter_checksum(model)}
    if objective.bank is not None:
        values["memory bank"] = objective.bank.checksum()
    check_replicas(values, when)


def _check_finite(model: nn.Module, objective: Objective, step: int, out: Path) -> None:
    """Refuse to overwrite the last good checkpoint with non-finite weights or bank rows.

    A finite loss does not prove the update after it was finite (an overflowing gradient can
    turn weights into inf while the loss that produced it was fine); one pass over the
    parameters per checkpoint is cheap next to losing the run's last usable state.
    """
    tensors = [("model." + k, v) for k, v in model.state_dict().items()]
    bank = getattr(objective, "bank", None)
    if bank is not None:
        tensors.append(("memory bank", bank.rows))
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteLossError(
                f"{name} became non-finite at step {step}; not saving it over the last good "
                f"checkpoint {out / 'checkpoint.pt'}. Try a lower optim.base_lr, a larger "
                "objective.tau, or train.amp=false")


def _checkpoint_state(cfg: C.Config, n: int, model: nn.Module, objective: Objective,
                      optimizer: torch.optim.Optimizer, permutations: torch.Tensor | None,
                      state: _LoopState, skipped_total: int) -> dict[str, Any]:
    """Everything a resumed run needs; ``skipped_total`` is summed over ranks (rank 0 writes
    the file, and its own count alone would lose the other ranks' skips)."""
    return {
        "config": C.to_dict(cfg),
        "dataset_size": n,
        "model": model.state_dict(),
        "objective": objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": {},  # bf16 autocast needs no loss scaling; kept for format stability
        "rng": rng_state(),
        "permutations": permutations,
        "position": {"epoch": state.epoch, "step": state.step, "batch": state.batch,
                     "skipped": skipped_total},
    }


def _restore(ckpt: dict[str, Any], model: nn.Module, objective: Objective,
             optimizer: torch.optim.Optimizer) -> None:
    """Strict restore: a partial load must fail loudly, never pass silently."""
    try:
        model.load_state_dict(ckpt["model"], strict=True)
        objective.load_state_dict(ckpt["objective"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint does not match this model: {str(e)[:300]}") from None
    set_rng_state(ckpt["rng"])


def knn_monitor(trunk: nn.Module, cfg: C.Config, train_source: Any, val_data: str,
                device: torch.device, env: DistEnv) -> dict[str, float]:
    """kNN top-1 / top-5 (percent) of the trunk's res5 features (NPID's weighted vote, centre
    crops) on ``val_data``, with the training images as the labelled neighbours."""
    from pirl.evaluate.features import EvalSettings
    from pirl.evaluate.knn import run_knn

    was_training = trunk.training
    broadcast_buffers(trunk)  # every rank extracts a shard: all must use rank 0's BN statistics
    settings = EvalSettings(device=device, batch_size=256, workers=cfg.train.workers,
                            quiet=cfg.train.quiet or not env.is_main, cache_dir=None)
    result = run_knn(trunk, train_source, open_source(val_data), cfg.views, settings,
                     k=cfg.train.knn_k)
    trunk.train(was_training)
    return {"knn_top1": float(result["top1"]), "knn_top5": float(result["top5"])}
