"""``pirl sweep``: a grid over one or two config keys and several seeds, evaluated and plotted.

    pirl sweep fig6-lambda --seeds 0,1,2                 # a preset ($PIRL_DATA/imagenette-96)
    pirl sweep --vary objective.tau=0.05,0.1,0.2 --seeds 0,1
    pirl sweep fig8-negatives --values 64,256,1024,1999 --epochs 6
    pirl sweep fig6-lambda --gpus all --subset 0 --epochs 100 --set image_size=96
    pirl sweep fig6-lambda --dry-run                     # list the cells and their overrides
    pirl sweep --summary-only --out runs/sweeps/fig6-lambda

Rerunning the same command resumes: finished cells are skipped, a half-trained one resumes from
its checkpoint.  The summary (summary.md, summary.png) is rewritten from the cells' result.json
after every run, also after a stopped one.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from pirl.bench import DATA_ENV, add_data_root_argument
from pirl.errors import ConfigError
from pirl.evaluate.standard import TrunkEval
from pirl.presets import PRESETS
from pirl.sweep.compare import append_baseline
from pirl.sweep.spec import (
    SWEEPS,
    Scale,
    Series,
    SweepSpec,
    Value,
    cell_config,
    custom_spec,
    parse_list,
    parse_seeds,
    plan_cells,
    with_values,
)

DATASET = "imagenette-96"  # under --data-root / $PIRL_DATA, as the quality benchmark
SPEC_FILE = "sweep.json"

log = logging.getLogger("pirl.sweep")


def add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``pirl sweep`` on the ``pirl`` command's subparsers."""
    p = subparsers.add_parser("sweep", help="a grid over one or two config keys and several "
                              "seeds: pretrain, evaluate (kNN + linear), table and plot")
    p.add_argument("sweep", nargs="?", choices=sorted(SWEEPS), metavar="SWEEP",
                   help=f"a preset sweep, one of {sorted(SWEEPS)}; or give --vary")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=v1,v2",
                   help="a swept key and its values (once or twice: the second key's values "
                   "become separate lines)")
    p.add_argument("--values", default=None, metavar="v1,v2",
                   help="replace a preset's values of the swept key (of every series)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument("--preset", default=None, choices=PRESETS,
                   help="config preset every cell starts from (default: the sweep's, "
                   "imagenette-small)")
    p.add_argument("--set", action="append", default=[], metavar="key=value",
                   help="config override for every cell (repeatable; the swept keys win)")
    p.add_argument("--epochs", type=int, default=None, help="pretraining epochs per cell")
    p.add_argument("--batch-size", type=int, default=None, help="override optim.batch_size")
    p.add_argument("--subset", type=int, default=200,
                   help="training images per class (0 = the whole split; default: 200, the "
                   "quality benchmark's scale)")
    p.add_argument("--val-subset", type=int, default=0, help="val images per class (0 = all)")
    add_data_root_argument(p, f"{DATASET}/train.tar and val.tar")
    p.add_argument("--train-data", default=None, help="labelled training images (default: "
                   f"DATA_ROOT/{DATASET}/train.tar)")
    p.add_argument("--val-data", default=None, help="labelled evaluation images (default: "
                   f"DATA_ROOT/{DATASET}/val.tar)")
    TrunkEval.add_arguments(p)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per cell")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default=None,
                   help="cpu or cuda[:i]: every cell on it in turn (default: a GPU if any)")
    p.add_argument("--gpus", default=None, metavar="all|0,1",
                   help="spread the cells over these GPUs, one worker process each")
    p.add_argument("--out", default=None, help="sweep folder (default: runs/sweeps/<name>)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    p.add_argument("--summary-only", action="store_true",
                   help="rewrite summary.md / summary.png from the cells' results in --out")
    p.add_argument("--baseline", default=None, metavar="VALUE",
                   help="also compare every value with this one of the swept key, paired by "
                   "seed (mean and per-seed differences, paired t-test p), e.g. 0 for Fig. 6")
    p.set_defaults(func=cmd_sweep)
    return p


def spec_from_args(args: argparse.Namespace) -> SweepSpec:
    """The sweep the command line asks for (a preset, or --vary)."""
    if args.sweep and args.vary:
        raise ConfigError("give a preset sweep or --vary, not both")
    if not args.sweep and not args.vary:
        raise ConfigError(f"pirl sweep: name a preset sweep ({', '.join(sorted(SWEEPS))}) or "
                          "give --vary KEY=v1,v2")
    spec = SWEEPS[args.sweep] if args.sweep else custom_spec(args.vary)
    if args.values:
        spec = with_values(spec, parse_list(args.values, "--values"))
    if args.preset:
        spec = replace(spec, preset=args.preset)
    return spec


def check_baseline(spec: SweepSpec, baseline: str | None) -> None:
    """Refuse a ``--baseline`` that is no value of the sweep, before anything runs."""
    labels = [v.label for s in spec.series for v in s.values]
    if baseline is not None and baseline not in labels:
        raise ConfigError(f"--baseline {baseline!r}: not a value of the sweep "
                          f"({', '.join(dict.fromkeys(labels))})")


