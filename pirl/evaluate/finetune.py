"""Semi-supervised evaluation: fine-tune the whole network on 1% or 10% of the labels (Table 3).

The labelled subset is class-balanced and deterministic: every class contributes the same number
of images, ``round(fraction * |labelled train| / C)`` (at least 1), chosen by a seeded permutation
of that class's indices, so the same ``(dataset, fraction, seed)`` always gives the same images
(ImageNet 1% = ~13 per class).  A class with fewer images than that contributes all it has (the
result lists the per-class counts).  Or the subset is given as a file (:func:`read_subset_list`,
``--subset-list``): the image names of the standard ImageNet 1% / 10% lists, one per line.

The trunk (a copy; the caller's is untouched) and a new linear classifier on its pooled res5
feature are trained together, BatchNorm in train mode, with SGD (lr 0.01, momentum 0.9, weight
decay 5e-4, lr x0.1 twice at equal intervals, as the linear probe) on random-resized-crop + flip
views; top-1 and top-5 on the centre-cropped val split.
"""

from __future__ import annotations

import copy
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from pirl.config import ViewConfig
from pirl.console import Progress
from pirl.data.source import ImageSource
from pirl.data.views import build_eval_transform, normalize
from pirl.evaluate.features import (
    AsImage,
    CropFlip,
    EvalSettings,
    SeededItems,
    check_labelled_splits,
    seeded_rng,
)
from pirl.evaluate.linear import step_milestones
from pirl.evaluate.metrics import make_generator, topk_accuracy


