"""``pirl demo``: pretrain PIRL on the built-in synthetic dataset, then compare kNN accuracy on its
held-out split with the same trunk at random initialisation.  Needs no download."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from pirl import config as C

log = logging.getLogger(__name__)

TRAIN, VAL = "synthetic", "synthetic:val"


def run_demo(out: Path, device: str | None = None, epochs: int | None = None,
             quiet: bool = False, overrides: list[str] | None = None) -> int:
    """Run the demo into ``out``; prints a table and writes ``demo.json`` and ``training.png``."""
    from pirl.data import open_source
    from pirl.distributed import setup_distributed
    from pirl.evaluate.features import EvalSettings
    from pirl.evaluate.knn import run_knn
    from pirl.export import load_backbone
    from pirl.plots import plot_runs
    from pirl.train import pretrain

    cfg = C.from_preset("demo")
    if epochs is not None:
        cfg.optim.epochs = epochs
    cfg.train.quiet = quiet
    C.apply_overrides(cfg, overrides or [])
    C.validate(cfg)
    start = time.perf_counter()
    result = pretrain(cfg, TRAIN, out, val_data=VAL, device=device)  # kNN curve in the plot
    train_s = time.perf_counter() - start
    if result.stopped:  # a stop signal: the trunk is half-trained, so no comparison is printed
        print(result.summary())
        return 0

    env = setup_distributed(device)
    settings = EvalSettings(device=env.device, batch_size=256, workers=cfg.train.workers,
                            quiet=quiet, cache_dir=None)
    train_src, val_src = open_source(TRAIN), open_source(VAL)
    pretrained = load_backbone(result.run_dir / "checkpoint.pt")
    torch.manual_seed(cfg.train.seed)  # a reproducible random init (same seed as the run)
    random_init = load_backbone("random", cfg.model.arch, cfg.model.small_stem)
    rows = {}
    for name, trunk in (("PIRL pretrained", pretrained), ("random init", random_init)):
        rows[name] = run_knn(trunk.to(env.device), train_src, val_src, cfg.views, settings,
                             k=cfg.train.knn_k)
    k = rows["random init"]["k"]
    print(f"\nkNN (k={k}, cosine, weights exp(s/0.07)) on the held-out synthetic split "
          f"({rows['random init']['num_val']} images, {len(val_src.classes)} classes):")
    print("| trunk | kNN top-1 % | kNN top-5 % |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['top1']:.1f} | {r['top5']:.1f} |")
    gain = rows["PIRL pretrained"]["top1"] - rows["random init"]["top1"]
    print(f"\npretraining: {result.steps} steps in {train_s / 60:.1f} min; "
          f"kNN top-1 gain over random init: {gain:+.1f} points")
    summary = {"train_seconds": train_s, "steps": result.steps, "knn": rows,
               "gain_top1": gain, "config": C.to_dict(cfg)}
    (result.run_dir / "demo.json").write_text(json.dumps(summary, indent=2))
    png = plot_runs([result.run_dir], result.run_dir / "training.png")
    print(f"wrote {result.run_dir / 'demo.json'} and {png}")
    return 0
