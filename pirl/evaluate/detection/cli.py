"""``pirl eval detection``: fine-tune Faster R-CNN from a checkpoint on VOC data and score it.

Prints a markdown table (overall, then per class) and writes ``OUT/detection.json``,
``OUT/detection.png`` (test images with ground-truth and predicted boxes) and the resumable
fine-tuning checkpoint ``OUT/detection_ckpt.pt``.  Exit codes: 0 done, 1 the fine-tuning failed
(diverged, an unreadable image under --strict-data), 2 bad input (checkpoint, data, options).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pirl import config as C
from pirl.data.views import IMAGENET_MEAN, IMAGENET_STD
from pirl.evaluate.detection.schedule import LR_RULES, SCHEDULES

log = logging.getLogger(__name__)

# Detectron2's VOC input sizes: multi-scale training on these shorter sides, the last for test.
PAPER_MIN_SIZES = tuple(range(480, 801, 32))
SHORT_MIN_SIZE = 320
# The short schedule's region counts: C4 runs res5 once per region, which dominates CPU time.
SHORT_ROI_BATCH, SHORT_TEST_PROPOSALS = 64, 100


def add_detection_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``detection`` on the ``pirl eval`` protocol subparsers."""
    from pirl.evaluate.detection.model import DESIGNS

    p = sub.add_parser("detection", help="fine-tune Faster R-CNN (C4, BN frozen) on Pascal VOC "
                       "data: AP, AP50, AP75, VOC07 AP50")
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="pirl checkpoint (any method), trunk.pt, torchvision / Detectron2 / VISSL "
                   "file, or 'random' (with --arch)")
    p.add_argument("--arch", default=None, choices=C.ARCHS,
                   help="architecture for --checkpoint random (files: inferred, must agree)")
    p.add_argument("--small-stem", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3 stride-1 stem, for --checkpoint random")
    p.add_argument("--data", action="append", required=True, metavar="VOC",
                   help="Pascal VOC folder or uncompressed .tar (e.g. VOCdevkit/VOC2007); repeat "
                   "or comma-separate to join several (VOC07+12)")
    p.add_argument("--test-data", action="append", default=None, metavar="VOC",
                   help="where the test split is read (default: those --data that have it)")
    p.add_argument("--train-split", default="trainval", help="ImageSets/Main split to train on")
    p.add_argument("--test-split", default="test", help="ImageSets/Main split to score")
    p.add_argument("--out", required=True, help="folder for detection.json / .png and the "
                   "fine-tuning checkpoint; rerunning the same command resumes")
    p.add_argument("--design", default="c4", choices=DESIGNS,
                   help="c4: res5 as the box head, the paper's (default); fpn: feature pyramid")
    p.add_argument("--schedule", default="voc07+12", choices=tuple(SCHEDULES),
                   help="voc07+12: 25K iterations at batch 16, lr x0.1 at 17K (default); voc07: "
                   "12.5K, step at 9.5K; short: 200 iterations for small sets on a CPU")
    p.add_argument("--iters", type=int, default=None,
                   help="override the schedule's iterations (lr step and warm-up follow)")
    p.add_argument("--lr-rule", default=None, choices=tuple(LR_RULES),
                   help="contrastive: lr 0.003, 1000-iteration warm-up (PIRL, NPID++); "
                   "supervised: 0.02, 100 (supervised, Jigsaw, Rotation).  Default: from the "
                   "checkpoint's method, else supervised")
    p.add_argument("--bn-recalibrate", type=int, default=0, metavar="N",
                   help="re-estimate the trunk's BatchNorm statistics on N training images at "
                   "the test input size before freezing them (default 0: the checkpoint's, as "
                   "the paper; use it for trunks pretrained on much smaller images)")
    p.add_argument("--freeze-at", type=int, default=0, choices=range(6),
                   help="freeze the first N trunk stages (1 = stem, 2 = stem+res2, Detectron2's "
                   "default).  Default 0: every layer fine-tuned, as the paper")
    p.add_argument("--batch-size", type=int, default=2, help="images per process (paper: 2 "
                   "per GPU x 8); the schedule is scaled to the global batch")
    p.add_argument("--min-size", type=int, default=None,
                   help="shorter image side, px (default: the paper's 480-800 multi-scale "
                   f"training / 800 test; {SHORT_MIN_SIZE} for --schedule short)")
    p.add_argument("--max-size", type=int, default=None,
                   help="longer side cap, px (default 1333 x min-size / 800)")
    p.add_argument("--roi-batch", type=int, default=None,
                   help="proposals sampled per training image for the box head (default 512, "
                   f"Detectron2's; {SHORT_ROI_BATCH} for short: in C4 each one runs res5)")
    p.add_argument("--test-proposals", type=int, default=None,
                   help="proposals scored per test image (default 1000, Detectron2's; "
                   f"{SHORT_TEST_PROPOSALS} for short)")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="save the fine-tuning state every N iterations (default 1000; 100 for "
                   "short)")
    p.add_argument("--strict-data", action="store_true",
                   help="a malformed annotation, missing image or bad box is fatal (default: "
                   "skipped and counted)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if any)")
    p.add_argument("--no-bf16", action="store_true", help="full fp32 on GPU (default: bf16 "
                   "autocast)")
    p.add_argument("--png-images", type=int, default=6, help="test images in the PNG")
    p.add_argument("--score-threshold", type=float, default=0.5,
                   help="predictions drawn in the PNG score above this")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, flips and new heads")
    p.set_defaults(func=run_detection, protocol="detection")
    return p


