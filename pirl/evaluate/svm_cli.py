"""``pirl eval svm``'s own options and data: ImageFolder / list splits, or a Pascal VOC set
(``--data VOC2007``: trainval to train, test to score, multi-label, ``difficult`` left out).

Kept apart from :mod:`pirl.evaluate.cli` so that module stays a table of protocols.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from pirl import config as C
from pirl.config import ViewConfig
from pirl.data.source import ImageSource
from pirl.evaluate.features import EvalSettings
from pirl.evaluate.metrics import markdown_table
from pirl.evaluate.svm import BENCHMARK_COSTS, LOW_SHOT_K


def add_svm_options(p: argparse.ArgumentParser) -> None:
    """The svm protocol's options (on top of the common ones)."""
    p.add_argument("--data", action="append", default=None, metavar="VOC",
                   help="Pascal VOC folder or .tar (repeat or comma-separate to join several): "
                   "train on --train-split, score on --test-split, one label per class "
                   "(instead of --train-data / --val-data)")
    p.add_argument("--train-split", default="trainval", help="VOC split the SVMs train on")
    p.add_argument("--test-split", default="test", help="VOC split they are scored on")
    p.add_argument("--costs", default=",".join(f"{c:g}" for c in BENCHMARK_COSTS),
                   help="comma-separated SVM costs C tried by cross-validation (default: Goyal "
                   "et al.'s grid, 1e-7 .. 100 and 2^-19 .. 2^-4)")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds")
    p.add_argument("--low-shot", default=None, metavar="K,K,...",
                   help="also train on k positives per class (and (C-1)k negatives), e.g. "
                   f"{','.join(map(str, LOW_SHOT_K))} (the benchmark's); 'benchmark' = that list")
    p.add_argument("--samples", type=int, default=5,
                   help="independent low-shot draws per k (mean and std of mAP reported)")


def parse_low_shot(text: str | None) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; 'benchmark' -> the benchmark's k; None -> []."""
    if text is None:
        return []
    if text.strip() == "benchmark":
        return list(LOW_SHOT_K)
    try:
        ks = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise C.ConfigError(f"--low-shot={text!r}: expected comma-separated integers") from None
    if not ks or min(ks) < 1:
        raise C.ConfigError(f"--low-shot={text!r}: expected positive integers")
    return ks


def open_svm_splits(args: argparse.Namespace) -> tuple[ImageSource, ImageSource]:
    """(train, val): the VOC splits of ``--data``, or ``--train-data`` / ``--val-data``."""
    from pirl.data.datasets import open_source

    if args.data:
        if args.train_data or args.val_data:
            raise C.ConfigError("give --data (a VOC set) or --train-data and --val-data, not both")
        from pirl.data.voc import parse_data_paths
        from pirl.data.voc_labels import open_voc_images

        paths = parse_data_paths(args.data)
        train = open_voc_images(paths, args.train_split)
        return train, open_voc_images(paths, args.test_split, classes=train.classes)
    if not args.train_data or not args.val_data:
        raise C.ConfigError("pirl eval svm needs --data VOC, or --train-data and --val-data")
    return open_source(args.train_data), open_source(args.val_data)


def run_svm_cli(args: argparse.Namespace, trunk: torch.nn.Module, name: str,
                train: ImageSource, val: ImageSource, views: ViewConfig,
                settings: EvalSettings, costs: list[float]) -> tuple[dict[str, Any], str]:
    """Run the protocol: (result, markdown table)."""
    from pirl.evaluate.svm import run_svm

    ks = parse_low_shot(args.low_shot)
    r = run_svm(trunk, train, val, views, settings, stage=args.stage, costs=costs,
                folds=args.folds, seed=args.seed, low_shot=ks, samples=args.samples)
    if args.data:
        r["data"] = {"voc": args.data, "train_split": args.train_split,
                     "test_split": args.test_split}
    table = markdown_table(["checkpoint", "stage", "mAP", "top-1"],
                           [[name, r["stage"], r["mAP"], r.get("top1", "-")]])
    if ks:
        rows = [[name, k, v["mAP_mean"], v["mAP_std"]] for k, v in r["low_shot"].items()]
        table += "\n\n" + markdown_table(
            ["checkpoint", "k", f"mAP mean ({args.samples} draws)", "std"], rows)
    return r, table
