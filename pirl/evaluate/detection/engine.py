"""Fine-tuning and prediction loops of the detection protocol.

Data order is a pure function of (seed, iteration): iteration k takes positions
``[k*G, (k+1)*G)`` (G = global batch) of an endless stream of per-epoch permutations, each
seeded with (seed, epoch), and the horizontal flip of each position is seeded with (seed,
position).  A resumed run therefore sees exactly the batches it would have seen, with no
sampler state to save; under torchrun rank r takes the r-th slice of each global batch.

Checkpoints (``OUT/detection_ckpt.pt``, the previous one kept as ``detection_ckpt.prev.pt``)
hold the model, the optimizer, the RNG states and the settings that must not change on resume;
rerunning the same command continues from the newest readable one, and a finished run goes
straight to evaluation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pirl.checkpoint import atomic_save, rng_state, safe_load, set_rng_state
from pirl.config import ConfigError
from pirl.console import Progress
from pirl.data.source import BadImageError, UnreadableDataError
from pirl.data.voc import VOCSource
from pirl.distributed import DistEnv, is_distributed
from pirl.evaluate.detection.schedule import Schedule

log = logging.getLogger(__name__)

CKPT = "detection_ckpt.pt"
CKPT_PREV = "detection_ckpt.prev.pt"
FORMAT = "pirl-detection"
_SHOW_EVERY = 20  # iterations between loss readouts on the progress display


class DivergedError(RuntimeError):
    """The fine-tuning loss became NaN or infinite (the message says at which iteration)."""


@dataclass
class LoopSettings:
    """How to run: device, processes, loader, precision, checkpoints, progress."""

    env: DistEnv
    per_rank_batch: int = 2
    workers: int = 2
    seed: int = 0
    strict: bool = False
    checkpoint_every: int = 1000
    quiet: bool = False
    bf16: bool = True  # autocast to bfloat16 on CUDA; ignored on CPU

    @property
    def device(self) -> torch.device:
        return self.env.device

    def autocast(self) -> torch.autocast:
        on = self.bf16 and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=on)


# ----------------------------------------------------------------------------- data


class IterationBatches(Sampler[list[tuple[int, bool]]]):
    """This rank's (index, flip) pairs for iterations ``start .. total - 1`` (see module doc)."""

    def __init__(self, n: int, per_rank: int, env: DistEnv, seed: int, start: int,
                 total: int) -> None:
        self.n, self.per_rank, self.env, self.seed = n, per_rank, env, seed
        self.start, self.total = start, total
        self._epoch, self._perm = -1, np.arange(0)

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def _index(self, position: int) -> int:
        epoch = position // self.n
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(self._perm[position % self.n])

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        g = self.per_rank * self.env.world_size
        for it in range(self.start, self.total):
            first = it * g + self.env.rank * self.per_rank
            yield [(self._index(p), bool(np.random.default_rng([self.seed, p, 1]).random() < 0.5))
                   for p in range(first, first + self.per_rank)]


class DetectionItems(Dataset):
    """Items of a VOC source for the detector: key (index, flip) -> (uint8 [3,H,W],
    {"boxes", "labels"}) or None for an unreadable image (BadImageError fatal when strict)."""

    def __init__(self, source: VOCSource, strict: bool = False) -> None:
        self.source, self.strict = source, strict

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, bool] | int) -> tuple[Tensor, dict[str, Tensor]] | None:
        i, flip = (key, False) if isinstance(key, int) else key
        try:
            image, target = self.source[i]
        except BadImageError as e:
            if self.strict:
                raise UnreadableDataError(f"unreadable image {e.path}: {e.reason} (fatal "
                                          "because of --strict-data)") from e
            log.warning("skipping unreadable image %s: %s", e.path, e.reason)
            return None
        boxes = target["boxes"]
        if flip:
            image = image.flip(-1)
            w = image.shape[-1]
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        return image, {"boxes": boxes, "labels": target["labels"],
                       "image_id": target["image_id"]}


