"""Side-by-side quality benchmark: every method, same trunk, data, budget and seed (issue 4).

Pretrains each method with the same config (preset + recipe + your overrides; only the method
and its own settings differ), adds the same trunk at random init, and evaluates each trunk's res5
features with the kNN protocol (NPID's weighted vote) and a short linear probe on the val split.
Prints a markdown table (method, epochs, wall time, kNN top-1, linear top-1) and writes
``<out>/results.json``; the run folders (checkpoint.pt, log.jsonl) stay under ``<out>/runs``.

    python benchmarks/quality.py                        # the README's budget (under 1 h, 2 cores)
    python benchmarks/quality.py --quick                # a seconds-long smoke run
    python benchmarks/quality.py --methods pirl,random --subset 100 --epochs 5 --set tau=0.2

``--subset K`` keeps the first K images of every class (in the archive's sorted order, so the
choice is reproducible and the same for every method); the subset is written once as a small
uncompressed ImageFolder tar under ``<out>/data`` and read in place like the original.  Every
trunk is loaded back through :func:`pirl.evaluate.loading.load_eval_model`, the same path
``pirl eval knn|linear --checkpoint`` takes, so the benchmark also checks that each method's
checkpoint loads into the evaluation protocols.

Wall times are those of a shared machine when it was measured (docs/quality.md says which); the
process CPU time of the main process is recorded beside them in the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout: import the package beside it
    sys.path.insert(0, str(REPO))

from pirl import config as C  # noqa: E402
from pirl.bench import add_data_root_argument, data_root  # noqa: E402
from pirl.data.datasets import open_source  # noqa: E402
from pirl.data.subset import prepare_data, write_subset  # noqa: E402, F401 (tests use it here)
from pirl.evaluate.features import EvalSettings  # noqa: E402
from pirl.evaluate.loading import load_eval_model  # noqa: E402
from pirl.evaluate.metrics import markdown_table  # noqa: E402
from pirl.evaluate.standard import TrunkEval, evaluate_trunk  # noqa: E402
from pirl.presets import PRESETS  # noqa: E402

log = logging.getLogger("quality")

DATASET = "imagenette-96"  # under --data-root / $PIRL_DATA: train.tar and val.tar

# What distinguishes each method; everything else comes from the shared config.  NPID / NPID++
# are the paper's 4,096 / 32,000 negatives (capped at |D| - 1 on a smaller dataset).
METHOD_SETTINGS: dict[str, dict[str, Any] | None] = {
    "pirl": {"method": "pirl", "pretext": "jigsaw"},
    "pirl-rotation": {"method": "pirl", "pretext": "rotation"},
    "pirl-jigsaw+rotation": {"method": "pirl", "pretext": "jigsaw+rotation"},
    # ablations of two defaults: negatives shared by the batch (issue 6 asks for the negatives
    # mode to be chosen by quality), and BatchNorm running statistics from every trunk call
    # (the patches too) instead of the image view alone (pirl/methods/pirl.py explains).
    "pirl-shared": {"method": "pirl", "pretext": "jigsaw", "negatives": "shared"},
    "pirl-bn-all": {"method": "pirl", "pretext": "jigsaw", "bn_stats": "all"},
    "npid": {"method": "npid", "num_negatives": 4096},
    "npid++": {"method": "npid", "num_negatives": 32000},
    "jigsaw": {"method": "jigsaw"},
    "rotation": {"method": "rotation"},
    # trained on the subset's labels (the reference of the transfer benchmarks; not a default
    # row here, where its kNN / linear scores on the same classes would not be a fair comparison)
    "supervised": {"method": "supervised"},
    "random": None,  # the same trunk, untrained
}
# The paper's comparisons first, so a run stopped early still has them (results.json is written
# after every method).
DEFAULT_METHODS = ("random", "pirl", "npid", "npid++", "jigsaw", "rotation", "pirl-rotation",
                   "pirl-jigsaw+rotation", "pirl-shared", "pirl-bn-all")

# The README's budget: the `imagenette-small` preset (32 px, 12 epochs; docs/quality.md explains
# each number) on 200 training images per class, evaluated on the whole val split.
DEFAULT_PRESET = "imagenette-small"
DEFAULT_SUBSET = 200
DEFAULT_VAL_SUBSET = 0

# --quick: a smoke run of the whole pipeline (tiny images, one epoch, a few images per class).
QUICK: dict[str, Any] = {
    "epochs": 1, "subset": 4, "val_subset": 2, "batch_size": 8, "linear_epochs": 2,
    "aug_copies": 1, "knn_k": 5,
    "overrides": ["image_size=32", "jigsaw_crop=36", "cell=12", "patch=9", "eval_resize=36",
                  "warmup_epochs=0", "num_permutations=10"]}


# ----------------------------------------------------------------------------- config


def method_config(name: str, preset: str, overrides: Sequence[str], epochs: int | None,
                  batch_size: int | None) -> C.Config:
    """The shared config with ``name``'s settings on top; the user's overrides come last.
    ``epochs`` / ``batch_size`` None keep the preset's."""
    settings = METHOD_SETTINGS[name]
    if settings is None:
        raise ValueError(f"method {name!r} is not trained")
    cfg = C.from_preset(preset)
    # A method's settings are a preset of their own: npid++'s N = 32,000 is capped at |D| - 1
    # on a smaller dataset, not refused.
    C.apply_mapping(cfg, settings, source=f"method {name}", explicit=False)
    if epochs is not None:
        cfg.optim.epochs = epochs
    if batch_size is not None:
        cfg.optim.batch_size = batch_size
    C.apply_overrides(cfg, list(overrides))
    cfg.train.quiet = True
    cfg.train.knn_every = 0  # evaluation happens once, below, the same way for every method
    C.validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- run


