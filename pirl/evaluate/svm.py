"""Linear SVMs on frozen features (the VOC07 protocol of Goyal et al. 2019, PIRL Table 2).

For each class c a binary one-vs-rest linear SVM (scikit-learn's ``LinearSVC``: squared hinge
loss, L2 penalty, positive class weighted 2:1 as in Goyal et al.'s benchmark) is trained on the
L2-normalised frozen features of the training split.  Its cost C is chosen per class by k-fold
cross-validation *on the training split* (stratified, seeded), scoring average precision; the SVM
is then refitted on the whole training split with the chosen cost.

Reported on the val split: mAP (mean over classes of average precision of the class's SVM score;
scikit-learn's non-interpolated AP, not VOC07's 11-point approximation) and top-1 (argmax over the
C SVM scores, i.e. the one-vs-rest multi-class decision).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pirl.config import ViewConfig
from pirl.console import Progress
from pirl.data.source import ImageSource
from pirl.evaluate.features import (
    EvalSettings,
    check_labelled_splits,
    eval_view,
    extract_features,
)
from pirl.evaluate.metrics import topk_accuracy

DEFAULT_COSTS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)


def _svc(cost: float, dual: bool) -> Any:
    """liblinear's L2-regularised squared-hinge SVM.  ``dual`` must be False when there are more
    samples than dimensions (res5 on a few thousand images): the dual coordinate descent then
    needs far more iterations at large costs (docs/performance.md, "Measurements behind design
    choices")."""
    from sklearn.svm import LinearSVC

    return LinearSVC(C=cost, class_weight={1: 2.0, 0: 1.0}, loss="squared_hinge", penalty="l2",
                     dual=dual, tol=1e-4, max_iter=2000, intercept_scaling=1.0)


def choose_cost(x: np.ndarray, y: np.ndarray, costs: Sequence[float], folds: int,
                seed: int) -> tuple[float, dict[float, float]]:
    """Cost with the best mean cross-validated AP for binary labels y (0/1) on features x [N, F].

    Folds are capped at the number of positives (and negatives), so a rare class still gets a
    fair split; with fewer than 2 of either, no CV is possible and the median cost is used.
    Returns (cost, {cost: mean AP}).
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    n_min = int(min(y.sum(), len(y) - y.sum()))
    k = min(folds, n_min)
    if k < 2:
        return sorted(costs)[len(costs) // 2], {}
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    dual = x.shape[0] <= x.shape[1]
    scores = {c: float(cross_val_score(_svc(c, dual), x, y, cv=cv,
                                       scoring="average_precision").mean())
              for c in costs}
    # Ties go to the smaller cost (stronger regularisation), hence the sort before max.
    best = max(sorted(costs), key=lambda c: scores[c])
    return best, scores


def fit_svms(train_x: Tensor, train_y: Tensor, num_classes: int,
             costs: Sequence[float] = DEFAULT_COSTS, folds: int = 3, seed: int = 0,
             quiet: bool = True) -> tuple[Tensor, Tensor, list[float], list[dict[float, float]]]:
    """One-vs-rest SVMs.  train_x [N, F] (used as given), train_y Long [N] in [0, C).

    Returns (weights [C, F], biases [C], chosen cost per class, CV AP per cost per class).
    """
    x = train_x.double().numpy()
    y_all = train_y.numpy()
    weights, biases, chosen, cv_scores = [], [], [], []
    with warnings.catch_warnings():
        # liblinear's "did not converge" at small max_iter only affects costs that CV rejects.
        warnings.filterwarnings("ignore", message=".*converge.*")
        for c in Progress(range(num_classes), desc="svm", unit="class", disable=quiet):
            y = (y_all == c).astype(np.int64)
            if y.sum() == 0:
                raise ValueError(f"svm: class {c} has no training image")
            cost, scores = choose_cost(x, y, costs, folds, seed)
            svm = _svc(cost, x.shape[0] <= x.shape[1]).fit(x, y)
            weights.append(torch.from_numpy(svm.coef_[0].copy()).float())
            biases.append(float(svm.intercept_[0]))
            chosen.append(cost)
            cv_scores.append(scores)
    return torch.stack(weights), torch.tensor(biases), chosen, cv_scores


def mean_average_precision(scores: Tensor, labels: Tensor) -> tuple[float, list[float | None]]:
    """mAP (percent) of per-class scores [M, C] against labels [M]; classes without a positive
    in ``labels`` get None and are left out of the mean."""
    from sklearn.metrics import average_precision_score

    aps: list[float | None] = []
    for c in range(scores.shape[1]):
        y = (labels == c).numpy()
        aps.append(100.0 * float(average_precision_score(y, scores[:, c].numpy()))
                   if y.any() else None)
    present = [a for a in aps if a is not None]
    if not present:
        raise ValueError("mAP: no class has a positive example in the evaluation split")
    return float(np.mean(present)), aps


def run_svm(trunk: nn.Module, train: ImageSource, val: ImageSource, view_cfg: ViewConfig,
            settings: EvalSettings, stage: str = "res5",
            costs: Sequence[float] = DEFAULT_COSTS, folds: int = 3,
            seed: int = 0) -> dict[str, Any]:
    """The SVM protocol on frozen ``stage`` features (centre crop); see the module docstring."""
    check_labelled_splits(train, val)
    if not costs or min(costs) <= 0:
        raise ValueError(f"svm: costs must be positive numbers, got {list(costs)}")
    if folds < 2:
        raise ValueError(f"svm: folds must be at least 2, got {folds}")
    view = eval_view(view_cfg)
    tr = extract_features(trunk, train, [stage], view, settings, desc="train")[stage]
    va = extract_features(trunk, val, [stage], view, settings, desc="val")[stage]
    keep = tr.labels >= 0
    train_x = F.normalize(tr.feats[keep], dim=1)
    w, b, chosen, cv = fit_svms(train_x, tr.labels[keep], len(train.classes), costs, folds,
                                seed, quiet=settings.quiet)
    scores = F.normalize(va.feats, dim=1) @ w.T + b  # [M, C]
    m_ap, aps = mean_average_precision(scores, va.labels)
    acc = topk_accuracy(scores, va.labels, ks=(1,))
    return {"protocol": "svm", "stage": stage, "mAP": m_ap, "top1": acc["top1"],
            "ap_per_class": dict(zip(train.classes, aps, strict=True)),
            "cost_per_class": dict(zip(train.classes, chosen, strict=True)),
            "cv_ap_per_class": {cls: {str(c): 100 * s for c, s in sc.items()}
                                for cls, sc in zip(train.classes, cv, strict=True)},
            "costs": list(costs), "folds": folds, "num_train": int(keep.sum()),
            "num_val": len(va.labels)}
