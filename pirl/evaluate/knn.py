"""Weighted k-nearest-neighbour classification (NPID, Wu et al. 2018, Sec. 3.4).

Each query q and training feature x_i are L2-normalised; s_i = q . x_i (cosine similarity).
Among the k most similar training images, each votes for its class with weight exp(s_i / tau);
the class with the largest total weight wins:

    score_c(q) = sum_{i in topk(q)} exp(s_i / tau) * [y_i = c],     tau = 0.07, k = 200

The training features are read once, in blocks of rows, and every query keeps a running top-k,
so beyond the features themselves only a [query chunk, block] similarity block is held: memory
stays flat in the number of queries and grows with the training set only by its features.
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
               k: int = 200, tau: float = 0.07, chunk_size: int = 1024,
               bank_chunk: int | None = None) -> Tensor:
    """NPID vote scores.

    train_feats [N, F], train_labels Long [N] in [0, num_classes), query_feats [M, F] (neither
    needs to be normalised).  Returns float32 [M, num_classes]: the summed weights per class.
    k is capped at N.  Runs on the device of ``train_feats``; ``train_feats`` may be float16
    (half the memory; each block is scored in float32).  ``chunk_size`` queries and
    ``bank_chunk`` training rows are scored at a time (default: a 256 MiB block).
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
    labels = train_labels.to(device)
    n, m = train_feats.shape[0], query_feats.shape[0]
    k = min(k, n)
    if bank_chunk is None:  # a [chunk_size, bank_chunk] float32 block of about 256 MiB
        bank_chunk = max(k, 2**26 // max(1, chunk_size))
    bank_chunk = max(1, bank_chunk)
    # The training features are visited once, a block of rows at a time, normalised as they
    # come (float32 copies of one block only), and every query keeps its running top-k: memory
    # is the features themselves plus O(block), not two more copies of them.
    # [M, k] cosine similarities and training rows; -inf marks "none yet" (a real one is >= -1)
    best_s = torch.full((m, k), float("-inf"), device=device)
    best_i = torch.zeros((m, k), dtype=torch.long, device=device)
    for lo in range(0, n, bank_chunk):
        block = F.normalize(train_feats[lo:lo + bank_chunk].float(), dim=1)  # [c, F]
        for start in range(0, m, chunk_size):
            q = F.normalize(query_feats[start:start + chunk_size].to(device).float(), dim=1)
            sim = q @ block.T  # [m, c]
            cand_s = torch.cat([best_s[start:start + chunk_size], sim], dim=1)
            cand_i = torch.cat([best_i[start:start + chunk_size],
                                torch.arange(lo, lo + block.shape[0], device=device)
                                .expand(q.shape[0], -1)], dim=1)
            top_s, pos = cand_s.topk(k, dim=1)  # sorted, largest first
            best_s[start:start + chunk_size] = top_s
            best_i[start:start + chunk_size] = cand_i.gather(1, pos)
    w = (best_s / tau).exp()  # [M, k]; s <= 1 so exp(s / 0.07) <= e^14.3: no overflow
    out = torch.zeros(m, num_classes, device=device)
    out.scatter_add_(1, labels[best_i], w)  # [M, C]
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