def _keep_readable(batch: list[Any]) -> list[Any]:
    return [b for b in batch if b is not None]


def _to_device(items: list[tuple[Tensor, dict[str, Tensor]]], device: torch.device
               ) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    images = [img.to(device, non_blocking=True).float().div_(255.0) for img, _ in items]
    targets = [{k: v.to(device) for k, v in t.items() if k in ("boxes", "labels")}
               for _, t in items]
    return images, targets


# ----------------------------------------------------------------------------- checkpoints


def load_checkpoint(out: Path, settings_key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The newest readable fine-tuning checkpoint in ``out`` that fits ``settings_key``, None if
    there is none; ConfigError if one exists for other settings."""
    errors = []
    for path in (out / CKPT, out / CKPT_PREV):
        if not path.exists():
            continue
        try:
            ckpt = safe_load(path)
        except Exception as e:  # noqa: BLE001 - a damaged latest file falls back to the previous
            errors.append(str(e))
            log.warning("%s; trying the previous checkpoint", e)
            continue
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            errors.append(f"{path}: not a detection fine-tuning checkpoint")
            continue
        differ = [f"{k}: {ckpt['settings'].get(k)!r} -> {v!r}" for k, v in settings_key.items()
                  if ckpt["settings"].get(k) != v]
        if differ:
            raise ConfigError(f"{path} was written with other settings ({'; '.join(differ)}); "
                              "use another --out, or delete it to start over")
        return ckpt
    if errors:
        raise ConfigError("cannot resume: " + "; ".join(errors))
    return None


def _save(out: Path, model: nn.Module, opt: torch.optim.Optimizer, iteration: int,
          settings_key: Mapping[str, Any], loss: float) -> None:
    atomic_save({"format": FORMAT, "version": 1, "iteration": iteration,
                 "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "rng": rng_state(), "settings": dict(settings_key), "loss": loss},
                out / CKPT, keep_previous=out / CKPT_PREV)


# ----------------------------------------------------------------------------- training


def make_optimizer(model: nn.Module, schedule: Schedule, momentum: float = 0.9,
                   weight_decay: float = 1e-4) -> torch.optim.SGD:
    """SGD over the trainable parameters (frozen BN has none; frozen stages are excluded)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=schedule.lr_at(0), momentum=momentum,
                           weight_decay=weight_decay)


