"""Linear probe on a frozen stage (PIRL Table 7; Goyal et al. 2019's protocol).

Recipe: SGD, lr 0.01, momentum 0.9, weight decay 5e-4, lr x0.1 twice at equal intervals (after
1/3 and 2/3 of the epochs), cross-entropy; random-resized-crop + flip on the training split,
centre crop on the val split; top-1 and top-5.  The trunk stays in eval mode (BatchNorm uses its
running statistics) and its weights are hashed before and after: a probe that changed the trunk
raises instead of reporting.

Augmentation through a frozen trunk
    The trunk is frozen, so an augmented image's features depend only on the image and the random
    crop.  We therefore extract ``aug_copies`` augmented copies of the training split once (each
    image gets an independent, seeded crop+flip per copy; cached like all features) and epoch e
    trains on copy e mod aug_copies.  With ``aug_copies = epochs`` this *is* the online protocol
    (a fresh augmentation each epoch, through the same frozen trunk); fewer copies trade a little
    augmentation diversity for ``epochs / aug_copies`` times less trunk compute, which is what
    makes the protocol affordable on a CPU.  The default (5 copies for 30 epochs) is that trade.

Feature standardisation
    Each pooled feature is standardised with the mean and standard deviation of the first
    training copy before the linear layer.  This is a fixed affine map, so the classifier is still
    linear in the trunk's features; it plays the role of the non-affine BatchNorm (in eval mode:
    fixed statistics) that Goyal et al.'s / VISSL's probes put before the linear layer, and it lets
    the one learning rate serve stages whose raw scales differ by orders of magnitude.
    ``standardize=False`` trains on the raw pooled features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pirl.config import ViewConfig
from pirl.console import Progress
from pirl.data.source import ImageSource
from pirl.evaluate.features import (
    EvalSettings,
    Features,
    augmented_view,
    check_labelled_splits,
    eval_view,
    extract_features,
    seeded_rng,
    source_fingerprint,
    trunk_fingerprint,
)
from pirl.evaluate.metrics import make_generator, markdown_table, topk_accuracy
from pirl.trunk import STAGES

# Standardisation eps as a fraction of the mean feature variance (see train_linear_head).
STD_EPS = 0.01


class TrunkChangedError(RuntimeError):
    """The trunk's weights or BatchNorm statistics changed during a frozen-feature protocol."""