def spec_from_dict(d: dict[str, Any]) -> SweepSpec:
    """Inverse of ``dataclasses.asdict`` on a :class:`SweepSpec` (what sweep.json holds)."""
    series = tuple(Series(s["label"], s["key"],
                          tuple(Value(v["label"], tuple(v["overrides"])) for v in s["values"]),
                          tuple(s["overrides"])) for s in d["series"])
    return SweepSpec(**{**d, "series": series, "overrides": tuple(d["overrides"])})


def _data_paths(args: argparse.Namespace, out: Path) -> tuple[str, str]:
    from pirl.data.subset import prepare_data

    if args.train_data is None or args.val_data is None:
        if not args.data_root:
            raise ConfigError(f"no data: pass --train-data and --val-data, or --data-root DIR "
                              f"(or set {DATA_ENV}) holding {DATASET}/train.tar and val.tar")
        root = Path(args.data_root) / DATASET
        args.train_data = args.train_data or str(root / "train.tar")
        args.val_data = args.val_data or str(root / "val.tar")
    for path in (args.train_data, args.val_data):
        if not path.startswith("synthetic") and not Path(path).exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
    try:
        return prepare_data(Path(args.train_data), Path(args.val_data), args.subset or None,
                            args.val_subset or None, out / "data")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _gpus(text: str | None) -> list[int] | None:
    if text is None:
        return None
    import torch

    if text == "all":
        n = torch.cuda.device_count()
        if n == 0:
            raise ConfigError("--gpus all: no GPU visible")
        return list(range(n))
    try:
        return [int(g) for g in parse_list(text, "--gpus")]
    except ValueError:
        raise ConfigError(f"--gpus {text!r}: expected all or GPU indices, e.g. 0,1") from None


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run (or resume, list, summarise) a sweep; see the module doc."""
    from pirl.sweep.report import write_summary

    # recorded in summary.md when run from the shell (not when main() is called with a list)
    argv = sys.argv[1:]
    command = "pirl " + shlex.join(argv) if argv[:1] == ["sweep"] else ""
    if args.summary_only:
        if not args.out:
            raise ConfigError("--summary-only needs --out, the sweep's folder")
        out = Path(args.out)
        if not (out / SPEC_FILE).is_file():
            raise FileNotFoundError(f"{out / SPEC_FILE}: not a sweep folder")
        try:
            saved = json.loads((out / SPEC_FILE).read_text())
            spec, seeds = spec_from_dict(saved["spec"]), tuple(saved["seeds"])
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{out / SPEC_FILE}: not a sweep record ({e!r})") from None
        check_baseline(spec, args.baseline)
        md, png, text = write_summary(spec, seeds, out, saved.get("command", ""))
        if args.baseline is not None:
            text += "\n\n" + append_baseline(spec, seeds, out, args.baseline)
        print(text + f"\n\nwrote {md} and {png}")
        return 0
    spec, seeds = spec_from_args(args), parse_seeds(args.seeds)
    check_baseline(spec, args.baseline)
    scale = Scale(tuple(args.set), args.epochs, args.batch_size, args.workers)
    out = Path(args.out) if args.out else Path("runs") / "sweeps" / spec.name
    cells = plan_cells(spec, seeds)
    for cell in cells:  # every key and value checked before anything is written
        cell_config(spec, cell, scale)
    if args.dry_run:
        for cell in cells:
            s = spec.series[cell.si]
            overrides = [*spec.overrides, *args.set, *s.overrides, *s.values[cell.vi].overrides]
            print(f"{out / cell.folder}: {' '.join(overrides)}")
        print(f"{len(cells)} cells")
        return 0
    protocol = TrunkEval.from_args(args)
    gpus = _gpus(args.gpus)
    from pirl.sweep.run import SweepData, check_cells, run_sweep

    train, val = _data_paths(args, out)
    data = SweepData(train, val)
    check_cells(spec, cells, scale, data)  # fitted to the data: before sweep.json is written
    out.mkdir(parents=True, exist_ok=True)
    (out / SPEC_FILE).write_text(json.dumps(
        {"spec": asdict(spec), "seeds": list(seeds), "scale": asdict(scale),
         "data": asdict(data), "protocol": asdict(protocol), "command": command}, indent=2))
    import torch

    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        outcome = run_sweep(spec, seeds, scale, data, out, protocol, device=device,
                            gpus=gpus, threads=args.threads)
    finally:  # also after a failure or Ctrl-C: the summary of what is finished
        md, png, text = write_summary(spec, seeds, out, command)
        if args.baseline is not None:
            text += "\n\n" + append_baseline(spec, seeds, out, args.baseline)
    print(text)
    print(f"\n{len(outcome.trained)} cell(s) trained, {len(outcome.skipped)} already finished; "
          f"wrote {md} and {png}")
    if outcome.stopped:
        print("stopped before the end: rerun the same command to resume", file=sys.stderr)
        return 130
    return 0
