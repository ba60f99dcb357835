"""Linear SVMs on frozen features (the VOC07 protocol of Goyal et al. 2019, PIRL Table 2).

Labels are a matrix [N, C] of +1 / 0 / -1 per image and class: a multi-label source (VOC,
:class:`pirl.data.voc_labels.VOCImages`) carries its own ``label_matrix`` (0 = only ``difficult``
objects of that class); single-label data gives +1 for its class and -1 for every other (an
unlabelled image is 0 everywhere).  Entries 0 are left out of that class's training and its AP.

For each class c a binary one-vs-rest linear SVM (scikit-learn's ``LinearSVC``: squared hinge
loss, L2 penalty, positive class weighted 2:1 as in Goyal et al.'s benchmark) is trained on the
L2-normalised frozen features of the training split.  Its cost C is chosen per class by k-fold
cross-validation *on the training split* (stratified, seeded), scoring average precision; the SVM
is then refitted on the whole training split with the chosen cost.  The default cost grid is the
benchmark's (``BENCHMARK_COSTS``): 1e-7, 1e-6, ..., 10, 100 and 2^-4 ... 2^-19.

Reported on the val split: mAP, the mean over classes of VOC's average precision (the area
version of VOC2010+, which the benchmark computes: precision made monotone from the right, then
summed over the recall steps; not VOC07's 11-point approximation), and for single-label data
top-1 (argmax over the C SVM scores).

Low-shot (``low_shot=(1, 2, 4, ...)``, the benchmark's k = 1, 2, 4, 8, 16, 32, 64, 96 with 5
independent samples): for each k and sample, each class trains on k of its positive images and
(C - 1) * k of its negative ones (fewer when the split has fewer), drawn with a generator seeded
by (seed, sample, k, class); every other image is left out of that class's training.  The cost is
chosen by cross-validation on those images (folds capped at the number of positives, so k = 1
takes the grid's median cost).  Reported: mean and std of the mAP over the samples.
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

# Goyal et al.'s grid: the decades 1e-7 .. 100 their scripts pass, plus 2^-4 .. 2^-19 that their
# cost parser appends to every list.
BENCHMARK_COSTS: tuple[float, ...] = (
    1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1, 1.0, 10.0, 100.0,
    *(0.5 ** k for k in range(4, 20)))
DEFAULT_COSTS = BENCHMARK_COSTS
LOW_SHOT_K: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 96)


def _svc(cost: float, dual: bool) -> Any:
    """liblinear's L2-regularised squared-hinge SVM.  ``dual`` must be False when there are more
    samples than dimensions (res5 on a few thousand images): the dual coordinate descent then
    needs far more iterations at large costs (docs/performance.md, "Measurements behind design
    choices")."""
    from sklearn.svm import LinearSVC

    return LinearSVC(C=cost, class_weight={1: 2.0, 0: 1.0}, loss="squared_hinge", penalty="l2",
                     dual=dual, tol=1e-4, max_iter=2000, intercept_scaling=1.0)


def label_matrix(source: ImageSource) -> np.ndarray:
    """int8 [N, C] of +1 / 0 / -1: the source's own ``label_matrix`` (multi-label, e.g. VOC), else
    one-vs-rest of ``targets`` (an unlabelled image, target -1, is 0: ignored by every class)."""
    own = getattr(source, "label_matrix", None)
    if own is not None:
        return np.asarray(own, dtype=np.int8)
    return targets_to_matrix(np.asarray(source.targets, dtype=np.int64), len(source.classes))


def targets_to_matrix(targets: np.ndarray, num_classes: int) -> np.ndarray:
    """Single labels [N] (-1 = unknown) -> int8 [N, C]: +1 for the label, -1 elsewhere, and a
    row of 0 for an unknown label."""
    y = np.asarray(targets, dtype=np.int64)
    out = np.where(y[:, None] == np.arange(num_classes)[None, :], 1, -1).astype(np.int8)
    out[y < 0] = 0
    return out


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


def fit_svms(train_x: Tensor, train_y: Tensor | np.ndarray, num_classes: int,
             costs: Sequence[float] = DEFAULT_COSTS, folds: int = 3, seed: int = 0,
             quiet: bool = True, names: Sequence[str] | None = None
             ) -> tuple[Tensor, Tensor, list[float], list[dict[float, float]]]:
    """One-vs-rest SVMs.  train_x [N, F] (used as given); train_y Long [N] in [0, C) or a label
    matrix [N, C] of +1 / 0 / -1 (0 = left out of that class's training).

    Returns (weights [C, F], biases [C], chosen cost per class, CV AP per cost per class).
    """
    x = train_x.double().numpy()
    y_all = np.asarray(train_y)
    if y_all.ndim == 1:
        y_all = targets_to_matrix(y_all, num_classes)
    names = list(names) if names is not None else [str(c) for c in range(num_classes)]
    weights, biases, chosen, cv_scores = [], [], [], []
    with warnings.catch_warnings():
        # liblinear's "did not converge" at small max_iter only affects costs that CV rejects.
        warnings.filterwarnings("ignore", message=".*converge.*")
        for c in Progress(range(num_classes), desc="svm", unit="class", disable=quiet):
            keep = y_all[:, c] != 0
            y = (y_all[keep, c] == 1).astype(np.int64)
            if y.sum() == 0 or y.sum() == len(y):
                raise ValueError(f"svm: class {names[c]!r} has no "
                                 f"{'positive' if y.sum() == 0 else 'negative'} training image "
                                 "(an SVM needs both)")
            xc = x[keep]
            cost, scores = choose_cost(xc, y, costs, folds, seed)
            svm = _svc(cost, xc.shape[0] <= xc.shape[1]).fit(xc, y)
            weights.append(torch.from_numpy(svm.coef_[0].copy()).float())
            biases.append(float(svm.intercept_[0]))
            chosen.append(cost)
            cv_scores.append(scores)
    return torch.stack(weights), torch.tensor(biases), chosen, cv_scores


def voc_ap(scores: np.ndarray, positive: np.ndarray) -> float:
    """VOC's average precision (area version) of scores [M] against booleans [M], in [0, 1].

    Ranked by decreasing score: precision p_i and recall r_i after each item; p is replaced by
    its running maximum from the right (the precision envelope), and AP = sum over the items
    where recall rises of (r_i - r_{i-1}) * p_i.  Ties are broken by position (stable sort).
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.asarray(positive, dtype=bool)[order]
    if not hits.any():
        raise ValueError("voc_ap: no positive example")
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / hits.sum()
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * envelope))


def mean_average_precision(scores: Tensor, labels: Tensor | np.ndarray
                           ) -> tuple[float, list[float | None]]:
    """mAP (percent) of per-class scores [M, C] against labels: Long [M] or a +1 / 0 / -1
    matrix [M, C] (0 entries left out of that class's AP).  VOC AP (:func:`voc_ap`); a class
    without a positive gets None and is left out of the mean."""
    y = np.asarray(labels)
    if y.ndim == 1:
        y = targets_to_matrix(y, scores.shape[1])
    s = scores.double().numpy()
    aps: list[float | None] = []
    for c in range(s.shape[1]):
        keep = y[:, c] != 0
        pos = y[keep, c] == 1
        aps.append(100.0 * voc_ap(s[keep, c], pos) if pos.any() else None)
    present = [a for a in aps if a is not None]
    if not present:
        raise ValueError("mAP: no class has a positive example in the evaluation split")
    return float(np.mean(present)), aps


def low_shot_matrix(y: np.ndarray, k: int, seed: int, sample: int) -> np.ndarray:
    """The benchmark's low-shot draw from a label matrix [N, C] (+1 / 0 / -1): per class, k of
    its positives and (C - 1) * k of its negatives (all of them when fewer) keep their label,
    every other entry becomes 0 (left out).  Seeded by (seed, sample, k, class)."""
    out = np.zeros_like(y)
    num_classes = y.shape[1]
    for c in range(num_classes):
        rng = np.random.default_rng([seed, sample, k, c])
        for value, n in ((1, k), (-1, max(1, num_classes - 1) * k)):
            members = np.flatnonzero(y[:, c] == value)
            out[rng.permutation(members)[:n], c] = value
    return out


def run_svm(trunk: nn.Module, train: ImageSource, val: ImageSource, view_cfg: ViewConfig,
            settings: EvalSettings, stage: str = "res5",
            costs: Sequence[float] = DEFAULT_COSTS, folds: int = 3, seed: int = 0,
            low_shot: Sequence[int] = (), samples: int = 5) -> dict[str, Any]:
    """The SVM protocol on frozen ``stage`` features (centre crop); see the module docstring."""
    check_labelled_splits(train, val)
    if not costs or min(costs) <= 0:
        raise ValueError(f"svm: costs must be positive numbers, got {list(costs)}")
    if folds < 2:
        raise ValueError(f"svm: folds must be at least 2, got {folds}")
    if any(k < 1 for k in low_shot) or samples < 1:
        raise ValueError(f"svm: low-shot k ({list(low_shot)}) and samples ({samples}) must be "
                         ">= 1")
    y_full = label_matrix(train)
    for c, name in enumerate(train.classes):  # checked before any feature is computed
        for value, what in ((1, "positive"), (-1, "negative")):
            if not (y_full[:, c] == value).any():
                raise ValueError(f"svm: class {name!r} has no {what} training image (an SVM "
                                 "needs both; a one-class set such as raccoon cannot be scored)")
    view = eval_view(view_cfg)
    tr = extract_features(trunk, train, [stage], view, settings, desc="train")[stage]
    va = extract_features(trunk, val, [stage], view, settings, desc="val")[stage]
    # Rows follow the readable images (an unreadable one has no feature row).
    y_train = y_full[tr.indices.numpy()]
    y_val = label_matrix(val)[va.indices.numpy()]
    used = (y_train != 0).any(axis=1)
    train_x = F.normalize(tr.feats, dim=1)
    val_x = F.normalize(va.feats, dim=1)
    classes = list(train.classes)
    w, b, chosen, cv = fit_svms(train_x, y_train, len(classes), costs, folds, seed,
                                quiet=settings.quiet, names=classes)
    scores = val_x @ w.T + b  # [M, C]
    m_ap, aps = mean_average_precision(scores, y_val)
    result: dict[str, Any] = {
        "protocol": "svm", "stage": stage, "mAP": m_ap,
        "ap_per_class": dict(zip(classes, aps, strict=True)),
        "cost_per_class": dict(zip(classes, chosen, strict=True)),
        "cv_ap_per_class": {cls: {str(c): 100 * s for c, s in sc.items()}
                            for cls, sc in zip(classes, cv, strict=True)},
        "costs": list(costs), "folds": folds, "num_train": int(used.sum()),
        "num_val": len(va.labels), "ap": "VOC area (VOC2010+), difficult left out"}
    if getattr(val, "label_matrix", None) is None:  # single-label data: a top-1 too
        result["top1"] = topk_accuracy(scores, va.labels, ks=(1,))["top1"]
    if low_shot:
        result["low_shot"] = {}
        for k in Progress(list(low_shot), desc="svm low-shot", unit="k", disable=settings.quiet):
            maps = []
            for sample in range(samples):
                y_k = low_shot_matrix(y_train, k, seed, sample)
                wk, bk, _, _ = fit_svms(train_x, y_k, len(classes), costs, folds, seed,
                                        names=classes)
                maps.append(mean_average_precision(val_x @ wk.T + bk, y_val)[0])
            result["low_shot"][str(k)] = {"mAP_mean": float(np.mean(maps)),
                                          "mAP_std": float(np.std(maps)), "mAP": maps}
        result["low_shot_samples"] = samples
    return result
