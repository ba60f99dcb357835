"""The short evaluation every benchmark and sweep applies to a pretrained trunk: kNN + linear.

One place for its settings, so the quality benchmark (benchmarks/quality.py) and ``pirl sweep``
measure the same thing: NPID's weighted kNN vote (k = 200, tau = 0.07) and a linear probe (30
epochs, lr 0.01 x0.1 twice, 2 augmented copies of the training split), both on the res5
features, the images seen through the evaluation view (resize, centre crop) of the run's config.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from torch import nn

from pirl.config import ViewConfig
from pirl.data.source import ImageSource
from pirl.evaluate.features import EvalSettings
from pirl.evaluate.knn import run_knn
from pirl.evaluate.linear import run_linear


@dataclass(frozen=True)
class TrunkEval:
    """What :func:`evaluate_trunk` measures (docs/quality.md explains the numbers)."""

    knn_k: int = 200
    linear_epochs: int = 30
    aug_copies: int = 2
    stage: str = "res5"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        """``--knn-k``, ``--linear-epochs``, ``--aug-copies`` with these defaults (the quality
        benchmark and ``pirl sweep`` share them); :meth:`from_args` reads them back."""
        p.add_argument("--knn-k", type=int, default=TrunkEval.knn_k, help="k of the kNN vote")
        p.add_argument("--linear-epochs", type=int, default=TrunkEval.linear_epochs,
                       help="linear probe epochs")
        p.add_argument("--aug-copies", type=int, default=TrunkEval.aug_copies,
                       help="augmented copies of the training split the probe cycles through")

    @staticmethod
    def from_args(args: argparse.Namespace) -> TrunkEval:
        return TrunkEval(knn_k=args.knn_k, linear_epochs=args.linear_epochs,
                         aug_copies=args.aug_copies)


def evaluate_trunk(trunk: nn.Module, train: ImageSource, val: ImageSource, views: ViewConfig,
                   settings: EvalSettings, protocol: TrunkEval = TrunkEval(),
                   seed: int = 0) -> dict[str, Any]:
    """kNN and linear-probe top-1 / top-5 (percent) of ``protocol.stage``'s pooled features.

    ``train`` is the labelled set (kNN's neighbours, the probe's training split), ``val`` the
    images scored; ``seed`` seeds the probe's augmented copies and its initialisation."""
    knn = run_knn(trunk, train, val, views, settings, k=protocol.knn_k, stage=protocol.stage)
    lin = run_linear(trunk, train, val, views, settings, stages=(protocol.stage,),
                     epochs=protocol.linear_epochs, aug_copies=protocol.aug_copies, seed=seed)
    layer = lin["layers"][protocol.stage]
    return {"knn_top1": knn["top1"], "knn_top5": knn["top5"], "knn_k": knn["k"],
            "linear_top1": layer["top1"], "linear_top5": layer["top5"],
            "linear_epochs": protocol.linear_epochs, "aug_copies": lin["aug_copies"]}