def run_detection(args: argparse.Namespace) -> int:
    """Handler of ``pirl eval detection``: returns the exit code."""
    from pirl.checkpoint import CheckpointError
    from pirl.data.datasets import UnreadableDataError
    from pirl.distributed import cleanup_distributed
    from pirl.evaluate.detection.engine import DivergedError
    from pirl.export import CheckpointError as ExportCheckpointError

    try:
        return _run(args)
    except (C.ConfigError, CheckpointError, ExportCheckpointError, FileNotFoundError,
            ValueError) as e:
        # ValueError covers DatasetError: a missing split, no VOC folder, a --strict-data fault.
        print(f"pirl eval detection: error: {e}", file=sys.stderr)
        return 2
    except (UnreadableDataError, DivergedError) as e:
        print(f"pirl eval detection: error: {e}", file=sys.stderr)
        return 1
    finally:
        cleanup_distributed()


def _check_args(args: argparse.Namespace) -> None:
    if args.checkpoint == "random" and args.arch is None:
        raise C.ConfigError("--checkpoint random needs --arch (resnet18, resnet34, resnet50)")
    if args.checkpoint != "random" and not Path(args.checkpoint).is_file():
        raise C.ConfigError(f"--checkpoint {args.checkpoint}: no such file")
    for name in ("batch_size", "png_images", "min_size", "max_size", "checkpoint_every",
                 "roi_batch", "test_proposals", "iters"):
        value = getattr(args, name)
        if value is not None and value < (0 if name in ("png_images", "workers") else 1):
            raise C.ConfigError(f"--{name.replace('_', '-')}={value}: must be positive")
    if args.workers < 0:
        raise C.ConfigError(f"--workers={args.workers}: must be >= 0")


def _sizes(args: argparse.Namespace) -> tuple[tuple[int, ...], int]:
    if args.min_size is not None:
        sizes: tuple[int, ...] = (args.min_size,)
    else:
        sizes = (SHORT_MIN_SIZE,) if args.schedule == "short" else PAPER_MIN_SIZES
    max_size = args.max_size or round(1333 * sizes[-1] / 800)
    return sizes, max_size


