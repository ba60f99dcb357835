"""Streaming linear probe: the linear protocol without a feature cache, for datasets whose
pooled features would not fit in memory (ImageNet's 1.28M images x ~9k values per stage).

Same protocol as :mod:`pirl.evaluate.linear` (SGD lr 0.01, momentum 0.9, weight decay 5e-4, lr
x0.1 after 1/3 and 2/3 of the epochs; random-resized-crop + flip for training, centre crop for
val; the frozen trunk in eval mode, hash-checked before and after), computed online: every
training batch goes through the trunk once, and one linear head per requested stage trains on
that batch's pooled features (:func:`~pirl.evaluate.features.pool_stage`, the cached mode's
pooling), so the trunk forward is shared by all heads.  Nothing per image is kept except the
epoch's shuffle order (8 bytes per image), so memory does not grow with the dataset.

Why the two modes agree
    * Epoch ``e`` sees image ``i`` through crop+flip drawn with the seed of (seed, copy ``e``,
      ``i``): exactly the cached mode's augmented copy ``e``.  With ``aug_copies = epochs`` the
      cached mode trains on the very same augmented images; with fewer copies it reuses them,
      while the stream always draws fresh ones (the online protocol).
    * Batches follow the cached mode's shuffle (``randperm`` from a generator seeded with
      ``seed``, one draw per epoch), heads start from the same seeded init and take the same SGD
      steps with the same lr schedule.
    * Standardisation: the cached mode standardises each feature with the mean and std of the
      first augmented copy of the whole training split.  The stream estimates the same numbers in
      a first pass over that same copy-0 view of ``stat_images`` training images (a seeded random
      subset, so every class is represented; all of them when the split is smaller) and then
      freezes them.  For splits up to ``stat_images`` the statistics are the cached mode's up to
      its float16 storage; beyond, they are an estimate of the same population values from 10k
      samples (standard error ~1% of a std), and a linear classifier on an affinely re-scaled
      input can represent exactly the same decision function, so only SGD's conditioning shifts
      by that 1%.  Frozen statistics also keep the classifier linear in the trunk's features.
    What remains different: the cached mode stores features as float16, and on a GPU the stream
    runs the trunk under bf16 autocast (the cached mode in float32).

Checkpoints: with ``out`` given, heads, optimizer, the shuffle generator, the statistics and the
epoch are written to ``out/linear_stream.pt`` after every epoch; a rerun with the same settings
resumes from it (a finished run only re-evaluates).  Inside a torchrun job every rank takes a
contiguous slice of each global batch (the convention of :mod:`pirl.data.sampler`), the heads are
wrapped in DDP (gradients all-reduced) and rank 0 writes the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler, Subset

from pirl.config import ViewConfig
from pirl.console import Progress
from pirl.data.datasets import collate_views
from pirl.data.sampler import usable_workers
from pirl.data.source import ImageSource
from pirl.data.views import normalize
from pirl.distributed import comm_device, gather_sizes, is_distributed, shard
from pirl.evaluate.ensemble import members
from pirl.evaluate.features import (
    AsImage,
    EvalSettings,
    SeededItems,
    View,
    _save_atomic,
    augmented_view,
    check_labelled_splits,
    eval_view,
    pool_stage,
    seeded_rng,
    source_fingerprint,
    trunk_fingerprint,
)
from pirl.evaluate.linear import STD_EPS, TrunkChangedError, step_milestones
from pirl.evaluate.metrics import make_generator
from pirl.trunk import STAGES, stage_features

CHECKPOINT = "linear_stream.pt"
FORMAT = "pirl-linear-stream-v1"
STAT_IMAGES = 10_000  # images whose features estimate the standardisation statistics


# ----------------------------------------------------------------------------- features


def pooled_batch(trunk: nn.Module, x: Tensor, stages: Sequence[str],
                 bf16: bool) -> dict[str, Tensor]:
    """Pooled features of one normalised batch ``x`` [B, 3, S, S] for each stage: float32
    ``[B, F]`` (an ensemble's members side by side).  No autograd graph: the trunk is frozen."""
    parts: dict[str, list[Tensor]] = {s: [] for s in stages}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16,
                                         enabled=bf16 and x.device.type == "cuda"):
        for m in members(trunk):
            maps = stage_features(m, x, stages)  # type: ignore[arg-type]
            for s in stages:
                # pool in float32: averaging thousands of bf16 values would lose digits
                parts[s].append(pool_stage(maps[s].float(), s))
    return {s: torch.cat(p, dim=1) for s, p in parts.items()}


