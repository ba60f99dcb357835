"""``pirl bench``: run the speed benchmarks and print their markdown tables.

The benchmarks are scripts in the repository's ``benchmarks/`` folder (they are not part of the
installed package); this command finds that folder next to the package and runs them, passing
the remaining arguments on:

    pirl bench views [--rounds 15 --per-round 40]       # jigsaw + image views per image
    pirl bench loss [--quick]                            # memory-bank loss at ImageNet scale
    pirl bench train-step [--data PATH.tar --workers 2]  # samples/s of a full training step
    pirl bench all                                       # the three with their defaults

``pirl bench NAME --help`` lists a benchmark's own options.  docs/performance.md has the tables
and the exact commands that produced them.

Benchmarks that read real images find them under one data folder: ``--data-root DIR``, or the
environment variable ``PIRL_DATA`` (the folder holding e.g. ``imagenette-96/train.tar``; the
README's "Data" section says how to make it).  :func:`add_data_root_argument` and
:func:`data_root` are that plumbing, shared by the scripts.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

# name on the command line -> script in benchmarks/
BENCHMARKS = {"views": "views", "loss": "loss_bank", "train-step": "train_step"}

# The environment variable naming the folder that holds the datasets (imagenette-96/train.tar ...).
DATA_ENV = "PIRL_DATA"


def add_data_root_argument(ap: argparse.ArgumentParser, what: str) -> None:
    """``--data-root DIR``, defaulting to ``$PIRL_DATA`` (None when the variable is unset or
    empty); ``what`` says what the script reads from it (for the help text)."""
    ap.add_argument("--data-root", default=os.environ.get(DATA_ENV) or None, metavar="DIR",
                    help=f"folder holding {what} (default: ${DATA_ENV})")


def data_root(value: str | None, script: str) -> Path:
    """The data folder given by ``--data-root`` / ``$PIRL_DATA``, or exit with one line saying how
    to set it."""
    if not value:
        raise SystemExit(f"{script}: no data folder: set {DATA_ENV} to the folder holding "
                         f"imagenette-96/train.tar and val.tar (export {DATA_ENV}=/path/to/data) "
                         "or pass --data-root DIR")
    return Path(value)


class BenchmarkNotFoundError(FileNotFoundError):
    """The benchmarks/ folder (or one script in it) is not next to the package."""


def benchmarks_dir() -> Path:
    """The repository's ``benchmarks/`` folder (next to the ``pirl`` package)."""
    return Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<script>.py`` for the command-line ``name`` (see BENCHMARKS)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    path = benchmarks_dir() / f"{BENCHMARKS[name]}.py"
    if not path.is_file():
        raise BenchmarkNotFoundError(
            f"{path}: benchmark script not found; `pirl bench` runs the scripts of a source "
            "checkout (git clone the repository and install it with pip install -e .)")
    module_name = f"pirl_benchmark_{BENCHMARKS[name]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def run_benchmark(name: str, argv: list[str]) -> int:
    """Run one benchmark's ``main(argv)``; returns its exit status (0 when it returns None)."""
    status: Any = load_benchmark(name).main(argv)
    return int(status or 0)


def _cmd_bench(args: argparse.Namespace) -> int:
    rest = [a for a in args.args if a != "--"]
    if args.benchmark == "all":
        if rest:
            raise SystemExit("pirl bench all: takes no options (run the benchmarks one by one to "
                             "pass options)")
        status = 0
        for name in BENCHMARKS:
            print(f"\n## {name}\n", flush=True)
            status = max(status, run_benchmark(name, []))
        return status
    return run_benchmark(args.benchmark, rest)


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``pirl bench`` to the ``pirl`` command's subparsers (``build_parser`` calls it)."""
    p = subparsers.add_parser(
        "bench", help="run the speed benchmarks (views, loss, train-step) and print their tables",
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("benchmark", choices=[*BENCHMARKS, "all"],
                   help="which benchmark; options after it go to the benchmark itself")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="...",
                   help="the benchmark's own options (see pirl bench NAME --help)")
    p.set_defaults(func=_cmd_bench)
    return p
