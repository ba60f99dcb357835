"""Diagnostics of the built-in synthetic dataset: how hard is it to learn, with and without labels?

For ``synthetic`` (2,000 training / 1,000 held-out 40-px images; ``--style`` picks one of the
dataset variants of ``benchmarks/demo_search.py``, default the shipped one) this prints, on 32-px
centre crops (the demo's evaluation view):

* kNN top-1 (k = 20, cosine, NPID vote) of a random-init ResNet-18 (ImageNet stem) for three seeds,
  through the same protocol as ``pirl demo``;
* kNN top-1 of the raw pixels (the normalised 3 x 32 x 32 crop as the feature);
* the *training* accuracy of a supervised ResNet-18 per epoch (SGD lr 0.01, momentum 0.9, batch
  32, no augmentation), with the ImageNet stem and with the small stem: how fast the shapes can be
  learned at all when labels are given.

    python benchmarks/demo_dataset.py [--epochs 4] [--style shipped|v1|...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pirl.data.synthetic as synthetic
from pirl import config as C
from pirl.data import open_source
from pirl.data.views import build_eval_transform, normalize
from pirl.evaluate.features import EvalSettings
from pirl.evaluate.knn import knn_classify, run_knn
from pirl.trunk import build_trunk


def _crops(split: str, cfg: C.Config) -> tuple[Tensor, Tensor]:
    """Normalised eval-view crops ``[N,3,32,32]`` and labels ``[N]`` of a synthetic split."""
    src = open_source(split)
    view = build_eval_transform(cfg.views)
    x = torch.stack([view(src.load(i)) for i in range(len(src))])
    return normalize(x), torch.tensor(src.targets)


def supervised_accuracy(x: Tensor, y: Tensor, small_stem: bool, epochs: int) -> list[float]:
    """Training accuracy (%) per epoch of a ResNet-18 + linear classifier trained on (x, y)."""
    torch.manual_seed(0)
    trunk, head = build_trunk("resnet18", small_stem), nn.Linear(512, 10)
    opt = torch.optim.SGD([*trunk.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
    accs = []
    for _ in range(epochs):
        correct = 0
        for batch in torch.randperm(len(x)).split(32):
            logits = head(trunk(x[batch]))
            loss = F.cross_entropy(logits, y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == y[batch]).sum())
        accs.append(100 * correct / len(x))
    return accs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4, help="supervised training epochs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--style", default="shipped", help="dataset variant (demo_search.STYLES)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from demo_search import STYLES

    if args.style not in STYLES:
        ap.error(f"unknown --style {args.style!r}; known: {list(STYLES)}")
    synthetic.STYLE = STYLES[args.style]
    torch.set_num_threads(args.threads)
    cfg = C.from_preset("demo")
    settings = EvalSettings(batch_size=256, workers=0, quiet=True, cache_dir=None)
    train, val = open_source("synthetic"), open_source("synthetic:val")
    print(f"dataset style {args.style!r}\n")
    print("| what | kNN top-1 % |\n|---|---|")
    for seed in (0, 1, 2):
        torch.manual_seed(seed)  # as `pirl demo` builds its random-init trunk
        r = run_knn(build_trunk("resnet18", False), train, val, cfg.views, settings, k=20)
        print(f"| random-init ResNet-18, seed {seed} | {r['top1']:.1f} |")
    x, y = _crops("synthetic", cfg)
    xv, yv = _crops("synthetic:val", cfg)
    raw = knn_classify(F.normalize(x.flatten(1), dim=1), y, F.normalize(xv.flatten(1), dim=1), yv,
                       10, 20, 0.07)
    print(f"| raw pixels | {raw['top1']:.1f} |")
    print(f"\nsupervised ResNet-18, training accuracy % per epoch ({len(x)} images):\n")
    print("| stem | " + " | ".join(f"epoch {e + 1}" for e in range(args.epochs)) + " | min |")
    print("|---|" + "---|" * (args.epochs + 1))
    for small in (False, True):
        t0 = time.perf_counter()
        accs = supervised_accuracy(x, y, small, args.epochs)
        print(f"| {'small' if small else 'ImageNet'} | " + " | ".join(f"{a:.1f}" for a in accs)
              + f" | {(time.perf_counter() - t0) / 60:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