def balanced_subset(targets: Sequence[int], fraction: float, seed: int = 0) -> list[int]:
    """Sorted dataset indices of a class-balanced ``fraction`` of the labelled images.

    targets: label per index (-1 = unlabelled, never chosen).  Each class gives
    ``max(1, round(fraction * n_labelled / n_classes))`` images (or all it has, if fewer), picked
    by a permutation seeded with (seed, class): adding a class does not reshuffle the others.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction}: must be in (0, 1] (e.g. 0.01 or 0.1)")
    y = np.asarray(targets, dtype=np.int64)
    classes = sorted(int(c) for c in np.unique(y[y >= 0]))
    if not classes:
        raise ValueError("balanced_subset: no labelled image (every target is -1)")
    per_class = max(1, round(fraction * int((y >= 0).sum()) / len(classes)))
    chosen: list[int] = []
    for c in classes:
        members = np.flatnonzero(y == c)
        rng = np.random.default_rng([seed, c])
        chosen.extend(int(i) for i in members[rng.permutation(len(members))[:per_class]])
    return sorted(chosen)


def read_subset_list(path: str | Path, source: ImageSource) -> list[int]:
    """Sorted indices of ``source`` named by a subset file: one image a line, as a file name
    (``n01440764_10026.JPEG``, the ImageNet 1% / 10% lists) or a relative path
    (``n01440764/n01440764_10026.JPEG``), matched against the end of each item's name.

    Raises:
        ValueError (a DatasetError): a name that matches no image or several, or an unlabelled
            match, named with ``file:line``; an empty file.
    """
    from pirl.data.source import DatasetError

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"--subset-list {path}: unreadable ({e})") from None
    by_name: dict[str, list[int]] = defaultdict(list)
    for i in range(len(source)):
        by_name[re.split(r"[/\\:]", source.describe(i))[-1]].append(i)
    chosen: set[int] = set()
    faults: list[str] = []
    for n, raw in enumerate(lines, start=1):
        entry = raw.strip().replace("\\", "/")
        if not entry or entry.startswith("#"):
            continue
        entry = entry.split()[0]  # a second column (a label) is allowed and ignored
        matches = [i for i in by_name.get(entry.rsplit("/", 1)[-1], [])
                   if "/" not in entry or source.describe(i).endswith(("/" + entry, ":" + entry))]
        if len(matches) != 1:
            faults.append(f"{path}:{n}: {entry!r} " + ("matches no image of the training split"
                          if not matches else f"matches {len(matches)} images"))
        elif source.targets[matches[0]] < 0:
            faults.append(f"{path}:{n}: {entry!r} is unlabelled")
        else:
            chosen.add(matches[0])
    if faults:
        raise DatasetError(f"--subset-list {path}: {len(faults)} bad line(s): "
                           + "; ".join(faults[:10]) + ("; ..." if len(faults) > 10 else ""))
    if not chosen:
        raise DatasetError(f"--subset-list {path}: names no image")
    return sorted(chosen)


def run_finetune(trunk: nn.Module, train: ImageSource, val: ImageSource, view_cfg: ViewConfig,
                 settings: EvalSettings, fraction: float = 0.01, epochs: int = 30,
                 lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
                 batch_size: int = 64, seed: int = 0, crop_scale_min: float = 0.08,
                 subset: Sequence[int] | None = None) -> dict[str, Any]:
    """Fine-tune a copy of ``trunk`` + a new linear head on the subset; score on ``val``.

    ``subset``: the training indices to use (e.g. :func:`read_subset_list`) instead of the
    balanced ``fraction``; the result then reports the fraction those images make up.

    trunk: forward float [B,3,S,S] -> [B, F] (a ResNet with fc = Identity).
    Returns {"protocol": "finetune", "top1", "top5", "fraction", "subset_size",
    "per_class", "final_loss", ...}.
    """
    check_labelled_splits(train, val)
    if epochs < 1 or batch_size < 2:
        raise ValueError(f"finetune: need epochs >= 1 and batch_size >= 2 (BatchNorm), got "
                         f"{epochs} and {batch_size}")
    device = settings.device
    if subset is None:
        subset = balanced_subset(train.targets, fraction, seed)
    else:
        subset = sorted(int(i) for i in subset)
        fraction = len(subset) / max(1, sum(1 for y in train.targets if y >= 0))
    counts = Counter(train.targets[i] for i in subset)

    model = copy.deepcopy(trunk).to(device)
    with torch.no_grad():
        dim = model.eval()(torch.zeros(2, 3, view_cfg.image_size, view_cfg.image_size,
                                       device=device)).shape[1]
    with seeded_rng(seed):
        head = nn.Linear(dim, len(train.classes)).to(device)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, step_milestones(epochs), gamma=0.1)
    gen = make_generator(seed)
    aug = AsImage(CropFlip(view_cfg.image_size, crop_scale_min))
    # A batch of one image breaks BatchNorm in train mode: drop a last batch of exactly one.
    drop_last = len(subset) % batch_size == 1

    loss_val = float("nan")
    for epoch in Progress(range(epochs), desc="finetune", unit="epoch", disable=settings.quiet):
        model.train()
        head.train()
        # Each epoch draws new (seeded, hence reproducible) augmentations: copy = epoch.
        data = Subset(SeededItems(train, aug, seed=seed, copy=epoch), subset)
        total, count = 0.0, 0
        for batch in settings.loader(data, shuffle=True, generator=gen, drop_last=drop_last,
                                     batch_size=batch_size):
            if "index" not in batch:  # every image of this batch was unreadable
                continue
            x = normalize(batch["image"].to(device, non_blocking=True))
            y = batch["label"].long().to(device)
            loss = F.cross_entropy(head(model(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
            count += len(y)
        loss_val = total / max(count, 1)
        if not np.isfinite(loss_val):
            raise FloatingPointError(f"finetune: loss became {loss_val} at epoch {epoch}")
        sched.step()

    model.eval()
    head.eval()
    scores, labels = [], []
    val_data = SeededItems(val, AsImage(build_eval_transform(view_cfg)))
    with torch.inference_mode():
        for batch in Progress(settings.loader(val_data), desc="finetune val", unit="batch",
                              disable=settings.quiet):
            if "index" not in batch:
                continue
            x = normalize(batch["image"].to(device, non_blocking=True))
            scores.append(head(model(x)).float().cpu())
            labels.append(batch["label"].long())
    acc = topk_accuracy(torch.cat(scores), torch.cat(labels))
    return {"protocol": "finetune", "fraction": fraction, "subset_size": len(subset),
            "per_class": {train.classes[c]: n for c, n in sorted(counts.items())},
            "epochs": epochs, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
            "batch_size": batch_size, "milestones": step_milestones(epochs), "seed": seed,
            "final_loss": loss_val, "num_val": int(sum(len(x) for x in labels)), **acc}