def stage_dims(trunk: nn.Module, stages: Sequence[str], image_size: int) -> dict[str, int]:
    """Pooled feature size per stage at ``image_size`` (one dummy forward on the trunk's
    device)."""
    dev = next(trunk.parameters()).device
    trunk.eval()
    x = torch.zeros(1, 3, image_size, image_size, device=dev)
    return {s: f.shape[1] for s, f in pooled_batch(trunk, x, stages, bf16=False).items()}


# ----------------------------------------------------------------------------- data


class GlobalBatches(Sampler[list[int]]):
    """This rank's share of each global batch of ``order``: global batch ``k`` is
    ``order[k*B : (k+1)*B]`` and rank ``r`` of ``W`` takes its ``r``-th contiguous slice (possibly
    empty for a short last batch), so every rank yields the same number of batches."""

    def __init__(self, order: Tensor, batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.order, self.batch_size, self.rank, self.world = order, batch_size, rank, world

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for lo in range(0, len(self.order), self.batch_size):
            g = self.order[lo:lo + self.batch_size]
            n = len(g)
            yield g[self.rank * n // self.world:(self.rank + 1) * n // self.world].tolist()


def _loader(source: ImageSource, view: View, settings: EvalSettings,
            batches: Sampler[list[int]] | None = None, indices: Sequence[int] | None = None
            ) -> DataLoader:
    """Batches of ``view`` over ``source``: by ``batches`` (index lists), or the ``indices`` in
    order in batches of ``settings.batch_size``."""
    ds: Any = SeededItems(source, AsImage(view.transform), seed=view.seed, copy=view.copy)
    common: dict[str, Any] = {"num_workers": usable_workers(settings.workers),
                              "collate_fn": collate_views,
                              "pin_memory": settings.device.type == "cuda"}
    if batches is not None:
        return DataLoader(ds, batch_sampler=batches, **common)
    # ``indices`` may be a range: no per-image list for the val pass
    return DataLoader(Subset(ds, indices if indices is not None else []),
                      batch_size=settings.batch_size, **common)


def _all_sum(t: Tensor) -> Tensor:
    """Sum over ranks (identity outside a process group)."""
    if not is_distributed():
        return t
    dev = t.device
    u = t.to(comm_device())
    dist.all_reduce(u)
    return u.to(dev)


# ----------------------------------------------------------------------------- heads


class ProbeHeads(nn.Module):
    """One linear classifier per stage on frozen-statistics standardised features.

    forward({stage: [B, F_s]}) -> {stage: logits [B, C]}.  ``mean_<stage>`` / ``std_<stage>``
    buffers hold the standardisation (zeros / ones until set).
    """

    def __init__(self, dims: dict[str, int], num_classes: int, seed: int) -> None:
        super().__init__()
        self.stages = list(dims)
        self.heads = nn.ModuleDict()
        for s, d in dims.items():
            with seeded_rng(seed):  # the cached mode's init, head by head
                self.heads[s] = nn.Linear(d, num_classes)
            self.register_buffer(f"mean_{s}", torch.zeros(d))
            self.register_buffer(f"std_{s}", torch.ones(d))

    def forward(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for s in self.stages:
            x = (feats[s] - getattr(self, f"mean_{s}")) / getattr(self, f"std_{s}")
            out[s] = self.heads[s](x)
        return out


def feature_stats(trunk: nn.Module, train: ImageSource, view: View, dims: dict[str, int],
                  settings: EvalSettings, limit: int, seed: int, bf16: bool
                  ) -> dict[str, tuple[Tensor, Tensor]]:
    """{stage: (mean [F], std [F])} for the stages of ``dims`` ({stage: F}) over ``view`` of
    ``limit`` training images (a seeded subset, read in index order; every image when the split
    is smaller), with the cached mode's regularised std ``sqrt(var + STD_EPS * mean(var))``.
    Running float64 sums of the features and of their squares (O(F) memory; all-reduced over
    ranks): float64 keeps the variance to ~10 digits even for a feature whose mean is 100x its
    std."""
    n = len(train)
    chosen: Sequence[int] = range(n)
    if n > limit:  # a random subset: ImageFolder order would give the first classes only
        chosen = torch.randperm(n, generator=make_generator(seed + 1))[:limit].sort()[0].tolist()
    device = settings.device
    stages = list(dims)
    sums = {s: torch.zeros(2, d, dtype=torch.float64, device=device) for s, d in dims.items()}
    count = torch.zeros((), dtype=torch.float64, device=device)
    for batch in Progress(_loader(train, view, settings, indices=[chosen[i] for i in
                                                                   shard(len(chosen))]),
                          desc="stream stats", unit="batch", disable=settings.quiet):
        if "index" not in batch:
            continue
        feats = pooled_batch(trunk, normalize(batch["image"].to(device)), stages, bf16)
        for s, f in feats.items():
            f = f.double()
            sums[s] += torch.stack([f.sum(0), (f * f).sum(0)])
        count += len(batch["index"])
    count = _all_sum(count)
    if count < 2:
        raise RuntimeError("stream stats: fewer than 2 readable training images")
    out = {}
    for s in stages:
        total = _all_sum(sums[s])
        mean = total[0] / count
        var = ((total[1] - count * mean ** 2) / (count - 1)).clamp_min(0)  # unbiased, as .var()
        std = (var + STD_EPS * var.mean().clamp_min(1e-12)).sqrt()
        out[s] = (mean.float(), std.float())
    return out


# ----------------------------------------------------------------------------- training


def lr_at(lr: float, epochs: int, epoch: int) -> float:
    """The learning rate of ``epoch``: x0.1 after each of :func:`step_milestones` (the cached
    mode's MultiStepLR, computed from the epoch so a resumed run needs no scheduler state)."""
    return lr * 0.1 ** sum(1 for m in step_milestones(epochs) if m <= epoch)


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, loader: DataLoader,
                 trunk: nn.Module, dims: dict[str, int], settings: EvalSettings, bf16: bool,
                 desc: str) -> dict[str, float]:
    """One pass over ``loader``: every batch through the trunk once, one SGD step of every head.
    Returns the epoch's mean cross-entropy per stage (over every rank's images)."""
    device, stages = settings.device, list(dims)
    _, world = _world()
    totals = torch.zeros(len(stages), dtype=torch.float64, device=device)
    seen = 0
    for batch in Progress(loader, desc=desc, unit="batch", disable=settings.quiet):
        if "index" in batch:
            x = normalize(batch["image"].to(device, non_blocking=True))
            feats = pooled_batch(trunk, x, stages, bf16)
            y = batch["label"].long().to(device)
        else:  # nothing readable here; other ranks may still have images: join their step
            feats = {s: torch.zeros(0, d, device=device) for s, d in dims.items()}
            y = torch.zeros(0, dtype=torch.long, device=device)
        b = len(y)
        global_b = sum(gather_sizes(b))
        if global_b == 0:  # every rank agrees: no step
            continue
        logits = model(feats)
        # DDP averages gradients over ranks; the factor turns this rank's mean into its share
        # of the global batch's mean (exactly 1.0 in a single process: the cached mode's loss).
        share = b * world / global_b
        per_stage = [F.cross_entropy(logits[s], y) * share if b else logits[s].sum() * 0.0
                     for s in stages]
        opt.zero_grad(set_to_none=True)
        torch.stack(per_stage).sum().backward()  # heads are disjoint: each gets its own gradient
        opt.step()
        if b:
            totals += torch.stack(per_stage).detach().double() * (global_b / world)
        seen += global_b
    totals = _all_sum(totals)
    mean = (totals / max(seen, 1)).tolist()
    for s, v in zip(stages, mean, strict=True):
        if not torch.isfinite(torch.tensor(v)):
            raise FloatingPointError(f"{desc}: the {s} head's training loss became {v}")
    return dict(zip(stages, mean, strict=True))


def _evaluate(heads: nn.Module, trunk: nn.Module, val: ImageSource, view: View,
              stages: Sequence[str], num_classes: int, settings: EvalSettings,
              bf16: bool) -> dict[str, dict[str, float]]:
    """Top-1 / top-5 (percent) of every head on the val split, from running hit counts."""
    device = settings.device
    k = min(5, num_classes)  # as topk_accuracy: top-5 of fewer classes is capped
    hits = torch.zeros(len(stages), 2, dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    heads.eval()
    for batch in Progress(_loader(val, view, settings, indices=shard(len(val))),
                          desc="stream val", unit="batch", disable=settings.quiet):
        if "index" not in batch:
            continue
        y = batch["label"].long().to(device)
        feats = pooled_batch(trunk, normalize(batch["image"].to(device)), stages, bf16)
        with torch.no_grad():
            logits = heads(feats)
        for i, s in enumerate(stages):
            hit = logits[s].topk(k, dim=1).indices == y[:, None]  # [B, k]
            hits[i, 0] += hit[:, 0].sum()
            hits[i, 1] += hit.any(dim=1).sum()
        count += len(y)
    hits, count = _all_sum(hits), _all_sum(count)
    if count == 0:
        raise RuntimeError("stream val: no readable image in the val split")
    acc = (100.0 * hits / count).tolist()
    return {s: {"top1": acc[i][0], "top5": acc[i][1]} for i, s in enumerate(stages)}


# ----------------------------------------------------------------------------- protocol


def _resume(path: Path, key: dict[str, Any], heads: nn.Module, opt: torch.optim.Optimizer,
            gen: torch.Generator) -> tuple[int, dict[str, list[float]]] | None:
    """Load ``path`` into heads / optimizer / generator: (epochs done, loss history), or None
    when there is no checkpoint.  A checkpoint of other settings is an error, not overwritten."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a streaming linear-probe checkpoint")
    if state["key"] != key:
        diff = sorted(k for k in key if state["key"].get(k) != key[k])
        raise ValueError(f"{path} belongs to a probe with other settings (differ: "
                         f"{', '.join(diff)}); delete it or choose another --out")
    heads.load_state_dict(state["heads"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    return int(state["epoch"]), {s: list(v) for s, v in state["losses"].items()}


def run_linear_stream(trunk: nn.Module, train: ImageSource, val: ImageSource,
                      view_cfg: ViewConfig, settings: EvalSettings,
                      stages: Sequence[str] = ("res5",), epochs: int = 30, lr: float = 0.01,
                      momentum: float = 0.9, weight_decay: float = 5e-4,
                      batch_size: int = 256, seed: int = 0, crop_scale_min: float = 0.08,
                      standardize: bool = True, out: str | Path | None = None,
                      stat_images: int = STAT_IMAGES, bf16: bool = True) -> dict[str, Any]:
    """The linear protocol computed online; see the module docstring.

    ``trunk``: a trunk or a :class:`~pirl.evaluate.ensemble.TrunkEnsemble`.  ``batch_size``:
    images per SGD step (global, over all ranks), which is also the trunk's batch during
    training; ``settings.batch_size`` serves the statistics and val passes.  ``out``: folder of
    the per-epoch checkpoint (None: no checkpoint).  Returns the cached mode's result dict
    (``layers`` {stage: {"top1", "top5", "dim", "final_loss"}}, ``best_layer``, ...) plus
    ``"mode": "stream"``.  Raises :class:`TrunkChangedError` if the trunk's state changed.
    """
    check_labelled_splits(train, val)
    stages = list(dict.fromkeys(stages))
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"unknown stages {bad}: choose from {list(STAGES)}")
    if epochs < 1 or batch_size < 1 or stat_images < 2:
        raise ValueError(f"linear stream: epochs ({epochs}) and batch size ({batch_size}) must "
                         f"be >= 1 and stat_images ({stat_images}) >= 2")
    device, (rank, world) = settings.device, _world()
    before = trunk_fingerprint(trunk)
    trunk.eval().to(device)
    dims = stage_dims(trunk, stages, view_cfg.image_size)
    num_classes = len(train.classes)
    heads = ProbeHeads(dims, num_classes, seed).to(device)
    opt = torch.optim.SGD(heads.parameters(), lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
    gen = make_generator(seed)
    key = {"trunk_hash": before, "train": source_fingerprint(train), "stages": stages,
           "dims": [dims[s] for s in stages], "epochs": epochs, "lr": lr, "momentum": momentum,
           "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed,
           "crop_scale_min": crop_scale_min, "standardize": standardize,
           "stat_images": stat_images, "view": augmented_view(view_cfg, 0, seed,
                                                              crop_scale_min).key}
    path = Path(out) / CHECKPOINT if out is not None else None
    resumed = _resume(path, key, heads, opt, gen) if path is not None else None
    start, losses = resumed if resumed else (0, {s: [] for s in stages})
    if resumed is None and standardize:
        # Copy 0 of the augmentation: the view whose statistics the cached mode uses.
        stats = feature_stats(trunk, train, augmented_view(view_cfg, 0, seed, crop_scale_min),
                              dims, settings, stat_images, seed, bf16)
        for s, (mean, std) in stats.items():
            getattr(heads, f"mean_{s}").copy_(mean)
            getattr(heads, f"std_{s}").copy_(std)
    model: nn.Module = heads
    if is_distributed():
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(heads, device_ids=[device] if device.type == "cuda" else None)

    for epoch in range(start, epochs):
        for group in opt.param_groups:
            group["lr"] = lr_at(lr, epochs, epoch)
        heads.train()
        order = torch.randperm(len(train), generator=gen)  # the cached mode's shuffle
        loader = _loader(train, augmented_view(view_cfg, epoch, seed, crop_scale_min), settings,
                         batches=GlobalBatches(order, batch_size, rank, world))
        epoch_loss = _train_epoch(model, opt, loader, trunk, dims, settings, bf16,
                                  f"stream epoch {epoch + 1}/{epochs}")
        for s in stages:
            losses[s].append(epoch_loss[s])
        if path is not None and rank == 0:
            _save_atomic({"format": FORMAT, "key": key, "epoch": epoch + 1,
                          "heads": heads.state_dict(), "optimizer": opt.state_dict(),
                          "generator": gen.get_state(), "losses": losses}, path)

    scores = _evaluate(heads, trunk, val, eval_view(view_cfg), stages, num_classes, settings,
                       bf16)
    after = trunk_fingerprint(trunk)
    if after != before:
        raise TrunkChangedError(f"the trunk's weights changed during the streaming linear probe "
                                f"(hash {before} -> {after}); the result would not be a "
                                "frozen-feature evaluation")
    layers = {s: {"top1": scores[s]["top1"], "top5": scores[s]["top5"], "dim": dims[s],
                  "final_loss": losses[s][-1] if losses[s] else float("nan")} for s in stages}
    best = max(layers, key=lambda s: layers[s]["top1"])
    return {"protocol": "linear", "mode": "stream", "layers": layers, "best_layer": best,
            "epochs": epochs, "aug_copies": epochs, "lr": lr, "momentum": momentum,
            "weight_decay": weight_decay, "batch_size": batch_size,
            "milestones": step_milestones(epochs), "standardize": standardize,
            "crop_scale_min": crop_scale_min, "seed": seed, "trunk_hash": before,
            "trunk_unchanged": True, "num_train": len(train), "num_val": len(val),
            "stat_images": min(stat_images, len(train)) if standardize else 0,
            "resumed_at_epoch": start, "checkpoint": str(path) if path else None,
            "bf16": bf16 and device.type == "cuda"}