def step_milestones(epochs: int) -> list[int]:
    """Epochs after which lr is multiplied by 0.1: two equal-interval steps (10, 20 for 30)."""
    return sorted({m for m in (epochs // 3, 2 * epochs // 3) if 0 < m < epochs})


def train_linear_head(train_copies: Callable[[int], Features], num_copies: int,
                      val: Features, num_classes: int, epochs: int = 30, lr: float = 0.01,
                      momentum: float = 0.9, weight_decay: float = 5e-4,
                      batch_size: int = 256, seed: int = 0, standardize: bool = True,
                      device: torch.device | None = None, quiet: bool = True,
                      desc: str = "linear") -> dict[str, Any]:
    """Train one linear classifier and score it on ``val``.

    train_copies: callable copy -> Features (train split, feats [N, F]); epoch e uses copy
    e % num_copies.  val: Features [M, F].  Returns {"top1", "top5", "final_loss", "dim"}.
    """
    device = device or torch.device("cpu")
    first: Features = train_copies(0)
    dim = first.feats.shape[1]
    if standardize:
        mean, var = first.feats.mean(0), first.feats.var(0)
        # A BatchNorm-style eps, relative to the features' own scale: a channel (nearly) dead in
        # the training copy has var ~ 0, and 1/sqrt(var) would blow its few non-zero values in
        # other copies / the val split up by 1e5 (and the SGD with them).
        std = (var + STD_EPS * var.mean().clamp_min(1e-12)).sqrt()
    else:
        mean, std = torch.zeros(dim), torch.ones(dim)
    mean, std = mean.to(device), std.to(device)

    with seeded_rng(seed):
        head = nn.Linear(dim, num_classes).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, step_milestones(epochs), gamma=0.1)
    gen = make_generator(seed)
    loss_val = float("nan")
    for epoch in Progress(range(epochs), desc=desc, unit="epoch", disable=quiet):
        data = first if epoch % num_copies == 0 else train_copies(epoch % num_copies)
        keep = data.labels >= 0
        x_all, y_all = data.feats[keep], data.labels[keep]
        order = torch.randperm(len(y_all), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x = (x_all[idx].to(device) - mean) / std  # [b, F]
            y = y_all[idx].to(device)
            loss = F.cross_entropy(head(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        loss_val = total / max(count, 1)
        if not torch.isfinite(torch.tensor(loss_val)):
            raise FloatingPointError(f"{desc}: training loss became {loss_val} at epoch {epoch}")
        sched.step()
    head.eval()
    with torch.no_grad():
        scores = torch.cat([head((val.feats[s:s + 4096].to(device) - mean) / std).cpu()
                            for s in range(0, len(val.labels), 4096)])
    return {"dim": dim, "final_loss": loss_val, **topk_accuracy(scores, val.labels)}


def run_linear(trunk: nn.Module, train: ImageSource, val: ImageSource, view_cfg: ViewConfig,
               settings: EvalSettings, stages: Sequence[str] = ("res5",), epochs: int = 30,
               aug_copies: int = 5, lr: float = 0.01, momentum: float = 0.9,
               weight_decay: float = 5e-4, batch_size: int = 256, seed: int = 0,
               crop_scale_min: float = 0.08, standardize: bool = True) -> dict[str, Any]:
    """The linear protocol on each of ``stages``; see the module docstring.

    Returns {"protocol": "linear", "layers": {stage: {"top1", "top5", "dim", "final_loss"}},
    "best_layer": stage, ...}.  Raises :class:`TrunkChangedError` if the trunk's state changed.
    """
    check_labelled_splits(train, val)
    for s in stages:
        if s not in STAGES:
            raise ValueError(f"unknown stage {s!r}: choose from {list(STAGES)}")
    if epochs < 1 or aug_copies < 1:
        raise ValueError(f"linear: epochs ({epochs}) and aug_copies ({aug_copies}) must be >= 1")
    stages = list(dict.fromkeys(stages))
    copies = min(aug_copies, epochs)  # more copies than epochs would never be read
    before = trunk_fingerprint(trunk)
    train_id, val_id = source_fingerprint(train), source_fingerprint(val)

    val_feats = extract_features(trunk, val, stages, eval_view(view_cfg), settings,
                                 desc="val", trunk_id=before, data_id=val_id)
    # Extract every copy once for all stages (one forward serves them all).  With a cache the
    # copies go to disk and each epoch reloads its own; without one they must stay in memory.
    held: dict[int, dict[str, Features]] = {}
    for c in range(copies):
        feats = extract_features(trunk, train, stages, augmented_view(view_cfg, c, seed,
                                                                      crop_scale_min),
                                 settings, desc=f"train copy {c + 1}/{copies}",
                                 trunk_id=before, data_id=train_id)
        if not settings.cache_dir:
            held[c] = feats
        del feats

    def copy_loader(stage: str) -> Callable[[int], Features]:
        def load(c: int) -> Features:
            if c in held:
                return held[c][stage]
            view = augmented_view(view_cfg, c, seed, crop_scale_min)
            return extract_features(trunk, train, [stage], view, settings, desc="train",
                                    trunk_id=before, data_id=train_id)[stage]
        return load

    layers: dict[str, dict[str, Any]] = {}
    for s in stages:
        layers[s] = train_linear_head(
            copy_loader(s), copies, val_feats[s], len(train.classes), epochs=epochs, lr=lr,
            momentum=momentum, weight_decay=weight_decay, batch_size=batch_size, seed=seed,
            standardize=standardize, device=settings.device, quiet=settings.quiet,
            desc=f"linear {s}")

    after = trunk_fingerprint(trunk)
    if after != before:
        raise TrunkChangedError(f"the trunk's weights changed during the linear probe "
                                f"(hash {before} -> {after}); the result would not be a "
                                "frozen-feature evaluation")
    best = max(layers, key=lambda s: layers[s]["top1"])
    return {"protocol": "linear", "layers": layers, "best_layer": best,
            "epochs": epochs, "aug_copies": copies, "lr": lr, "momentum": momentum,
            "weight_decay": weight_decay, "batch_size": batch_size,
            "milestones": step_milestones(epochs), "standardize": standardize,
            "crop_scale_min": crop_scale_min, "seed": seed, "trunk_hash": before,
            "trunk_unchanged": True, "num_train": len(train), "num_val": len(val)}


def layer_table(result: dict[str, Any], name: str = "model") -> str:
    """Table 7 form: one row, one column per stage (top-1), the best layer in bold."""
    layers = result["layers"]
    cols = [s for s in STAGES if s in layers]
    cells = [f"**{layers[s]['top1']:.2f}**" if s == result["best_layer"]
             else f"{layers[s]['top1']:.2f}" for s in cols]
    return markdown_table(["method"] + cols, [[name] + cells])


def details_table(result: dict[str, Any]) -> str:
    """One row per stage: feature size, top-1, top-5, final training loss."""
    layers = result["layers"]
    rows = [[s + (" (best)" if s == result["best_layer"] else ""), layers[s]["dim"],
             layers[s]["top1"], layers[s]["top5"], layers[s]["final_loss"]]
            for s in STAGES if s in layers]
    return markdown_table(["stage", "dims", "top-1", "top-5", "final loss"], rows)

