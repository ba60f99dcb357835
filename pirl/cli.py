"""The ``pirl`` command: thin argument parsing that hands over to the package's functions.

Exit codes: 0 success, 1 a failure during work (a non-finite loss, an unreadable image under
``--strict-data``), 2 bad input (config, command line, data path, empty dataset, checkpoint of
another run or one that would run code) detected before any heavy work.  These errors are one
line on stderr, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pirl import config as C
from pirl.presets import PRESETS

log = logging.getLogger("pirl")


def _add_config_args(p: argparse.ArgumentParser, default_preset: str) -> None:
    p.add_argument("--preset", default=default_preset, choices=PRESETS,
                   help=f"recipe to start from (default: {default_preset})")
    p.add_argument("--config", metavar="FILE", help="YAML file of overrides (after the preset)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. base_lr=0.06 or objective.tau=0.1 (applied last)")


def resolve_config(args: argparse.Namespace) -> C.Config:
    """Preset -> config file -> flags -> key=value overrides.  Every value set after the preset
    is recorded as explicit in the config (see :func:`pirl.methods.fit_to_dataset`)."""
    cfg = C.from_preset(args.preset)
    if getattr(args, "config", None):
        C.apply_mapping(cfg, C.load_yaml(args.config), source=args.config)
    for flag, key in (("epochs", "optim.epochs"), ("batch_size", "optim.batch_size"),
                      ("method", "objective.method"), ("workers", "train.workers")):
        value = getattr(args, flag, None)
        if value is not None:
            C.set_value(cfg, key, value)
    if getattr(args, "quiet", False):
        cfg.train.quiet = True
    if getattr(args, "strict_data", False):
        cfg.train.strict_data = True
    C.apply_overrides(cfg, getattr(args, "overrides", None) or [])
    C.validate(cfg)
    return cfg


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from pirl.train import pretrain

    cfg = resolve_config(args)
    out = Path(args.out) if args.out else Path("runs") / args.preset
    result = pretrain(cfg, args.data, out, val_data=args.val_data, device=args.device)
    from pirl.distributed import cleanup_distributed

    if int(os.environ.get("RANK", "0")) == 0:  # torchrun: one line, not one per process
        print(result.summary())
    cleanup_distributed()
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pirl.demo import run_demo

    return run_demo(Path(args.out), device=args.device, epochs=args.epochs, quiet=args.quiet,
                    overrides=args.overrides)


def _cmd_show_views(args: argparse.Namespace) -> int:
    from pirl.data import open_source
    from pirl.plots import show_views

    cfg = resolve_config(args)
    show_views(open_source(args.data), cfg, args.out, n=args.n, seed=args.seed)
    print(f"wrote {args.out}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    print(C.help_table(cfg))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pirl.export import export_trunk, load_backbone

    trunk = load_backbone(args.checkpoint, arch=args.arch)
    export_trunk(trunk, args.format, Path(args.out))
    print(f"wrote {args.out} ({args.format} layout)")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from pirl.data import check_source

    bad = check_source(args.path, min_size=args.min_size)
    for name, reason in bad:
        print(f"{name}: {reason}")
    print(f"{len(bad)} bad file(s) in {args.path}")
    return 1 if bad else 0


def _cmd_data_shard(args: argparse.Namespace) -> int:
    from pirl.data.shard_write import write_shards

    manifest = write_shards(args.src, args.out, args.shard_size, prefix=args.prefix,
                            seed=args.seed)
    from pirl.data.shards import read_manifest

    m = read_manifest(manifest)
    last = m["shards"][-1]["name"].rsplit("-", 1)[-1].removesuffix(".tar")
    print(f"{m['total']} images in {len(m['shards'])} shard(s); manifest {manifest}")
    print(f"train with --data '{Path(args.out) / args.prefix}-{{000000..{last}}}.tar'")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full ``pirl`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="pirl", description="Pretext-Invariant Representation Learning (PIRL) in PyTorch.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="pretrain on the built-in synthetic dataset and compare kNN "
                       "accuracy with random init (offline, a few minutes on a laptop CPU)")
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--epochs", type=int, default=None, help="override the demo's epochs")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if any)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides on top of the demo preset (see `pirl config --preset "
                   "demo`)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("pretrain", help="pretrain a trunk without labels")
    p.add_argument("--data", required=True,
                   help="training images: ImageFolder folder, ImageFolder .tar, "
                   "[ROOT::]list.txt ('relative/path label' lines), [ROOT::]split.json "
                   "(iNaturalist), shards 'DIR/train-{000000..000099}.tar' (`pirl data shard`), "
                   "or 'synthetic'")
    p.add_argument("--val-data", default=None, help="labelled images for the kNN monitor")
    p.add_argument("--out", default=None, help="run folder (default: runs/<preset>); rerunning "
                   "with the same folder resumes from its checkpoint")
    p.add_argument("--epochs", type=int, default=None, help="override optim.epochs")
    p.add_argument("--batch-size", type=int, default=None,
                   help="override optim.batch_size (global, all processes together)")
    p.add_argument("--method", default=None, choices=C.METHODS, help="override objective.method")
    p.add_argument("--workers", type=int, default=None, help="override train.workers")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if any)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--strict-data", action="store_true",
                   help="stop on the first unreadable image instead of skipping it")
    _add_config_args(p, "imagenet-r50")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("show-views", help="draw images with their image view and jigsaw patches")
    p.add_argument("--data", required=True,
                   help="folder, .tar archive, [ROOT::]list.txt / .json, or 'synthetic'")
    p.add_argument("--out", default="views.png", help="PNG to write")
    p.add_argument("-n", type=int, default=4, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    _add_config_args(p, "imagenette96-r18")
    p.set_defaults(func=_cmd_show_views)

    p = sub.add_parser("config", help="print the resolved config with each field's help")
    _add_config_args(p, "imagenet-r50")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("export", help="export a trunk for torchvision or Detectron2")
    p.add_argument("--checkpoint", required=True, help="pirl checkpoint, trunk.pt or VISSL file")
    p.add_argument("--format", default="torchvision", choices=("torchvision", "detectron2"))
    p.add_argument("--arch", default=None, help="architecture when it cannot be inferred")
    p.add_argument("--out", required=True, help="file to write")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = dsub.add_parser("check", help="list every unreadable, truncated or too small image")
    q.add_argument("path", help="ImageFolder folder or .tar archive, or [ROOT::]list.txt / .json")
    q.add_argument("--min-size", type=int, default=1, help="smallest acceptable side, px")
    q.set_defaults(func=_cmd_data_check)
    q = dsub.add_parser("shard", help="write an image source as WebDataset shards + manifest")
    q.add_argument("src", help="ImageFolder folder or .tar archive, or [ROOT::]list.txt / .json")
    q.add_argument("out", help="folder to write PREFIX-000000.tar ... and PREFIX-manifest.json")
    q.add_argument("--shard-size", type=int, required=True, help="samples per shard")
    q.add_argument("--prefix", default="train", help="shard name prefix (default: train)")
    q.add_argument("--seed", type=int, default=0, help="seed of the one-off shuffle before "
                   "writing (every shard mixes the classes)")
    q.set_defaults(func=_cmd_data_shard)

    from pirl.bench import add_bench_parser
    from pirl.evaluate.cli import add_eval_parser
    from pirl.plots import add_plot_parser
    from pirl.sweep.cli import add_sweep_parser

    add_eval_parser(sub)
    add_bench_parser(sub)
    add_plot_parser(sub)
    add_sweep_parser(sub)
    return parser


def _worker_message(e: BaseException) -> str:
    """The original message of an exception re-raised from a DataLoader worker.

    torch re-raises a worker's exception as the same type whose message is the whole worker
    traceback ("Caught X in DataLoader worker process 0. Original Traceback ... X: message");
    the last line is the message the user needs."""
    text = str(e).strip()
    if "Original Traceback" not in text:
        return text
    last = text.splitlines()[-1]
    name = f"{type(e).__module__}.{type(e).__qualname__}: "
    return last[len(name):] if last.startswith(name) else last


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pirl`` console script and ``python -m pirl``."""
    from pirl.checkpoint import CheckpointError
    from pirl.console import setup_logging
    from pirl.data.source import DatasetError, UnreadableDataError

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(quiet=False, rank=int(os.environ.get("RANK", "0")))  # set by torchrun
    if args.verbose:
        logging.getLogger("pirl").setLevel(logging.DEBUG)
    try:
        return int(args.func(args) or 0)
    except (C.ConfigError, CheckpointError, DatasetError, FileNotFoundError) as e:
        print(f"pirl: error: {e}", file=sys.stderr)
        return 2
    except UnreadableDataError as e:
        print(f"pirl: error: {_worker_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pirl: interrupted; rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    except RuntimeError as e:
        from pirl.distributed import ReplicaDriftError
        from pirl.train import NonFiniteLossError

        if isinstance(e, (NonFiniteLossError, ReplicaDriftError)):
            print(f"pirl: error: {e}", file=sys.stderr)
            return 1
        raise