def _run(args: argparse.Namespace) -> int:
    from pirl.data.voc import VOCSource, parse_data_paths
    from pirl.distributed import setup_distributed
    from pirl.evaluate.detection.engine import LoopSettings, predict, train_detector
    from pirl.evaluate.detection.metrics import detection_metrics
    from pirl.evaluate.detection.model import build_detector
    from pirl.evaluate.detection.schedule import resolve_schedule, rule_for_method
    from pirl.evaluate.features import trunk_fingerprint
    from pirl.evaluate.loading import load_eval_model

    _check_args(args)
    data = parse_data_paths(args.data)
    test_data = parse_data_paths(args.test_data) if args.test_data else data
    env = setup_distributed(args.device)
    torch.manual_seed(args.seed)  # a random trunk and the new heads: the same every run
    em = load_eval_model(args.checkpoint, args.arch, args.small_stem)
    method = em.config.objective.method if em.config is not None else None
    if args.lr_rule:
        rule, rule_from = args.lr_rule, "--lr-rule"
    else:
        rule = rule_for_method(method)
        rule_from = (f"checkpoint method {method}" if method else
                     "default (the checkpoint records no method; pass --lr-rule to choose)")
    train = VOCSource(data, args.train_split, strict=args.strict_data)
    test = VOCSource(test_data, args.test_split, classes=train.classes, strict=args.strict_data,
                     require_split=args.test_data is not None)
    schedule = resolve_schedule(args.schedule, rule, args.batch_size * env.world_size, args.iters)
    sizes, max_size = _sizes(args)
    short = args.schedule == "short"
    roi_batch = args.roi_batch or (SHORT_ROI_BATCH if short else 512)
    test_proposals = args.test_proposals or (SHORT_TEST_PROPOSALS if short else 1000)
    trunk, batchnorm = _batchnorm(em.trunk, train, args, sizes[-1], max_size, env.device)
    model = build_detector(trunk, len(train.classes), args.design, args.freeze_at,
                           min_size=sizes, max_size=max_size, roi_batch=roi_batch,
                           test_proposals=test_proposals).to(env.device)
    loop = LoopSettings(env=env, per_rank_batch=args.batch_size, workers=args.workers,
                        seed=args.seed, strict=args.strict_data,
                        checkpoint_every=args.checkpoint_every
                        or (100 if args.schedule == "short" else 1000),
                        quiet=args.quiet, bf16=not args.no_bf16)
    key = {"checkpoint": args.checkpoint, "trunk_hash": trunk_fingerprint(em.trunk),
           "data": data, "train_split": args.train_split, "design": args.design,
           "freeze_at": args.freeze_at, "schedule": schedule.as_dict(), "min_size": list(sizes),
           "max_size": max_size, "roi_batch": roi_batch, "seed": args.seed,
           "classes": list(train.classes)}
    if args.bn_recalibrate:  # only then, so fine-tunes from before the option still resume
        key["bn_recalibrate"] = args.bn_recalibrate
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        log.info("%s; %s, lr rule %s (%s), %d iterations", env.describe(schedule.global_batch),
                 args.design, rule, rule_from, schedule.iterations)
    trained = train_detector(model, train, schedule, loop, out, key)
    detections = predict(model, test, loop)
    if not env.is_main:
        return 0
    keep = [k for k, d in enumerate(detections) if d is not None]
    targets = [test.target(k) for k in keep]
    metrics = detection_metrics(targets, [detections[k] for k in keep],  # type: ignore[misc]
                                train.classes)
    png = _draw(test, detections, train.classes, out / "detection.png", args, em.name)
    result = {
        "protocol": "detection", "checkpoint": args.checkpoint, "method": method,
        "lr_rule": rule, "lr_rule_from": rule_from, "design": args.design,
        "freeze_at": args.freeze_at, "batchnorm": batchnorm,
        "schedule": schedule.as_dict(), "iterations": schedule.iterations,
        "min_size": list(sizes), "max_size": max_size, "roi_batch": roi_batch,
        "test_proposals": test_proposals, "train": _describe(train),
        "test": {**_describe(test), "scored": len(keep)},
        "metrics": metrics, **{k: metrics[k] for k in ("AP", "AP50", "AP75", "VOC07_AP50")},
        "per_class_AP": {c: v["AP"] for c, v in metrics["per_class"].items()},
        "training": trained, "device": str(env.device), "world_size": env.world_size,
        "seed": args.seed, "png": str(png) if png else None,
    }
    path = out / "detection.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(tables(result, em.name))
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return 0


