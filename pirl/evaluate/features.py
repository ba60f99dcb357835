"""Frozen-trunk feature extraction, pooled per stage and cached on disk.

Every frozen-feature protocol (kNN, linear probe, SVM, neighbours) reads its features through
:func:`extract_features`, so they share one pooling rule and one cache.

Pooling (the linear protocol of Goyal et al. 2019, which PIRL's Table 7 follows)
    res5 is global-average-pooled (``trunk_dim`` = 512 / 2048 values, the trunk's own output).
    conv1 .. res4 are adaptive-average-pooled to ``side x side`` cells with
    ``side = round(sqrt(9216 / C))`` (capped at the map's own size), so every stage gives about 9k
    values.  For ResNet-50 this reproduces the benchmark exactly: conv1 64 x 12^2 = 9216,
    res2 256 x 6^2 = 9216, res3 512 x 4^2 = 8192, res4 1024 x 3^2 = 9216; for ResNet-18 it gives
    conv1 / res2 12^2 x 64, res3 8^2 x 128, res4 6^2 x 256.  Global pooling of the early stages
    (64 values from conv1) would measure the pooling more than the representation.

Cache
    One file per (trunk weights, dataset, stage, view), named by a hash of
    * the trunk's state dict (every parameter and buffer, hashed: a checkpoint file, a random
      init and a trunk in memory are all identified by their actual weights),
    * the dataset (its length, class names, labels and every item's name from ``describe``),
    * the stage and the pooling rule,
    * the view (eval: size and resize; augmented: size, crop scale, seed and copy number).
    Files are written atomically (temporary file + rename) and loaded with
    ``torch.load(weights_only=True)``.  Features are stored as float16 (half the disk of float32;
    3 significant digits are more than a linear classifier or a cosine vote can use) unless a value
    is too large for float16, and are returned as float32.  Images edited in place under the same
    names are not detected: delete the cache directory (or pass ``cache_dir=None``) after that.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from pirl.config import ViewConfig
from pirl.console import Progress
from pirl.data.datasets import ViewDataset, collate_views
from pirl.data.sampler import usable_workers
from pirl.data.source import ImageSource
from pirl.data.views import build_eval_transform, normalize
from pirl.distributed import all_gather_ragged, any_rank, gather_sizes, is_distributed, shard
from pirl.evaluate.ensemble import TrunkEnsemble, concat_features
from pirl.trunk import STAGES, stage_features

# Target number of values per pooled stage (Goyal et al.'s benchmark: ~9k).
POOLED_DIM = 9216
# Bump when pooling or the file layout changes: old cache files then simply stop matching.
CACHE_VERSION = "features-v1"
FLOAT16_MAX = 60000.0


def default_cache_dir() -> str:
    """``$PIRL_CACHE_DIR`` or ``~/.cache/pirl/features``."""
    env = os.environ.get("PIRL_CACHE_DIR")
    return env if env else str(Path.home() / ".cache" / "pirl" / "features")


@dataclass
class EvalSettings:
    """How a protocol runs (not what it measures): device, batching, progress bars, cache."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 256
    workers: int = 4
    quiet: bool = False
    cache_dir: str | None = field(default_factory=default_cache_dir)

    def loader(self, dataset: Dataset, shuffle: bool = False,
               generator: torch.Generator | None = None, drop_last: bool = False,
               batch_size: int | None = None) -> DataLoader:
        """A DataLoader over a :class:`ViewDataset`-like dataset (bad images dropped by collate)."""
        return DataLoader(dataset, batch_size=batch_size or self.batch_size, shuffle=shuffle,
                          num_workers=usable_workers(self.workers), collate_fn=collate_views,
                          pin_memory=self.device.type == "cuda", generator=generator,
                          drop_last=drop_last, persistent_workers=False)


@dataclass
class Features:
    """Pooled features of one stage over one dataset view.

    feats: float32 [N, F]; labels: Long [N]; indices: Long [N] (dataset index of each row: rows
    of unreadable images are missing when the data pipeline is not strict).
    """

    feats: Tensor
    labels: Tensor
    indices: Tensor


# ----------------------------------------------------------------------------- views


class AsImage:
    """PIL -> {"image": uint8 [3,S,S]} (ViewDataset expects a dict-returning transform).
    A class, not a lambda, so DataLoader workers can pickle it."""

    def __init__(self, fn: Callable[[Image.Image], Tensor]) -> None:
        self.fn = fn

    def __call__(self, img: Image.Image) -> dict[str, Tensor]:
        return {"image": self.fn(img)}


class CropFlip:
    """The linear protocol's training augmentation: random resized crop + horizontal flip.

    PIL -> uint8 [3, size, size].  No colour augmentation (that belongs to pretraining).
    """

    def __init__(self, size: int, scale_min: float = 0.08) -> None:
        from torchvision import transforms as T

        self.size, self.scale_min = size, scale_min
        self.t = T.Compose([T.RandomResizedCrop(size, scale=(scale_min, 1.0), antialias=True),
                            T.RandomHorizontalFlip(), T.PILToTensor()])

    def __call__(self, img: Image.Image) -> Tensor:
        return self.t(img)


