"""Weighted k-nearest-neighbour classification (NPID, Wu et al. 2018, Sec. 3.4).

Each query q and training feature x_i are L2-normalised; s_i = q . x_i (cosine similarity).
Among the k most similar training images, each votes for its class with weight exp(s_i / tau);
the class with the largest total weight wins:

    score_c(q) = sum_{i in topk(q)} exp(s_i / tau) * [y_i = c],     tau = 0.07, k = 200

Queries are processed in chunks so that only a [chunk, N] similarity block is held at a time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pirl.config import ViewConfig
from pirl.data.source import ImageSource
from pirl.evaluate.features import (
    EvalSettings,
    check_labelled_splits,
    eval_view,
    extract_features,
)
from pirl.evaluate.metrics import topk_accuracy


def knn_scores(train_feats: Tensor, train_labels: Tensor, query_feats: Tensor, num_classes: int,
               k: int = 200, tau: float = 0.07, chunk_size: int = 1024) -> Tensor:
    """NPID vote scores.

    train_feats [N, F], train_labels Long [N] in [0, num_classes), query_feats [M, F] (neither
    needs to be normalised).  Returns float32 [M, num_classes]: the summed weights per class.
    k is capped at N.  Runs on the device of ``train_feats``.
    """
    if train_feats.shape[0] != train_labels.shape[0]:
        raise ValueError(f"knn: {train_feats.shape[0]} training features but "
                         f"{train_labels.shape[0]} labels")
    if train_feats.shape[1] != query_feats.shape[1]:
        raise ValueError(f"knn: training features have {train_feats.shape[1]} dims, queries "
                         f"{query_feats.shape[1]}")
    if k < 1 or tau <= 0:
        raise ValueError(f"knn: need k >= 1 and tau > 0, got k={k}, tau={tau}")
    if train_labels.numel() and (train_labels.min() < 0 or train_labels.max() >= num_classes):
        raise ValueError(f"knn: training labels must lie in [0, {num_classes}); got "
                         f"[{train_labels.min().item()}, {train_labels.max().item()}] (unlabelled "
                         "images, label -1, cannot vote)")
    device = train_feats.device
    bank = F.normalize(train_feats.float(), dim=1)  # [N, F]
    labels = train_labels.to(device)
    k = min(k, bank.shape[0])
    out = torch.empty(query_feats.shape[0], num_classes, device=device)
    for start in range(0, query_feats.shape[0], chunk_size):
        q = F.normalize(query_feats[start:start + chunk_size].to(device).float(), dim=1)  # [m, F]
        sim = q @ bank.T  # [m, N]
        top_s, top_i = sim.topk(k, dim=1)  # [m, k]
        w = (top_s / tau).exp()  # [m, k]; s <= 1 so exp(s / 0.07) <= e^14.3: no overflow
        votes = torch.zeros(q.shape[0], num_classes, device=device)
        votes.scatter_add_(1, labels[top_i], w)  # [m, C]
        out[start:start + chunk_size] = votes
    return out


def knn_classify(train_feats: Tensor, train_labels: Tensor, query_feats: Tensor,
                 query_labels: Tensor, num_classes: int, k: int = 200, tau: float = 0.07,
                 chunk_size: int = 1024) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) of the NPID vote; shapes as in :func:`knn_scores`."""
    scores = knn_scores(train_feats, train_labels, query_feats, num_classes, k, tau, chunk_size)
    return topk_accuracy(scores.cpu(), query_labels.cpu())


def run_knn(trunk: nn.Module, train: ImageSource, val: ImageSource, view_cfg: ViewConfig,
            settings: EvalSettings, k: int = 200, tau: float = 0.07,
            stage: str = "res5") -> dict[str, Any]:
    """The kNN protocol: frozen ``stage`` features (centre crop) of both splits, NPID vote."""
    check_labelled_splits(train, val)
    view = eval_view(view_cfg)
    tr = extract_features(trunk, train, [stage], view, settings, desc="train")[stage]
    va = extract_features(trunk, val, [stage], view, settings, desc="val")[stage]
    keep = tr.labels >= 0
    acc = knn_classify(tr.feats[keep].to(settings.device), tr.labels[keep], va.feats,
                       va.labels, len(train.classes), k, tau)
    return {"protocol": "knn", "stage": stage, "k": min(k, int(keep.sum())), "tau": tau,
            "num_train": int(keep.sum()), "num_val": len(va.labels), **acc}

