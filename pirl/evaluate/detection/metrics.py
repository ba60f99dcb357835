"""Detection scores from pycocotools: AP (IoU 0.50:0.95), AP50, AP75, per class, and VOC07 AP50.

The numbers come from pycocotools' ``COCOeval`` (matching, precision/recall, interpolation); this
module only feeds it and reads its ``precision`` array ``[T IoUs, R recalls, K classes, A areas,
M max-dets]``.

* **COCO-style AP**: 101 recall points, IoU thresholds 0.50, 0.55, ..., 0.95, up to 100
  detections per image (torchvision's detector keeps at most 100 as well), one area range (all).
* **VOC07 AP50**: the 11-point interpolated AP of the VOC2007 devkit: the mean, over recall
  thresholds t = 0, 0.1, ..., 1, of the highest precision at recall >= t.  COCOeval computes
  exactly this when given those 11 recall thresholds and IoU 0.5: it makes precision
  non-increasing from the right and reads it at the first recall >= t, which is that maximum.
  The thresholds are ``np.arange(0, 1.1, 0.1)`` as in the devkit, float rounding included.
* **difficult objects** are ignored as VOC does: a detection matched to one is neither a true
  nor a false positive, and they do not count as positives for recall.  COCOeval does this for
  ``iscrowd`` objects, but it scores overlap with a crowd region as intersection over the
  *detection's* area; :class:`_VOCEval` keeps COCOeval's crowd *matching* (any number of
  detections may fall on one ignored object) and makes the overlap plain IoU, as the devkit
  computes it for difficult objects.

Where this differs from the VOC devkit: COCOeval assigns a detection to the best-overlapping
*unmatched* object (preferring non-difficult ones), the devkit to the best-overlapping object
overall (a second detection on an already-matched object is a false positive there even if
another object qualifies).  The two agree unless objects of one class overlap by more than the
IoU threshold.  Boxes are continuous pixel corners; VOC's inclusive 1-based corners were
converted when read (:mod:`pirl.data.voc`), so the devkit's "+1" widths are already in them.

A class with no non-difficult object in the test split has no AP (``None``) and is left out of
the means, as both COCOeval and the devkit do.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

# The devkit's recall thresholds, computed the devkit's way (0.30000000000000004 included).
VOC07_RECALLS = np.arange(0.0, 1.1, 0.1)


class _VOCEval(COCOeval):
    """COCOeval whose overlaps with ignored (difficult) objects are IoU, not COCO's crowd IoA."""

    def computeIoU(self, imgId: int, catId: int) -> Any:  # noqa: N802 - COCOeval's name
        gts = self._gts[imgId, catId]
        flags = [g["iscrowd"] for g in gts]
        for g in gts:
            g["iscrowd"] = 0
        try:
            return super().computeIoU(imgId, catId)
        finally:
            # evaluateImg reads the flag again: crowd objects may absorb several detections.
            for g, f in zip(gts, flags, strict=True):
                g["iscrowd"] = f


def _xywh(box: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def _build(targets: Sequence[Mapping[str, Tensor]], detections: Sequence[Mapping[str, Tensor]],
           num_classes: int) -> tuple[COCO, COCO | None]:
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    dets: list[dict[str, Any]] = []
    for img_id, (t, d) in enumerate(zip(targets, detections, strict=True)):
        images.append({"id": img_id})
        difficult = t.get("difficult")
        for j, (box, label) in enumerate(zip(t["boxes"].tolist(), t["labels"].tolist(),
                                             strict=True)):
            xywh = _xywh(box)
            hard = bool(difficult[j]) if difficult is not None else False
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": int(label),
                         "bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": int(hard)})
        for box, label, score in zip(d["boxes"].tolist(), d["labels"].tolist(),
                                     d["scores"].tolist(), strict=True):
            dets.append({"image_id": img_id, "category_id": int(label), "bbox": _xywh(box),
                         "score": float(score)})
    gt = COCO()
    # "info" and "licenses" belong to the COCO format; pycocotools 2.0.10's loadRes copies
    # "info" and fails on a dataset without it.
    gt.dataset = {"info": {}, "licenses": [], "images": images, "annotations": anns,
                  "categories": [{"id": k} for k in range(1, num_classes + 1)]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        gt.createIndex()
        dt = gt.loadRes(dets) if dets else None
    return gt, dt


def _run(gt: COCO, dt: COCO, iou_thrs: np.ndarray, rec_thrs: np.ndarray) -> np.ndarray:
    """COCOeval's precision array [T, R, K] (-1 where a class has no positives)."""
    ev = _VOCEval(gt, dt, iouType="bbox")
    ev.params.iouThrs = iou_thrs
    ev.params.recThrs = rec_thrs
    ev.params.maxDets = [100]
    ev.params.areaRng = [[0.0, 1e10]]
    ev.params.areaRngLbl = ["all"]
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    return np.asarray(ev.eval["precision"])[:, :, :, 0, 0]


def _ap(precision: np.ndarray) -> float | None:
    """Mean of the valid (> -1) entries, in percent; None when there is none."""
    valid = precision[precision > -1]
    return float(100.0 * valid.mean()) if valid.size else None


def detection_metrics(targets: Sequence[Mapping[str, Tensor]],
                      detections: Sequence[Mapping[str, Tensor]],
                      classes: Sequence[str]) -> dict[str, Any]:
    """Score ``detections`` against ``targets`` (one entry per test image, same order).

    targets[i]: {"boxes": float [K,4] xyxy, "labels": Long [K] in 1..C, "difficult": Bool [K]
    (optional)}; detections[i]: {"boxes": [D,4] xyxy, "labels": Long [D], "scores": [D]}.
    Returns percentages: {"AP", "AP50", "AP75", "VOC07_AP50", "per_class": {name: {"AP",
    "AP50", "VOC07_AP50"}}, "num_images", "num_objects", "num_difficult", "num_detections"}.
    """
    c = len(classes)
    gt, dt = _build(targets, detections, c)
    n_obj = sum(len(t["labels"]) for t in targets)
    n_hard = sum(int(t["difficult"].sum()) for t in targets if "difficult" in t)
    positives = {k: 0 for k in range(1, c + 1)}
    for a in gt.dataset["annotations"]:
        if not a["iscrowd"]:
            positives[a["category_id"]] += 1
    result: dict[str, Any] = {"num_images": len(targets), "num_objects": n_obj,
                              "num_difficult": n_hard,
                              "num_detections": sum(len(d["scores"]) for d in detections)}
    if dt is None:
        # No detection at all: every class with positives scores 0 (pycocotools cannot load an
        # empty result list).
        zero = 0.0 if any(positives.values()) else None
        result.update(AP=zero, AP50=zero, AP75=zero, VOC07_AP50=zero)
        result["per_class"] = {name: dict.fromkeys(("AP", "AP50", "VOC07_AP50"),
                                                   0.0 if positives[k + 1] else None)
                               for k, name in enumerate(classes)}
        return result
    ious = np.linspace(0.5, 0.95, 10)
    coco = _run(gt, dt, ious, np.linspace(0.0, 1.0, 101))  # [10, 101, C]
    voc = _run(gt, dt, np.array([0.5]), VOC07_RECALLS)  # [1, 11, C]
    result.update(AP=_ap(coco), AP50=_ap(coco[0]), AP75=_ap(coco[5]), VOC07_AP50=_ap(voc))
    result["per_class"] = {name: {"AP": _ap(coco[:, :, k]), "AP50": _ap(coco[0, :, k]),
                                  "VOC07_AP50": _ap(voc[0, :, k])}
                           for k, name in enumerate(classes)}
    return result