def run_method(name: str, args: argparse.Namespace, train_path: str, out: Path,
               settings: EvalSettings) -> dict[str, Any]:
    """Pretrain ``name`` (unless it is ``random``), load it back, evaluate; one result row."""
    from pirl.train import pretrain

    train_src, val_src = open_source(train_path), open_source(args.val_path)
    base = C.from_preset(args.preset)
    C.apply_overrides(base, list(args.set))
    row: dict[str, Any] = {"method": name, "epochs": 0, "wall_s": 0.0, "cpu_s": 0.0}
    if METHOD_SETTINGS[name] is None:
        torch.manual_seed(args.seed)  # as `pirl eval --checkpoint random --seed S`
        model = load_eval_model("random", base.model.arch, base.model.small_stem, name=name)
        views = base.views
    else:
        cfg = method_config(name, args.preset, args.set, args.epochs, args.batch_size)
        cfg.train.seed = args.seed
        cfg.train.workers = args.workers
        run_dir = out / "runs" / name
        if run_dir.exists():  # a fresh run: a resumed one would not give a comparable wall time
            shutil.rmtree(run_dir)
        t0, c0 = time.perf_counter(), time.process_time()
        result = pretrain(cfg, train_path, run_dir, device=args.device)
        row.update(epochs=result.epochs, steps=result.steps,
                   wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0,
                   last_train_log={k: v for k, v in result.last_record.items()
                                   if isinstance(v, (int, float))},
                   config=C.to_dict(cfg))
        model = load_eval_model(str(run_dir / "checkpoint.pt"), name=name)
        views = cfg.views
    t0 = time.perf_counter()
    protocol = TrunkEval.from_args(args)
    row.update(evaluate_trunk(model.trunk, train_src, val_src, views, settings, protocol,
                              args.seed))
    row["eval_wall_s"] = time.perf_counter() - t0
    return row


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The README's table: one row per method."""
    return markdown_table(
        ["method", "epochs", "wall time (min)", "kNN top-1", "linear top-1"],
        [[r["method"], r["epochs"], f"{r['wall_s'] / 60:.1f}", float(r["knn_top1"]),
          float(r["linear_top1"])] for r in rows])


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {','.join(METHOD_SETTINGS)}")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=PRESETS,
                   help="shared recipe every method starts from")
    p.add_argument("--epochs", type=int, default=None,
                   help="pretraining epochs (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="override optim.batch_size")
    p.add_argument("--subset", type=int, default=DEFAULT_SUBSET,
                   help="training images per class (0 = the whole training split)")
    p.add_argument("--val-subset", type=int, default=DEFAULT_VAL_SUBSET,
                   help="val images per class (0 = the whole val split)")
    add_data_root_argument(p, f"{DATASET}/train.tar and val.tar")
    p.add_argument("--train-data", default=None,
                   help=f"ImageFolder .tar (default: DATA_ROOT/{DATASET}/train.tar)")
    p.add_argument("--val-data", default=None,
                   help=f"ImageFolder .tar (default: DATA_ROOT/{DATASET}/val.tar)")
    p.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="config override applied to every method (repeatable)")
    TrunkEval.add_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="one seed for every method")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared machine more threads wait on each "
                   "other; measured 4-8x slower with 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default=str(REPO / ".cache" / "quality"),
                   help="folder for results.json, the runs and the subset archives")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny images, 1 epoch, a few images per class")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to ``<out>/results.json``."""
    args = build_parser().parse_args(argv)
    if args.train_data is None or args.val_data is None:
        root = data_root(args.data_root, "quality.py") / DATASET
        args.train_data = args.train_data or str(root / "train.tar")
        args.val_data = args.val_data or str(root / "val.tar")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("pirl").setLevel(logging.WARNING)
    if args.quick:
        args.epochs, args.subset, args.val_subset = QUICK["epochs"], QUICK["subset"], \
            QUICK["val_subset"]
        args.batch_size, args.linear_epochs = QUICK["batch_size"], QUICK["linear_epochs"]
        args.aug_copies, args.knn_k = QUICK["aug_copies"], QUICK["knn_k"]
        args.set = list(QUICK["overrides"]) + list(args.set)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_SETTINGS]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHOD_SETTINGS)}")
    for m in methods:  # fail on a bad override before any training
        if METHOD_SETTINGS[m] is not None:
            method_config(m, args.preset, args.set, args.epochs, args.batch_size)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_path, args.val_path = prepare_data(Path(args.train_data), Path(args.val_data),
                                             args.subset or None, args.val_subset or None,
                                             out / "data")
    settings = EvalSettings(device=torch.device(args.device), batch_size=256,
                            workers=args.workers, quiet=True, cache_dir=None)
    command = "python benchmarks/quality.py " + " ".join(
        sys.argv[1:] if argv is None else list(argv))
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for m in methods:
        log.info("%s: start", m)
        rows.append(run_method(m, args, train_path, out, settings))
        r = rows[-1]
        log.info("%s: %d epochs in %.1f min, kNN %.2f, linear %.2f (eval %.1f min)", m,
                 r["epochs"], r["wall_s"] / 60, r["knn_top1"], r["linear_top1"],
                 r["eval_wall_s"] / 60)
        result = {"command": command, "train_data": train_path, "val_data": args.val_path,
                  "num_train": len(open_source(train_path)),
                  "num_val": len(open_source(args.val_path)), "preset": args.preset,
                  "overrides": args.set, "seed": args.seed, "threads": args.threads,
                  "torch": torch.__version__, "rows": rows}
        # written after every method, so a long run that is stopped keeps what it measured
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"\nwrote {out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
