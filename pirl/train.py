"""The pretraining loop: views in, forward, loss, backward, optimizer step, bank update, log.

:func:`train_one_epoch` is the loop, the same for every method: the differences live in the
method's views, model and objective (:mod:`pirl.methods`).  :func:`pretrain` sets a run up
around it (run folder, config, processes, resume, data, log and signals, mostly in
:mod:`pirl.run`; checkpoints in :mod:`pirl.checkpoint`) and runs it once per epoch.  Running the
same command twice resumes from the run folder's checkpoint.

A step queues its work on the device and goes on without waiting for it, except on logging
steps (every ``train.log_every`` steps and at the end of each epoch): there the loss terms are
read, a non-finite loss is caught, and the ranks agree on whether a stop signal arrived.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pirl import config as C
from pirl.checkpoint import restore_training_state, save_run_checkpoint, training_state
from pirl.console import Progress
from pirl.data import open_source
from pirl.data.sampler import seed_everything
from pirl.data.views import normalize
from pirl.distributed import (
    DistEnv,
    all_reduce_mean,
    any_rank,
    broadcast_buffers,
    check_replicas,
    parameter_checksum,
    setup_distributed,
)
from pirl.kernels.colour import resolve_colour_backend
from pirl.logs import RunLogger
from pirl.methods import Objective, build_model, build_objective, permutation_set
from pirl.run import (
    LoopState,
    RunResult,
    StopFlag,
    epoch_loader,
    open_run,
    open_run_log,
    training_data,
)
from pirl.schedule import build_optimizer, lr_at, peak_lr, set_lr

log = logging.getLogger(__name__)

IMAGE_KEYS = ("image", "patches", "rotated")


class NonFiniteLossError(RuntimeError):
    """The loss or the weights became NaN or infinite; the message names the step and what to
    try."""


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


def pretrain(cfg: C.Config, data: str, out: Path, val_data: str | None = None,
             device: str | None = None, stop_after_steps: int | None = None) -> RunResult:
    """Pretrain on ``data`` into the run folder ``out`` (resuming if it holds a checkpoint).

    Args:
        cfg: the resolved config, fitted here to the dataset (:func:`pirl.methods.fit_to_dataset`:
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
    out, source, ckpt = open_run(cfg, data, out, env)
    n = len(source)

    seed_everything(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
    dev = env.device
    channels_last = cfg.train.channels_last and dev.type == "cuda"

    # The Jigsaw baseline's set, or PIRL's |T| orders: built from train.seed, kept on resume.
    permutations = permutation_set(cfg, cfg.train.seed, None if ckpt is None else
                                   ckpt.get("permutations"), resuming=ckpt is not None)
    model = build_model(cfg).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    objective = build_objective(cfg, n, dev)
    optimizer = build_optimizer(model, cfg.optim)

    steps_per_epoch = n // cfg.optim.batch_size
    total_steps = steps_per_epoch * cfg.optim.epochs
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    peak = peak_lr(cfg.optim)
    if env.is_main:
        log.info("%s; peak lr %.4g = base_lr %g x %d / 256", env.describe(cfg.optim.batch_size),
                 peak, cfg.optim.base_lr, cfg.optim.batch_size)
    state = LoopState(step=0, epoch=0, batch=0)
    if ckpt is not None:
        restore_training_state(ckpt, model, objective, optimizer)
        state = LoopState.from_position(ckpt["position"])
        if env.is_main:
            log.info("resuming from %s at epoch %d, step %d", out / "checkpoint.pt", state.epoch,
                     state.step)
    logger = open_run_log(out, state, ckpt is not None, env)
    # The checkpoint holds the total over all ranks; rank 0 carries it on so that the sum over
    # ranks (what is logged and saved) continues from it.
    if env.rank != 0:
        state.skipped = 0
    resumed_from = state.step

    train_model: nn.Module = model
    if env.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
        # DDP has broadcast rank 0's weights; the bank and the position are each rank's own, so
        # a rank that resumed from another checkpoint file (no shared file system) stops here.
        _check_replicas(model, objective, state.step, "at start" if ckpt is None else
                        f"after resuming from {out / 'checkpoint.pt'}")

    dataset, collate, workers = training_data(cfg, source, permutations, colour_backend, env)
    # The backends agree to float rounding only, so the log says which one drew the pixels.
    logger.log({"kind": "event", "step": state.step, "epoch": state.epoch,
                "event": "colour_backend", "colour_backend": colour_backend})

    def save() -> None:
        """Checkpoint (every rank calls it: the checks and the skip count are collectives)."""
        _check_replicas(model, objective, state.step, f"checkpoint at step {state.step}")
        _check_finite(model, objective, state.step, out)
        position = {"epoch": state.epoch, "step": state.step, "batch": state.batch,
                    "skipped": _skipped_total(state, env),
                    **({"readers": state.readers} if state.readers else {})}
        if env.is_main:
            save_run_checkpoint(training_state(cfg, n, model, objective, optimizer,
                                               permutations, position), out)
        env.barrier()

    run = _Run(cfg, env, out, logger, steps_per_epoch, channels_last, save,
               lr_at=lambda step: lr_at(step, total_steps, warmup_steps, peak,
                                        cfg.optim.min_lr_ratio),
               stop_at_step=None if stop_after_steps is None else state.step + stop_after_steps)
    with StopFlag() as stop:
        while state.epoch < cfg.optim.epochs:
            loader = epoch_loader(dataset, cfg, env, state, collate, workers)
            if train_one_epoch(train_model, objective, optimizer, loader, state, run, stop):
                save()
                if env.is_main:
                    log.info("stopped at step %d; rerun the same command to resume",
                             state.step)
                logger.close()
                return RunResult(out, out / "trunk.pt", state.step, state.epoch, resumed_from,
                                 run.last_record, stopped=True)
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
    skipped_all = _skipped_total(state, env)
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
    return RunResult(out, trunk_path, state.step, state.epoch, resumed_from, run.last_record)


@dataclass
class _Run:
    """What the steps of a run share, set up once by :func:`pretrain`."""

    cfg: C.Config
    env: DistEnv
    out: Path
    logger: RunLogger
    steps_per_epoch: int
    channels_last: bool
    save: Callable[[], None]  # a checkpoint; every rank calls it
    lr_at: Callable[[int], float]  # the learning rate of a global step
    stop_at_step: int | None  # stop_after_steps, as a global step
    last_record: dict[str, Any] = field(default_factory=dict)  # the latest "train" record


def train_one_epoch(model: nn.Module, objective: Objective, optimizer: torch.optim.Optimizer,
                    loader: Iterable[dict[str, Any]], state: LoopState, run: _Run,
                    stop: StopFlag) -> bool:
    """Train on ``loader``'s batches (the rest of epoch ``state.epoch``), advancing ``state``;
    returns True when the run must stop early (a stop signal, or ``run.stop_at_step``).

    ``model`` is the one to call (DDP-wrapped under data parallelism); it maps a batch of views
    (``image`` ``[B,3,S,S]``; ``patches`` ``[B,P,3,p,p]``, ``rotated``... as the method needs)
    to its outputs, which ``objective`` scores and then writes into the memory bank.
    """
    cfg, dev = run.cfg, run.env.device
    bar: Progress[None] = Progress(total=run.steps_per_epoch, initial=state.batch, unit="step",
                                   desc=f"epoch {state.epoch + 1}/{cfg.optim.epochs}",
                                   disable=cfg.train.quiet or not run.env.is_main)
    speed = _Throughput()
    # Whether any loss since the last logging step was NaN or inf, kept on the device: reading
    # the loss every step would make every step wait for the device.
    non_finite = torch.zeros((), dtype=torch.bool, device=dev)
    for raw in loader:
        lr = run.lr_at(state.step)
        set_lr(optimizer, lr)
        batch = to_device(raw, dev, run.channels_last)
        with _autocast(dev, cfg.train.amp):
            outputs = model(batch)
        outputs = {k: v.float() for k, v in outputs.items()}
        loss, terms = objective.loss(outputs, batch)
        non_finite |= ~torch.isfinite(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        objective.after_step(outputs, batch)

        state.step += 1
        state.batch += 1
        state.skipped += int(raw["skipped"].sum()) if "skipped" in raw else 0  # a CPU tensor
        speed.count(cfg.optim.batch_size)
        bar.update(1)
        stop_now = False
        if state.step % cfg.train.log_every == 0 or state.batch == run.steps_per_epoch:
            stop_now = _logging_step(run, state, lr, loss, terms, non_finite, stop, speed, bar)
        if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
            run.save()
        if stop_now or (run.stop_at_step is not None and state.step >= run.stop_at_step):
            bar.close()
            return True
    bar.close()
    return False


def _logging_step(run: _Run, state: LoopState, lr: float, loss: Tensor, terms: dict[str, Any],
                  non_finite: Tensor, stop: StopFlag, speed: _Throughput, bar: Progress[None]
                  ) -> bool:
    """The end of a logging step, where the step waits for the device: stop on a non-finite
    loss, log the loss terms (0-dim tensors or floats, averaged over ranks); returns whether a
    stop signal arrived on any rank.

    One small all-reduce makes every rank see a non-finite loss or a stop signal of any rank at
    the same step (otherwise the others would wait in the next collective forever).
    """
    env = run.env
    seen_here = bool(non_finite)
    bad, stop_now = any_rank([seen_here, stop.requested])
    if bad:
        where = f"on rank {env.rank}" if seen_here else "on another rank"
        last = float(loss.detach())
        raise NonFiniteLossError(
            f"non-finite loss at or before step {state.step} (epoch {state.epoch + 1}) {where} "
            f"(loss at step {state.step}: {last}; a non-finite loss on any rank stops all of "
            f"them); the last good checkpoint is {run.out / 'checkpoint.pt'}. Try a lower "
            "optim.base_lr, a larger objective.tau, or train.amp=false")
    values = {k: all_reduce_mean(float(v), env) for k, v in terms.items()}
    rate = speed.rate()  # after the wait above, so the time covers the device's work too
    record = {"kind": "train", "step": state.step, "epoch": state.epoch + 1, "lr": lr,
              "samples_per_s": rate, "skipped_total": _skipped_total(state, env), **values}
    run.logger.log(record)
    run.last_record = record
    bar.set_postfix({"loss": f"{values.get('loss', float('nan')):.3f}",
                     "samples/s": f"{rate:.0f}"})
    return stop_now


class _Throughput:
    """Samples per second since the previous :meth:`rate` (or since it was made)."""

    def __init__(self) -> None:
        self._since, self._samples = time.perf_counter(), 0

    def count(self, samples: int) -> None:
        self._samples += samples

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self._samples / max(now - self._since, 1e-9)
        self._since, self._samples = now, 0
        return rate


def _skipped_total(state: LoopState, env: DistEnv) -> int:
    """Unreadable images skipped so far on all ranks together (a collective)."""
    return round(all_reduce_mean(state.skipped, env) * env.world_size)


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

    The loss is checked only on logging steps, and a finite loss does not prove the update after
    it was finite (an overflowing gradient can turn weights into inf while the loss that
    produced it was fine); one pass over the parameters per checkpoint is cheap next to losing
    the run's last usable state.
    """
    tensors = [("model." + k, v) for k, v in model.state_dict().items()]
    bank = objective.bank
    if bank is not None:
        tensors.append(("memory bank", bank.rows))
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteLossError(
                f"{name} became non-finite at step {step}; not saving it over the last good "
                f"checkpoint {out / 'checkpoint.pt'}. Try a lower optim.base_lr, a larger "
                "objective.tau, or train.amp=false")


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
