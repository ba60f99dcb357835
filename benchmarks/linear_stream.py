"""Cached vs streaming linear probe: top-1 per layer and peak memory of each.

Cuts a class-balanced training subset out of an Imagenette-96 ``train.tar`` (default 200 images
per class = 2,000), then runs ``pirl eval linear`` twice on the same trunk (``--checkpoint
random`` unless one is given), exactly as a user would: once cached (``--no-cache``, so every
augmented copy stays in memory) and once with ``--stream``.  ``--aug-copies`` equals
``--epochs``, so both modes train on the same augmented images.  Peak RSS is each subprocess's
own high-water mark (``os.wait4``).  Prints a markdown table and writes
``<out>/linear_stream.json``.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/linear_stream.py \\
        --train-tar $PIRL_DATA/imagenette-96/train.tar \\
        --val-data $PIRL_DATA/imagenette-96/val.tar
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pirl.data import open_source
from pirl.data.subset import write_subset


def run(args: list[str]) -> int:
    """``pirl eval linear ARGS`` in a subprocess; returns its peak RSS in kB."""
    proc = subprocess.Popen([sys.executable, "-m", "pirl", "eval", "linear", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait4, not communicate: it reports this child's own rusage (ru_maxrss, kB on Linux).
    # The outputs are small (a table, a mode line), so the pipes cannot fill up first.
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read() if proc.stdout else "", proc.stderr.read() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"pirl eval linear {' '.join(args)} failed:\n{out}\n{err}")
    print(err.strip().splitlines()[0] if err.strip() else "", flush=True)
    return int(usage.ru_maxrss)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-tar", required=True, help="Imagenette-96 train.tar")
    ap.add_argument("--val-data", required=True, help="Imagenette-96 val.tar")
    ap.add_argument("--per-class", type=int, default=200, help="training images per class")
    ap.add_argument("--checkpoint", default="random")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--image-size", default="32")
    ap.add_argument("--layers", default="res3,res4,res5")
    ap.add_argument("--epochs", default="6")
    ap.add_argument("--workers", default="1")
    ap.add_argument("--out", default=".cache/linear_stream")
    args = ap.parse_args(argv)
    out = Path(args.out)
    train = write_subset(open_source(args.train_tar), args.per_class,
                         out / f"train-{args.per_class}pc.tar")
    common = ["--checkpoint", args.checkpoint, "--train-data", str(train), "--val-data",
              args.val_data, "--image-size", args.image_size, "--layers", args.layers,
              "--epochs", args.epochs, "--aug-copies", args.epochs, "--workers", args.workers,
              "--quiet", "--no-cache", "--device", "cpu"]
    if args.checkpoint == "random":
        common += ["--arch", args.arch]
    results: dict[str, dict[str, Any]] = {}
    for mode, extra in (("cached", []), ("stream", ["--stream"])):
        folder = out / mode
        rss_kb = run([*common, *extra, "--out", str(folder)])
        r = json.loads((folder / "linear.json").read_text())
        results[mode] = {"peak_rss_mb": rss_kb / 1024, "mode": r["mode"],
                         "top1": {s: v["top1"] for s, v in r["layers"].items()},
                         "num_train": r["num_train"], "num_val": r["num_val"]}
    layers = list(results["cached"]["top1"])
    lines = ["| mode | " + " | ".join(f"{s} top-1" for s in layers) + " | peak RSS (MB) |",
             "|" + "---|" * (len(layers) + 2)]
    for mode, r in results.items():
        lines.append(f"| {mode} | " + " | ".join(f"{r['top1'][s]:.2f}" for s in layers)
                     + f" | {r['peak_rss_mb']:.0f} |")
    table = "\n".join(lines)
    print(f"\n{results['cached']['num_train']} training / {results['cached']['num_val']} val "
          f"images, {args.image_size} px, {args.epochs} epochs, {args.checkpoint} {args.arch}\n")
    print(table)
    (out / "linear_stream.json").write_text(json.dumps({"args": vars(args), "results": results,
                                                        "table": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