def _batchnorm(trunk: nn.Module, train: Any, args: argparse.Namespace, size: int, max_size: int,
               device: torch.device) -> tuple[nn.Module, str]:
    """The trunk whose BatchNorm statistics the detector freezes, and how they were made: the
    checkpoint's, or (``--bn-recalibrate N``) a copy re-estimated on N training images drawn
    with ``--seed`` (the same on every rank)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from pirl.evaluate.detection.engine import DetectionItems
    from pirl.evaluate.detection.model import recalibrate_batchnorm

    if not args.bn_recalibrate:
        return trunk, "frozen (FrozenBatchNorm2d), the checkpoint's statistics"
    copy = deepcopy(trunk).to(device)
    transform = GeneralizedRCNNTransform(size, max_size, list(IMAGENET_MEAN), list(IMAGENET_STD))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    items = DetectionItems(train, strict=args.strict_data)
    images = (item[0] for k in order[:args.bn_recalibrate].tolist()
              if (item := items[k]) is not None)
    used = recalibrate_batchnorm(copy, images, transform)
    log.info("BatchNorm statistics re-estimated on %d training images at %d px", used, size)
    return copy, (f"frozen (FrozenBatchNorm2d), statistics re-estimated on {used} training "
                  f"images at {size} px")


def _describe(src: Any) -> dict[str, Any]:
    return {"data": src.paths, "split": src.split, "images": len(src), "boxes": src.num_boxes(),
            "skipped_images": src.skipped_images, "skipped_boxes": src.skipped_boxes,
            "problems": src.problems[:20]}


def _draw(test: Any, detections: list[Any], classes: list[str], out: Path,
          args: argparse.Namespace, name: str) -> Path | None:
    from pirl.data.source import BadImageError
    from pirl.evaluate.detection.plot import draw_detections

    n = min(args.png_images, len(test))
    if n == 0:
        return None
    # Spread over the split rather than its first few: ids are often grouped by source.
    picks = sorted({int(k) for k in np.linspace(0, len(test) - 1, n).round()})
    shown = []
    for k in picks:
        try:
            shown.append((test[k][0], test.target(k), detections[k]))
        except BadImageError:
            continue
    if not shown:
        return None
    return draw_detections([s[0] for s in shown], [s[1] for s in shown], [s[2] for s in shown],
                           classes, out, args.score_threshold,
                           title=f"{name}: {args.design}, {args.schedule} "
                                 f"({args.test_split} split)")


def tables(result: dict[str, Any], name: str) -> str:
    """The markdown tables printed at the end: overall scores, then per class."""
    from pirl.evaluate.metrics import markdown_table

    def pct(v: float | None) -> object:
        return "-" if v is None else float(v)

    s = result["schedule"]
    top = markdown_table(
        ["checkpoint", "design", "schedule", "lr rule", "iterations", "AP", "AP50", "AP75",
         "VOC07 AP50"],
        [[name, result["design"], s["name"], f"{s['lr_rule']} ({s['base_lr']:.4g})",
          s["iterations"], pct(result["AP"]), pct(result["AP50"]), pct(result["AP75"]),
          pct(result["VOC07_AP50"])]])
    per = markdown_table(["class", "AP", "AP50", "VOC07 AP50"],
                         [[c, pct(v["AP"]), pct(v["AP50"]), pct(v["VOC07_AP50"])]
                          for c, v in result["metrics"]["per_class"].items()])
    return top + "\n\n" + per
