"""``pirl eval <protocol>``: the evaluation protocols on the command line.

Every protocol prints a markdown table and writes ``<out>/<protocol>.json`` (plus a PNG for
invariance and neighbors).  The evaluation view (centre crop) comes from ``--image-size`` or
``--preset``; without either, from the checkpoint's training config when it has one, else the
paper's 224 px.  Exit codes: 0 done, 2 bad input (checkpoint, data, options).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from pirl import config as C
from pirl.data.source import ImageSource
from pirl.evaluate.features import EvalSettings, default_cache_dir, trunk_fingerprint
from pirl.evaluate.metrics import markdown_table
from pirl.evaluate.svm_cli import add_svm_options, open_svm_splits, run_svm_cli
from pirl.presets import PRESETS, view_preset
from pirl.trunk import STAGES

PROTOCOLS = ("knn", "linear", "svm", "finetune", "invariance", "neighbors")


# ----------------------------------------------------------------------------- parser


def _common(p: argparse.ArgumentParser, needs_train: bool, many_checkpoints: bool,
            required: bool = True) -> None:
    p.add_argument("--checkpoint", action="append", required=True, metavar="CKPT",
                   help="pirl checkpoint (any method), trunk.pt, torchvision / Detectron2 / VISSL "
                   "file, or 'random' (with --arch)"
                   + ("; repeat to overlay several" if many_checkpoints else
                      "; repeat with --concat to evaluate the trunks' features side by side"))
    p.add_argument("--arch", default=None, choices=C.ARCHS,
                   help="architecture for --checkpoint random (files: inferred, must agree)")
    p.add_argument("--small-stem", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3 stride-1 stem, for --checkpoint random on 32-64 px images")
    if needs_train:
        p.add_argument("--train-data", required=required,
                       help="labelled training split: ImageFolder folder or .tar, [ROOT::]list.txt "
                       "('relative/path label' lines), [ROOT::]split.json (iNaturalist), or "
                       "'synthetic'")
    p.add_argument("--val-data", required=required,
                   help="labelled evaluation split (same class folders as the training split)")
    p.add_argument("--out", default="runs/eval", help="folder for the JSON / PNG results "
                   "(default: runs/eval)")
    p.add_argument("--image-size", type=int, default=None,
                   help="evaluation crop side, px (resize = ~256/224 of it; jigsaw geometry "
                   "scaled likewise).  Default: the checkpoint's training size, else 224")
    p.add_argument("--preset", default=None, choices=PRESETS,
                   help="take the view geometry from this preset instead of --image-size")
    p.add_argument("--batch-size", type=int, default=256,
                   help="images per forward pass when extracting features")
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if any)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--cache-dir", default=default_cache_dir(),
                   help="feature cache (default: $PIRL_CACHE_DIR or ~/.cache/pirl/features)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of every random choice (augmentations, subsets, queries)")


def _stage_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", default="res5", choices=STAGES,
                   help="trunk stage whose pooled features are used (default: res5)")


def _concat_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concat", action="store_true",
                   help="PIRL-ens: with several --checkpoint, concatenate their pooled features "
                   "per stage (each trunk's features cached on their own)")


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` and its protocols on the ``pirl`` subcommand parser."""
    ev = subparsers.add_parser("eval", help="evaluate a trunk: knn, linear, svm, finetune, "
                               "invariance, neighbors, detection")
    sub = ev.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")

    p = sub.add_parser("knn", help="NPID weighted kNN on frozen features (top-1 / top-5)")
    _common(p, True, False)
    _stage_arg(p)
    _concat_arg(p)
    p.add_argument("--k", type=int, default=200, help="neighbours that vote (NPID: 200)")
    p.add_argument("--tau", type=float, default=0.07, help="vote weight exp(similarity / tau)")

    p = sub.add_parser("linear", help="linear probe on a frozen stage (Table 7 with --layers all)")
    _common(p, True, False)
    p.add_argument("--layers", default="res5",
                   help=f"comma-separated stages from {','.join(STAGES)}, or 'all' (prints the "
                   "per-layer table with the best layer marked)")
    p.add_argument("--epochs", type=int, default=30,
                   help="training epochs; lr x0.1 after 1/3 and 2/3 of them (ImageNet: 28)")
    p.add_argument("--aug-copies", type=int, default=5,
                   help="augmented copies of the training split whose features are extracted "
                   "(epoch e uses copy e mod N); = --epochs gives a fresh augmentation every epoch "
                   "at epochs/N times the trunk compute")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--probe-batch-size", type=int, default=256,
                   help="minibatch of the linear classifier's SGD")
    p.add_argument("--no-standardize", action="store_true",
                   help="train on raw pooled features (default: standardised with training "
                   "mean/std, which lets one lr serve every stage)")
    p.add_argument("--stream", action="store_true",
                   help="streaming probe: the trunk runs on every training batch of every epoch "
                   "(fresh augmentation; --aug-copies unused), one head per layer, no feature "
                   "memory; checkpointed to --out/linear_stream.pt each epoch, a rerun resumes. "
                   "Default: only when the cached features would exceed --memory-budget")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GB",
                   help="feature memory allowed to the cached probe before it streams instead "
                   "(default: half of the RAM)")
    p.add_argument("--stat-images", type=int, default=10_000,
                   help="stream: training images whose features give the frozen standardisation "
                   "statistics (the whole split when smaller)")
    _concat_arg(p)

    p = sub.add_parser("svm", help="one-vs-rest linear SVMs, cost by cross-validation (mAP); "
                       "VOC07 with --data")
    _common(p, True, False, required=False)
    _stage_arg(p)
    _concat_arg(p)
    add_svm_options(p)

    p = sub.add_parser("finetune", help="fine-tune the whole network on 1%% / 10%% of the labels")
    _common(p, True, False)
    p.add_argument("--fraction", type=float, default=0.01,
                   help="labelled fraction of the training split, class-balanced (0.01 or 0.1)")
    p.add_argument("--epochs", type=int, default=30,
                   help="training epochs over the subset; lr x0.1 after 1/3 and 2/3")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--ft-batch-size", type=int, default=64,
                   help="fine-tuning minibatch (a 1%% subset may hold only ~100 images)")
    p.add_argument("--subset-list", default=None, metavar="FILE",
                   help="the labelled subset as image file names or relative paths, one a line "
                   "(e.g. ImageNet's 1%% / 10%% lists); replaces --fraction")

    p = sub.add_parser("invariance", help="distance between representations of I and I^t, "
                       "histograms of several checkpoints overlaid (PIRL Fig. 4)")
    _common(p, False, True)
    p.add_argument("--png", default="invariance.png", help="histogram file name inside --out")

    p = sub.add_parser("neighbors", help="PNG grid of val queries and their nearest training "
                       "images")
    _common(p, True, False)
    _stage_arg(p)
    p.add_argument("--queries", type=int, default=8, help="number of query rows in the grid")
    p.add_argument("--k", type=int, default=5, help="neighbours per query")
    p.add_argument("--png", default="neighbors.png", help="grid file name inside --out")

    for name, parser in sub.choices.items():
        parser.set_defaults(func=run_eval, protocol=name)

    # Detection fine-tunes a whole detector: its own options and handler.
    from pirl.evaluate.detection.cli import add_detection_parser

    add_detection_parser(sub)
    return ev