def item_seed(seed: int, copy: int, index: int) -> int:
    """A per-(seed, copy, image) seed: the same image gets the same random view in every run and
    every worker, which is what makes augmented features cacheable."""
    h = hashlib.blake2b(f"{seed}:{copy}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch (CPU), ``random`` and numpy for the block and restore their states after, so
    the caller's own random streams are untouched."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededItems(Dataset):
    """A :class:`ViewDataset` whose item ``i`` is drawn with RNG seed ``item_seed(seed, copy, i)``.

    Items are whatever the wrapped ViewDataset yields (dicts with "index" and "label", or None
    for an unreadable image when not strict).
    """

    def __init__(self, source: ImageSource, transform: Callable[[Image.Image], Any],
                 seed: int = 0, copy: int = 0, strict: bool = False) -> None:
        self.inner = ViewDataset(source, transform, strict=strict)
        self.seed, self.copy = seed, copy

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> Any:
        with seeded_rng(item_seed(self.seed, self.copy, i)):
            return self.inner[i]


@dataclass(frozen=True)
class View:
    """What an image looks like when its features are taken: a transform and its cache key.

    transform: PIL -> uint8 [3,S,S]; key: a string that changes whenever the transform's output
    could (sizes, scales, seed, copy number).
    """

    transform: Callable[[Image.Image], Tensor]
    key: str
    seed: int = 0
    copy: int = 0


def eval_view(cfg: ViewConfig) -> View:
    """Centre-crop evaluation view: resize the shorter side to eval_resize, crop image_size."""
    return View(build_eval_transform(cfg), f"eval:{cfg.image_size}:{cfg.eval_resize}")


def augmented_view(cfg: ViewConfig, copy: int, seed: int = 0, scale_min: float = 0.08) -> View:
    """Copy number ``copy`` of the crop+flip training augmentation (deterministic per image)."""
    return View(CropFlip(cfg.image_size, scale_min),
                f"cropflip:{cfg.image_size}:{scale_min}:{seed}:{copy}", seed=seed, copy=copy)


def check_labelled_splits(train: ImageSource, val: ImageSource) -> None:
    """Both splits must name the same classes in the same order, or labels mean different things
    in each; and there must be classes at all (the protocols need labels)."""
    if list(train.classes) != list(val.classes):
        diff = sorted(set(train.classes) ^ set(val.classes))[:5]
        raise ValueError(f"train and val splits have different classes ({len(train.classes)} vs "
                         f"{len(val.classes)}; e.g. {diff or 'same names, different order'})")
    if not train.classes:
        raise ValueError("the training split has no classes (evaluation needs labelled data)")


# ----------------------------------------------------------------------------- pooling


def pooled_side(stage: str, channels: int, height: int) -> int:
    """Side of the pooled grid for a stage: 1 for res5, else round(sqrt(9216 / C)) <= height."""
    if stage == "res5":
        return 1
    return max(1, min(height, round(math.sqrt(POOLED_DIM / channels))))


def pool_stage(x: Tensor, stage: str) -> Tensor:
    """Unpooled stage map [B, C, h, w] -> flat pooled feature [B, C * side^2] (see module doc)."""
    side = pooled_side(stage, x.shape[1], min(x.shape[2], x.shape[3]))
    return F.adaptive_avg_pool2d(x, side).flatten(1)


# ----------------------------------------------------------------------------- identities


def trunk_fingerprint(trunk: nn.Module) -> str:
    """Hash of every parameter and buffer of ``trunk`` (names, shapes, dtypes and bytes).

    Two trunks with the same fingerprint compute the same features; any change to any weight or
    BatchNorm statistic changes it.  This is also how the linear probe proves the trunk stayed
    frozen.  Costs one hashing pass over the weights (its time for a ResNet-50: docs/performance.md,
    "Measurements behind design choices").
    """
    h = hashlib.blake2b(digest_size=16)
    for name, t in trunk.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def source_fingerprint(source: ImageSource) -> str:
    """Hash of a dataset's length, class names, labels and item names (not the pixels)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([len(source), list(source.classes)]).encode())
    h.update(np.asarray(source.targets, dtype=np.int64).tobytes())
    for i in range(len(source)):
        h.update(source.describe(i).encode())
        h.update(b"\0")
    return h.hexdigest()


def cache_path(cache_dir: str, trunk_id: str, data_id: str, stage: str, view_key: str) -> Path:
    """Where one (trunk, data, stage, view) feature file lives."""
    key = json.dumps([CACHE_VERSION, trunk_id, data_id, stage, view_key])
    name = hashlib.blake2b(key.encode(), digest_size=20).hexdigest()
    return Path(cache_dir) / f"{stage}-{name}.pt"


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_cached(path: Path) -> Features | None:
    """Features from a cache file, or None when it is missing or unreadable (then recomputed)."""
    if not path.is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        return Features(d["features"].float(), d["labels"].long(), d["indices"].long())
    except Exception as e:  # noqa: BLE001 - a corrupt cache file must never stop an evaluation
        print(f"warning: ignoring unreadable feature cache {path} ({type(e).__name__}: {e})")
        return None


def _store(feats: Tensor) -> Tensor:
    """float16 for storage when every value fits, else float32."""
    if feats.numel() == 0 or feats.abs().max().item() < FLOAT16_MAX:
        return feats.half()
    return feats


# ----------------------------------------------------------------------------- extraction


def _gather_rows(chunks: list[Tensor], sizes: list[int]) -> Tensor:
    """This rank's stored feature chunks -> every rank's rows ``[sum(sizes), F]`` in rank order
    (just the concatenation outside a process group).

    All ranks agree on one dtype first (float32 if any rank had to keep float32) and on F (a
    rank whose shard was all unreadable has no rows to tell it); at most ~64 MB per rank are
    in flight per gather round.
    """
    local = torch.cat(chunks) if chunks else None
    if not is_distributed():
        assert local is not None
        return local
    width = max(gather_sizes(0 if local is None else local.shape[1]))
    wide = any_rank([local is not None and local.dtype == torch.float32])[0]
    dtype = torch.float32 if wide else torch.float16
    local = (torch.zeros(0, width, dtype=dtype) if local is None else local.to(dtype))
    rows = max(1, (64 << 20) // max(1, width * local.element_size()))
    return all_gather_ragged(local, sizes, chunk_rows=rows)[0]


def extract_features(trunk: nn.Module, source: ImageSource, stages: Sequence[str], view: View,
                     settings: EvalSettings, *, desc: str = "features",
                     trunk_id: str | None = None, data_id: str | None = None
                     ) -> dict[str, Features]:
    """Pooled features of ``stages`` for every image of ``source`` under ``view``.

    The trunk runs in eval mode (BatchNorm uses its running statistics) under
    ``torch.inference_mode``; it is moved to ``settings.device``.  Stages found in the cache are
    loaded; the others are computed together in one pass (a single forward serves every stage).
    ``trunk_id`` / ``data_id`` may be passed to skip re-hashing when the caller already has them.
    Returns {stage: Features} with feats [N, F] float32 on the CPU.
    """
    if isinstance(trunk, TrunkEnsemble):  # --concat: each member's (cached) features
        return concat_features([extract_features(m, source, stages, view, settings, desc=desc,
                                                 data_id=data_id) for m in trunk.members])
    for s in stages:
        if s not in STAGES:
            raise ValueError(f"unknown stage {s!r}: choose from {list(STAGES)}")
    stages = list(dict.fromkeys(stages))
    out: dict[str, Features] = {}
    paths: dict[str, Path] = {}
    if settings.cache_dir:
        trunk_id = trunk_id or trunk_fingerprint(trunk)
        data_id = data_id or source_fingerprint(source)
        for s in stages:
            paths[s] = cache_path(settings.cache_dir, trunk_id, data_id, s, view.key)
            hit = _load_cached(paths[s])
            if hit is not None:
                out[s] = hit
    missing = [s for s in stages if s not in out]
    if is_distributed():
        # Every rank must take the same branch (extraction has collectives): recompute a stage
        # unless every rank found it in its cache.
        agreed = any_rank([s in missing for s in stages])
        missing = [s for s, m in zip(stages, agreed, strict=True) if m]
    if not missing:
        return out

    device = settings.device
    trunk.eval().to(device)
    dataset: Dataset = SeededItems(source, AsImage(view.transform), seed=view.seed,
                                   copy=view.copy)
    if is_distributed():
        # Data-parallel (inside a torchrun job): each rank extracts a contiguous shard; the
        # shards are gathered in rank order below, which is dataset order again.
        dataset = Subset(dataset, list(shard(len(source))))
    chunks: dict[str, list[Tensor]] = {s: [] for s in missing}
    labels: list[Tensor] = []
    indices: list[Tensor] = []
    with torch.inference_mode():
        for batch in Progress(settings.loader(dataset), desc=f"{desc} {','.join(missing)}",
                              unit="batch", disable=settings.quiet):
            if "index" not in batch:  # every image of this batch was unreadable
                continue
            x = normalize(batch["image"].to(device, non_blocking=True))
            maps = stage_features(trunk, x, missing)
            for s in missing:
                # Stored as float16 right away: 5 stages x 9k values x |D| images in float32
                # would be the largest memory use of any protocol.
                chunks[s].append(_store(pool_stage(maps[s], s).float().cpu()))
            labels.append(batch["label"].long().cpu())
            indices.append(batch["index"].long().cpu())
    lab = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    idx = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
    sizes = gather_sizes(idx.numel())
    if sum(sizes) == 0:
        raise RuntimeError(f"{desc}: no readable image in the dataset ({len(source)} items)")
    lab, idx = all_gather_ragged(lab, sizes)[0], all_gather_ragged(idx, sizes)[0]
    write_cache = bool(settings.cache_dir) and (not is_distributed()
                                                or torch.distributed.get_rank() == 0)
    for s in missing:
        stored = _gather_rows(chunks[s], sizes)
        if write_cache:
            _save_atomic({"features": stored, "labels": lab, "indices": idx,
                          "stage": s, "view": view.key}, paths[s])
        out[s] = Features(stored.float(), lab, idx)
    return out
