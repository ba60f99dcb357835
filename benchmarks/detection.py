"""Detection transfer benchmark: the paper's Table 1 (object detection after pre-training) at the
scale of this machine.

Pretrains PIRL, NPID++, Jigsaw and supervised pre-training with the quality benchmark's recipe
and budget (``benchmarks/quality.py``: the ``imagenette-small`` preset on 200 Imagenette-96
training images per class), adds the same trunk at random init, and fine-tunes each on two real
Pascal-VOC-layout sets, ``raccoon.tar`` (natural photographs) and ``bccd.tar`` (blood-smear
microscopy), once per fine-tuning seed, through ``pirl eval detection``.  Prints AP / AP50 / AP75
as mean ± standard deviation over the seeds for every (pre-training, dataset) pair and writes
``<out>/results.json``.

    python benchmarks/detection.py                       # CPU scale (hours on 2 cores)
    python benchmarks/detection.py --device cuda         # larger images, longer schedules
    python benchmarks/detection.py --quick               # a smoke run of the whole pipeline
    python benchmarks/detection.py --device cuda --parallel 5   # one process per pre-training

Rerunning the same command skips what ``--out`` already holds: a finished pre-training (its
``trunk.pt``) and a finished fine-tune (its ``detection.json``); an interrupted pre-training or
fine-tune resumes from its checkpoint.  A cell of ``--out`` made with other settings is refused.
Only the fine-tuning seed varies between the seeds of a cell: the pre-training is one run (seed
``--pretrain-seed``), so the spread is that of the fine-tuning alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (REPO, HERE):  # the package beside the script, and quality.py (a sibling script)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import quality as Q  # noqa: E402

from pirl import config as C  # noqa: E402
from pirl.bench import add_data_root_argument, data_root  # noqa: E402
from pirl.evaluate.detection.schedule import LR_RULES  # noqa: E402
from pirl.evaluate.metrics import markdown_table  # noqa: E402
from pirl.presets import PRESETS  # noqa: E402

log = logging.getLogger("detection-bench")

# Table 1's rows: names of quality.py's METHOD_SETTINGS ("random" = the trunk at random init).
DEFAULT_METHODS = ("pirl", "npid++", "jigsaw", "supervised", "random")
DATASETS = ("raccoon", "bccd")  # <detection-root>/<name>.tar
METRICS = ("AP", "AP50", "AP75")

# What each mode pretrains and how it fine-tunes; every value can be overridden by its flag.
# cpu: the quality benchmark's budget, and the detector at a 160-px shorter side (the images are
#   at most 320 px; half of that keeps a ResNet-18 C4 iteration within seconds on 2 cores) on the
#   200-iteration `short` schedule.
# cuda: the imagenette96-r18 preset on the whole training split (96-px views, 100 epochs), and
#   the paper's single-scale 480-px input for 1,500 iterations of 8 images on the voc07
#   schedule's shape (lr step and warm-up follow the iterations), i.e. about 40 to 75 passes over
#   these small training sets rather than the thousand the full 12.5K schedule would make.
# quick: quality.py's --quick pre-training and two fine-tuning iterations on 64-px images.
MODES: dict[str, dict[str, Any]] = {
    "cpu": {"preset": Q.DEFAULT_PRESET, "subset": Q.DEFAULT_SUBSET, "epochs": None,
            "batch_size": None, "overrides": [], "schedule": "short", "iters": None,
            "min_size": 160, "max_size": None, "ft_batch_size": 2, "roi_batch": None,
            "test_proposals": None, "seeds": "0,1,2", "workers": 1},
    "cuda": {"preset": "imagenette96-r18", "subset": 0, "epochs": None, "batch_size": None,
             "overrides": [], "schedule": "voc07", "iters": 1500, "min_size": 480,
             "max_size": None, "ft_batch_size": 8, "roi_batch": None, "test_proposals": None,
             "seeds": "0,1,2", "workers": 8},
    "quick": {"preset": Q.DEFAULT_PRESET, "subset": Q.QUICK["subset"],
              "epochs": Q.QUICK["epochs"], "batch_size": Q.QUICK["batch_size"],
              "overrides": list(Q.QUICK["overrides"]), "schedule": "short", "iters": 2,
              "min_size": 64, "max_size": 96, "ft_batch_size": 2, "roi_batch": 16,
              "test_proposals": 10, "seeds": "0", "workers": 1},
}


# ----------------------------------------------------------------------------- pre-training


def _check_key(path: Path, key: Any, what: str) -> bool:
    """Whether ``path`` already records ``key`` (True), records nothing yet (False, and it is
    written now); another key stops the benchmark: ``--out`` holds a cell of other settings."""
    if path.is_file():
        if json.loads(path.read_text()) != json.loads(json.dumps(key)):
            raise SystemExit(f"detection.py: {path.parent} holds {what} made with other settings; "
                             "use another --out (or delete that folder)")
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(key, indent=2) + "\n")
    return False


def pretrained_checkpoint(name: str, args: argparse.Namespace, train_path: str,
                          out: Path) -> list[str]:
    """Pretrain ``name`` into ``out/pretrain/<name>`` unless it is there already; returns the
    ``--checkpoint`` (and ``--arch`` / ``--small-stem``) arguments of its fine-tunes."""
    from pirl.train import pretrain

    if Q.METHOD_SETTINGS[name] is None:  # random init: no run; each seed draws its own trunk
        base = C.from_preset(args.preset)
        C.apply_overrides(base, list(args.overrides))
        return ["--checkpoint", "random", "--arch", base.model.arch,
                "--small-stem" if base.model.small_stem else "--no-small-stem"]
    cfg = Q.method_config(name, args.preset, args.overrides, args.epochs, args.batch_size)
    cfg.train.seed = args.pretrain_seed
    run = out / "pretrain" / name
    key = {"config": C.to_dict(cfg), "data": train_path}
    known = _check_key(run / "bench_key.json", key, f"a pre-training of {name}")
    if known and (run / "trunk.pt").is_file():
        log.info("%s: pre-training already in %s", name, run)
    else:
        cfg.train.workers = args.workers
        log.info("%s: pre-training into %s", name, run)
        pretrain(cfg, train_path, run, device=args.device)
    return ["--checkpoint", str(run / "checkpoint.pt")]


# ----------------------------------------------------------------------------- fine-tuning


def finetune_args(args: argparse.Namespace) -> list[str]:
    """The ``pirl eval detection`` options every cell shares (the checkpoint, data, output and
    seed are added per cell)."""
    argv = ["--schedule", args.schedule, "--batch-size", str(args.ft_batch_size),
            "--min-size", str(args.min_size), "--workers", str(args.workers),
            "--device", args.device, "--png-images", "0", "--quiet"]
    for flag, value in (("--iters", args.iters), ("--max-size", args.max_size),
                        ("--roi-batch", args.roi_batch),
                        ("--test-proposals", args.test_proposals),
                        ("--lr-rule", args.lr_rule),
                        ("--bn-recalibrate", args.bn_recalibrate)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def finetune(argv: list[str], cell: Path) -> dict[str, Any]:
    """Run ``pirl eval detection argv --out cell`` in this process unless ``cell`` holds its
    result already; returns that result (``detection.json``) or ``{"failed": exit code}``."""
    from pirl.cli import build_parser

    result = cell / "detection.json"
    if _check_key(cell / "bench_args.json", argv, "a fine-tune") and result.is_file():
        return {**json.loads(result.read_text()), "skipped": True}
    args = build_parser().parse_args(["eval", "detection", *argv, "--out", str(cell)])
    # The command's tables go to the cell's folder; what the benchmark prints is the summary.
    with open(cell / "stdout.txt", "w") as fh, contextlib.redirect_stdout(fh):
        code = int(args.func(args) or 0)
    if code:
        return {"failed": code}
    return {**json.loads(result.read_text()), "skipped": False}


def _describe(r: dict[str, Any]) -> str:
    if "failed" in r:
        return f"failed (exit {r['failed']}; its output is in the cell's folder)"
    scores = " ".join(f"{k} {r[k]:.2f}" for k in METRICS if r[k] is not None)
    return scores + (" (already in --out)" if r["skipped"] else "")


def child_argv(argv: Sequence[str], method: str) -> list[str]:
    """The command line of one pre-training's process: ``argv`` with its own ``--methods`` and
    without ``--parallel``."""
    kept: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--methods", "--parallel"):
            skip = True
        elif not a.startswith(("--methods=", "--parallel=")):
            kept.append(a)
    return [*kept, "--methods", method]


def run_parallel(argv: Sequence[str], methods: Sequence[str], n: int, out: Path) -> None:
    """Each method's pre-training and fine-tunes in a process of its own, up to ``n`` at once,
    writing into the same ``out`` (their cells are disjoint); each one's output goes to
    ``out/log_<method>.txt``.  The caller then collects the cells; any a failed process left
    unfinished it runs itself."""
    pending, running = list(methods), []
    while pending or running:
        while pending and len(running) < n:
            m = pending.pop(0)
            fh = open(out / f"log_{m}.txt", "w")  # noqa: SIM115 - closed when the process ends
            cmd = [sys.executable, str(Path(__file__).resolve()), *child_argv(argv, m)]
            running.append((m, subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT), fh))
            log.info("%s: started in its own process (log: %s)", m, fh.name)
        time.sleep(0.5)
        for item in list(running):
            m, proc, fh = item
            if proc.poll() is not None:
                fh.close()
                running.remove(item)
                log.info("%s: process finished with exit code %d", m, proc.returncode)


# ----------------------------------------------------------------------------- summary


def summarise(cells: Sequence[dict[str, Any]], methods: Sequence[str],
              datasets: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (pre-training, dataset): the seeds that finished, and per metric the mean and
    the sample standard deviation over them (None for fewer than two)."""
    rows = []
    for d in datasets:
        for m in methods:
            done = [c for c in cells if c["method"] == m and c["dataset"] == d and "AP" in c]
            row: dict[str, Any] = {"method": m, "dataset": d, "seeds": [c["seed"] for c in done]}
            for k in METRICS:
                values = [float(c[k]) for c in done if c[k] is not None]
                row[k] = statistics.fmean(values) if values else None
                row[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else None
            rows.append(row)
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown table: AP / AP50 / AP75 as ``mean ± std`` (percent) over the seeds."""

    def cell(row: dict[str, Any], k: str) -> str:
        if row[k] is None:
            return "-"
        std = row[f"{k}_std"]
        return f"{row[k]:.2f}" + (f" ± {std:.2f}" if std is not None else "")

    return markdown_table(["pre-training", "dataset", "seeds", *METRICS],
                          [[r["method"], r["dataset"], len(r["seeds"]),
                            *(cell(r, k) for k in METRICS)] for r in rows])


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (see the module docstring); None = the mode's value (``MODES``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {','.join(Q.METHOD_SETTINGS)}")
    p.add_argument("--datasets", default=",".join(DATASETS),
                   help="comma-separated names of VOC tars under --detection-root")
    p.add_argument("--seeds", default=None, help="fine-tuning seeds, comma-separated "
                   "(default 0,1,2; --quick: 0)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the larger settings")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny pre-training, two "
                   "fine-tuning iterations on small images, one seed")
    add_data_root_argument(p, f"{Q.DATASET}/train.tar and detection/{{raccoon,bccd}}.tar")
    p.add_argument("--train-data", default=None,
                   help=f"ImageFolder .tar to pretrain on (default DATA_ROOT/{Q.DATASET}/"
                   "train.tar)")
    p.add_argument("--detection-root", default=None, metavar="DIR",
                   help="folder holding raccoon.tar and bccd.tar (default DATA_ROOT/detection)")
    g = p.add_argument_group("pre-training (default: the mode's)")
    g.add_argument("--preset", default=None, choices=PRESETS)
    g.add_argument("--subset", type=int, default=None,
                   help="training images per class (0 = the whole split)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="config override for every pre-training (repeatable)")
    g.add_argument("--pretrain-seed", type=int, default=0)
    g = p.add_argument_group("fine-tuning (default: the mode's; see pirl eval detection --help)")
    g.add_argument("--schedule", default=None)
    g.add_argument("--iters", type=int, default=None)
    g.add_argument("--min-size", type=int, default=None)
    g.add_argument("--max-size", type=int, default=None)
    g.add_argument("--ft-batch-size", type=int, default=None, help="images per iteration")
    g.add_argument("--roi-batch", type=int, default=None)
    g.add_argument("--test-proposals", type=int, default=None)
    g.add_argument("--lr-rule", default=None, choices=tuple(LR_RULES),
                   help="one lr rule for every starting point (default: the paper's, "
                   "contrastive for PIRL / NPID++ trunks and supervised for the others)")
    g.add_argument("--bn-recalibrate", type=int, default=None, metavar="N",
                   help="re-estimate every trunk's BatchNorm statistics on N training images "
                   "at the fine-tuning size before freezing them (default: the checkpoint's)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers (default 1; with --device cuda 8)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (quality.py says "
                   "why 1 on a shared machine)")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="run up to N pre-trainings, each with its fine-tunes, as separate "
                   "processes at once (e.g. 5 on one large GPU), then collect the table here; "
                   "1 (default): everything in this process")
    p.add_argument("--out", default=str(REPO / ".cache" / "detection"),
                   help="folder for results.json, the runs and the fine-tunes")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left at None from the mode (quick, else cpu or cuda by --device)."""
    mode = "quick" if args.quick else ("cuda" if args.device.startswith("cuda") else "cpu")
    args.mode = mode
    for key, value in MODES[mode].items():
        if key != "overrides" and getattr(args, key, None) is None:
            setattr(args, key, value)
    args.overrides = list(MODES[mode]["overrides"]) + list(args.set)
    if args.train_data is None or args.detection_root is None:
        root = data_root(args.data_root, "detection.py")
        args.train_data = args.train_data or str(root / Q.DATASET / "train.tar")
        args.detection_root = args.detection_root or str(root / "detection")
    return args


def settings_text(args: argparse.Namespace, train_path: str) -> str:
    """The exact settings, printed before any work."""
    cfg = Q.method_config("pirl", args.preset, args.overrides, args.epochs, args.batch_size)
    return "\n".join([
        f"mode {args.mode}; fine-tuning seeds {args.seeds}; torch threads {args.threads}",
        f"pre-training: {', '.join(args.methods)} on {train_path} ({args.subset or 'all'} images "
        f"per class); preset {args.preset}, {cfg.model.arch}, {cfg.views.image_size}-px views, "
        f"epochs {cfg.optim.epochs}, batch {cfg.optim.batch_size}, seed {args.pretrain_seed}, "
        f"overrides {args.overrides or 'none'}",
        "fine-tuning: pirl eval detection --checkpoint CKPT --data "
        f"{args.detection_root}/{{{','.join(args.datasets)}}}.tar --seed S "
        + " ".join(finetune_args(args)),
    ])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to ``<out>/results.json``."""
    args = resolve(build_parser().parse_args(argv))
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    unknown = [m for m in args.methods if m not in Q.METHOD_SETTINGS]
    if unknown or not args.methods or not seeds:
        raise SystemExit(f"detection.py: --methods {unknown or 'empty'} / --seeds {args.seeds}: "
                         f"choose methods from {list(Q.METHOD_SETTINGS)} and at least one seed")
    if args.parallel < 1:
        raise SystemExit(f"detection.py: --parallel {args.parallel}: must be >= 1")
    voc = {d: Path(args.detection_root) / f"{d}.tar" for d in args.datasets}
    missing = [str(p) for p in [Path(args.train_data), *voc.values()] if not p.is_file()]
    if missing:
        raise SystemExit(f"detection.py: not found: {', '.join(missing)}")
    from pirl.cli import build_parser as pirl_parser

    shared = finetune_args(args)
    # A bad fine-tuning option stops here (argparse, exit 2), not after the pre-trainings.
    pirl_parser().parse_args(["eval", "detection", "--checkpoint", "random", "--data", "-",
                              "--out", "-", *shared])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("pirl").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_path, _ = Q.prepare_data(Path(args.train_data), Path(args.train_data),
                                   args.subset or None, None, out / "data")
    settings = settings_text(args, train_path)
    print(settings, flush=True)
    if args.parallel > 1 and len(args.methods) > 1:
        run_parallel(list(sys.argv[1:] if argv is None else argv), args.methods, args.parallel,
                     out)
    checkpoints = {m: pretrained_checkpoint(m, args, train_path, out) for m in args.methods}
    cells: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    # Seed by seed: a run stopped early has every pre-training's first fine-tune.
    for seed in seeds:
        for d in args.datasets:
            for m in args.methods:
                cell_dir = out / "finetune" / m / d / f"seed{seed}"
                argv_cell = [*checkpoints[m], "--data", str(voc[d]), "--seed", str(seed), *shared]
                r = finetune(argv_cell, cell_dir)
                cell = {"method": m, "dataset": d, "seed": seed, "out": str(cell_dir),
                        **{k: r.get(k) for k in (*METRICS, "VOC07_AP50", "lr_rule",
                                                  "iterations", "failed", "skipped")}}
                cells.append(cell)
                log.info("%s on %s, seed %d: %s", m, d, seed, _describe(r))
                result = {"command": "python benchmarks/detection.py " + " ".join(
                              sys.argv[1:] if argv is None else list(argv)),
                          "settings": settings, "mode": args.mode, "train_data": train_path,
                          "detection_data": {k: str(p) for k, p in voc.items()},
                          "seeds": seeds, "torch": torch.__version__, "cells": cells,
                          "summary": summarise(cells, args.methods, args.datasets)}
                # written after every cell, so a long run that is stopped keeps what it measured
                (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result["summary"]))
    print(f"\nwrote {out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