def train_detector(model: nn.Module, source: VOCSource, schedule: Schedule,
                   loop: LoopSettings, out: Path, settings_key: Mapping[str, Any]
                   ) -> dict[str, Any]:
    """Fine-tune ``model`` (a torchvision FasterRCNN, already on ``loop.device``) in place for
    ``schedule.iterations``, resuming from ``out`` when it holds a checkpoint of these settings.

    Returns {"iterations", "resumed_from", "final_loss", "loss_terms", "skipped_images"}.
    """
    env = loop.env
    opt = make_optimizer(model, schedule)
    start, final_loss = 0, float("nan")
    ckpt = load_checkpoint(out, settings_key)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start, final_loss = int(ckpt["iteration"]), float(ckpt.get("loss", float("nan")))
        if env.is_main:
            log.info("resuming the fine-tuning at iteration %d of %d from %s", start,
                     schedule.iterations, out / CKPT)
    resumed_from = start
    if start >= schedule.iterations:
        return {"iterations": schedule.iterations, "resumed_from": start,
                "final_loss": final_loss, "loss_terms": {}, "skipped_images": 0}
    train_model: nn.Module = model
    if is_distributed():
        ids = [env.device.index] if env.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    sampler = IterationBatches(len(source), loop.per_rank_batch, env, loop.seed, start,
                               schedule.iterations)
    loader = DataLoader(DetectionItems(source, loop.strict), batch_sampler=sampler,
                        num_workers=loop.workers, collate_fn=_keep_readable,
                        persistent_workers=False, pin_memory=env.device.type == "cuda")
    batches = iter(loader)
    if ckpt is not None:
        # After creating the iterator: that draws a worker seed from the global generator,
        # which the uninterrupted run did before its first iteration, not at this one.
        set_rng_state(ckpt["rng"])
    model.train()
    bar: Progress[None] = Progress(total=schedule.iterations, initial=start,
                                   desc="detection fine-tune", unit="iter",
                                   disable=loop.quiet or not env.is_main)
    terms: dict[str, float] = {}
    skipped = 0
    it = start
    for it, items in enumerate(batches, start):
        for group in opt.param_groups:
            group["lr"] = schedule.lr_at(it)
        skipped += loop.per_rank_batch - len(items)
        blank = not items
        if blank:
            # Every image of this rank's batch was unreadable: a blank image without objects
            # still goes through the (DDP) forward and backward, scaled to zero, so this rank
            # joins the gradient all-reduce and the other ranks do not wait forever.
            items = [(torch.zeros(3, 64, 64, dtype=torch.uint8),
                      {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)})]
        images, targets = _to_device(items, env.device)
        with loop.autocast():
            losses = train_model(images, targets)
        loss = sum(losses.values())
        assert isinstance(loss, Tensor)
        if blank:
            loss, losses = loss * 0.0, {}
        value = float(loss.detach())
        if not math.isfinite(value):
            raise DivergedError(f"detection fine-tuning: loss became {value} at iteration {it} "
                                f"(lr {schedule.lr_at(it):.4g}); try a smaller lr rule")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        final_loss = value
        terms = {k: float(v.detach()) for k, v in losses.items()}
        bar.update(1)
        done = it + 1
        if done % _SHOW_EVERY == 0 or done == schedule.iterations:  # a log line each off a tty
            bar.set_postfix({"loss": f"{value:.3f}", "lr": f"{schedule.lr_at(it):.2e}"})
        if done % loop.checkpoint_every == 0 or done == schedule.iterations:
            if env.is_main:
                _save(out, model, opt, done, settings_key, final_loss)
            env.barrier()
    bar.close()
    return {"iterations": schedule.iterations, "resumed_from": resumed_from,
            "final_loss": final_loss, "loss_terms": terms, "skipped_images": skipped}


# ----------------------------------------------------------------------------- prediction


@torch.inference_mode()
def predict(model: nn.Module, source: VOCSource, loop: LoopSettings
            ) -> list[dict[str, Tensor] | None]:
    """Detections for every image of ``source`` in index order: {"boxes" [D,4] xyxy px,
    "labels" [D], "scores" [D]} on the CPU, None for an unreadable image.  Under torchrun each
    rank predicts its shard and every rank receives the whole list."""
    from pirl.distributed import shard

    mine = list(shard(len(source)))
    data = DetectionItems(source, loop.strict)
    loader = DataLoader(_Indexed(data, mine), batch_size=loop.per_rank_batch,
                        num_workers=loop.workers, collate_fn=list)
    model.eval()
    found: dict[int, dict[str, Tensor] | None] = {}
    for batch in Progress(loader, desc="detection test", unit="batch",
                          disable=loop.quiet or not loop.env.is_main):
        good = [(k, item) for k, item in batch if item is not None]
        for k, item in batch:
            if item is None:
                found[k] = None
        if not good:
            continue
        images = [item[0].to(loop.device).float().div_(255.0) for _, item in good]
        with loop.autocast():
            outputs = model(images)
        for (k, _), o in zip(good, outputs, strict=True):
            found[k] = {"boxes": o["boxes"].float().cpu(), "labels": o["labels"].cpu(),
                        "scores": o["scores"].float().cpu()}
    if is_distributed():
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, found)
        for p in parts:
            found.update(p)
    return [found.get(k) for k in range(len(source))]


class _Indexed(Dataset):
    """(key, item) pairs of ``data`` at ``keys``: the key survives the trip through a worker."""

    def __init__(self, data: DetectionItems, keys: list[int]) -> None:
        self.data, self.keys = data, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, j: int) -> tuple[int, Any]:
        return self.keys[j], self.data[self.keys[j]]