# ----------------------------------------------------------------------------- helpers


def scaled_views(image_size: int) -> C.ViewConfig:
    """View geometry for ``image_size``: the config's preset table when it has that size, else
    the same ratios (crop 255/224, cell crop/3, patch cell*64/85, resize 256/224)."""
    views = C.ViewConfig()
    try:
        numbers = view_preset(image_size)
    except C.ConfigError:
        crop = max(3, round(image_size * 255 / 224))
        cell = crop // 3
        numbers = {"image_size": image_size, "jigsaw_crop": crop, "cell": cell,
                   "patch": max(1, round(cell * 64 / 85)),
                   "eval_resize": round(image_size * 256 / 224)}
    for key, value in numbers.items():
        setattr(views, key, value)
    return views


def resolve_views(args: argparse.Namespace, trained: C.Config | None) -> tuple[C.ViewConfig, str]:
    """(views, where they came from): --image-size, --preset, the checkpoint, or the paper."""
    if args.image_size is not None and args.preset is not None:
        raise C.ConfigError("give --image-size or --preset, not both")
    if args.image_size is not None:
        if args.image_size < 8:
            raise C.ConfigError(f"--image-size={args.image_size}: must be at least 8 px")
        return scaled_views(args.image_size), f"--image-size {args.image_size}"
    if args.preset is not None:
        return C.from_preset(args.preset).views, f"preset {args.preset}"
    if trained is not None:
        return copy.deepcopy(trained.views), "checkpoint config"
    return C.Config().views, "default (224 px)"


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _write_json(out: Path, protocol: str, result: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{protocol}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    return path


def _parse_floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise C.ConfigError(f"{what}={text!r}: expected comma-separated numbers") from None
    if not values:
        raise C.ConfigError(f"{what}={text!r}: no value")
    return values


def parse_layers(text: str) -> list[str]:
    """'all' -> every stage; 'res4,res5' -> those, checked."""
    if text.strip() == "all":
        return list(STAGES)
    layers = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in layers if s not in STAGES]
    if bad or not layers:
        raise C.ConfigError(f"--layers={text!r}: choose stages from {','.join(STAGES)} or 'all'")
    return layers


# ----------------------------------------------------------------------------- handler


def run_eval(args: argparse.Namespace) -> int:
    """Handler of ``pirl eval <protocol>``: returns the exit code."""
    from pirl.export import CheckpointError as ExportCheckpointError

    try:
        return _run(args)
    except (ExportCheckpointError, C.ConfigError, ValueError) as e:
        # ValueError: the protocols' input checks (class lists differ, bad k, bad fraction...)
        print(f"pirl eval {args.protocol}: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from pirl.data.datasets import open_source
    from pirl.evaluate.loading import load_eval_model, unique_labels

    protocol = args.protocol
    concat = getattr(args, "concat", False)
    if protocol != "invariance" and len(args.checkpoint) != 1 and not concat:
        raise C.ConfigError(f"pirl eval {protocol} takes one --checkpoint (got "
                            f"{len(args.checkpoint)}); several need --concat (knn, linear, svm) "
                            "or overlay in invariance")
    for path in args.checkpoint:
        if path == "random" and args.arch is None:
            raise C.ConfigError("--checkpoint random needs --arch (resnet18, resnet34, resnet50)")
        if path != "random" and not Path(path).is_file():
            raise C.ConfigError(f"--checkpoint {path}: no such file")
    if args.batch_size < 1 or args.workers < 0:
        raise C.ConfigError(f"--batch-size ({args.batch_size}) must be >= 1 and --workers "
                            f"({args.workers}) >= 0")
    names = unique_labels(args.checkpoint)
    # A random-init baseline must be the same trunk every time (reproducible, and its features
    # cacheable): its weights come from torch's generator, seeded here.
    torch.manual_seed(args.seed)
    models = [load_eval_model(p, args.arch, args.small_stem, name=n)
              for p, n in zip(args.checkpoint, names, strict=True)]
    views, views_from = resolve_views(args, models[0].config)
    settings = EvalSettings(device=_device(args.device), batch_size=args.batch_size,
                            workers=args.workers, quiet=args.quiet,
                            cache_dir=None if args.no_cache else args.cache_dir)
    train: ImageSource | None
    if protocol == "svm":
        train, val = open_svm_splits(args)
    else:
        train = open_source(args.train_data) if getattr(args, "train_data", None) else None
        val = open_source(args.val_data)
    out = Path(args.out)
    several = protocol == "invariance" or concat
    meta = {"checkpoint": args.checkpoint if several else args.checkpoint[0],
            "train_data": getattr(args, "train_data", None), "val_data": args.val_data,
            "data": getattr(args, "data", None),
            "views": dataclasses.asdict(views), "views_from": views_from,
            "device": str(settings.device),
            # which weights were evaluated, whatever the file is called (also the cache key)
            "trunk_hash": [trunk_fingerprint(m.trunk) for m in models]}
    trunk = models[0].trunk
    if concat and len(models) > 1:
        from pirl.evaluate.ensemble import TrunkEnsemble

        trunk, names = TrunkEnsemble([m.trunk for m in models]), ["+".join(names)]

    if protocol == "invariance":
        from pirl.evaluate.invariance import run_invariance

        r = run_invariance(models, val, views, settings, out_png=out / args.png, seed=args.seed)
        rows = []
        for name, m in r["models"].items():
            heads = m["heads"]
            rows.append([name, m["trunk"]["mean"], m["trunk"]["std"],
                         heads["mean"] if heads else "-", heads["std"] if heads else "-"])
        table = markdown_table(["checkpoint", "res5 mean", "res5 std", "f-g mean", "f-g std"],
                               rows)
    else:
        assert train is not None
        r, table = _frozen_or_finetune(args, trunk, names[0], train, val, views, settings, out)

    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return 0  # a torchrun job (streaming probe): rank 0 reports for all
    path = _write_json(out, protocol, {**r, "meta": meta})
    print(table)
    print(f"\nwrote {path}" + (f" and {r['png']}" if r.get("png") else ""))
    return 0


def _frozen_or_finetune(args: argparse.Namespace, trunk: torch.nn.Module, name: str,
                        train: ImageSource, val: ImageSource, views: C.ViewConfig,
                        settings: EvalSettings, out: Path) -> tuple[dict[str, Any], str]:
    """Run one of the protocols that need a training split: (result, markdown table)."""
    protocol = args.protocol
    if protocol == "knn":
        from pirl.evaluate.knn import run_knn

        r = run_knn(trunk, train, val, views, settings, k=args.k, tau=args.tau, stage=args.stage)
        table = markdown_table(["checkpoint", "stage", "k", "top-1", "top-5"],
                               [[name, r["stage"], r["k"], r["top1"], r["top5"]]])
    elif protocol == "linear":
        from pirl.evaluate.linear import details_table, layer_table

        r = _linear(args, trunk, train, val, views, settings, out)
        table = details_table(r)
        if len(r["layers"]) > 1:
            table = layer_table(r, name) + "\n\n" + table
    elif protocol == "svm":
        r, table = run_svm_cli(args, trunk, name, train, val, views, settings,
                               _parse_floats(args.costs, "--costs"))
    elif protocol == "finetune":
        from pirl.evaluate.finetune import read_subset_list, run_finetune

        subset = read_subset_list(args.subset_list, train) if args.subset_list else None
        r = run_finetune(trunk, train, val, views, settings, fraction=args.fraction,
                         subset=subset, epochs=args.epochs, lr=args.lr, momentum=args.momentum,
                         weight_decay=args.weight_decay, batch_size=args.ft_batch_size,
                         seed=args.seed)
        table = markdown_table(["checkpoint", "labels", "images", "top-1", "top-5"],
                               [[name, args.subset_list or f"{100 * r['fraction']:g}%",
                                 r["subset_size"],
                                 r["top1"], r["top5"]]])
    else:  # neighbors
        from pirl.evaluate.neighbors import run_neighbors

        r = run_neighbors(trunk, train, val, views, settings, out_png=out / args.png,
                          num_queries=args.queries, k=args.k, seed=args.seed, stage=args.stage)
        table = markdown_table(["checkpoint", "stage", "k", "precision@k"],
                               [[name, r["stage"], r["k"], r["precision_at_k"]]])
    return r, table


def _linear(args: argparse.Namespace, trunk: torch.nn.Module, train: ImageSource,
            val: ImageSource, views: C.ViewConfig, settings: EvalSettings,
            out: Path) -> dict[str, Any]:
    """The linear protocol, cached or streaming (see :mod:`pirl.evaluate.linear_mode`)."""
    from pirl.evaluate import linear_mode
    from pirl.evaluate.linear import run_linear

    stages = parse_layers(args.layers)
    common = {"stages": stages, "epochs": args.epochs, "lr": args.lr,
              "momentum": args.momentum, "weight_decay": args.weight_decay,
              "batch_size": args.probe_batch_size, "seed": args.seed,
              "standardize": not args.no_standardize}
    copies = min(args.aug_copies, args.epochs)
    mode, why = linear_mode.decide(trunk, stages, views.image_size, len(train), len(val), copies,
                                   settings.cache_dir is not None, args.stream,
                                   args.memory_budget)
    print(f"pirl eval linear: {mode} mode ({why})", file=sys.stderr)
    if mode == "cached":
        r = run_linear(trunk, train, val, views, settings, aug_copies=args.aug_copies, **common)
    else:
        import os

        from pirl.evaluate.linear_stream import run_linear_stream

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: one rank per device
            from pirl.distributed import setup_distributed

            settings.device = setup_distributed(args.device).device
        r = run_linear_stream(trunk, train, val, views, settings, out=out,
                              stat_images=args.stat_images, **common)
    return {**r, "mode": mode, "mode_reason": why}
