"""Every evaluation protocol on one pretrained checkpoint and on the same trunk at random init.

Runs ``pirl eval knn | linear --layers all | svm | finetune | neighbors`` for the checkpoint and
for ``--checkpoint random`` (same architecture and stem), then ``pirl eval invariance`` with both
overlaid in one histogram, exactly as a user would type them (one subprocess per command, so the
CLI is what is measured).  Prints one markdown table and writes ``<out>/protocols.json``; each
protocol's own JSON / PNG stays in ``<out>/<which>-<protocol>/``.

    python benchmarks/protocols.py --checkpoint .cache/quality/runs/pirl/checkpoint.pt \\
        --train-data .cache/quality/data/imagenette-96-train-200pc.tar \\
        --val-data $PIRL_DATA/imagenette-96/val.tar --preset imagenette-small

``--train-data`` / ``--val-data`` default to ``imagenette-96/train.tar`` / ``val.tar`` under
``--data-root`` (default: the environment variable ``PIRL_DATA``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pirl.bench import add_data_root_argument, data_root

# protocol -> (extra arguments, JSON file, [(row label, key path in the JSON)])
PROTOCOLS: dict[str, tuple[list[str], str, list[tuple[str, tuple[str, ...]]]]] = {
    "knn": ([], "knn.json", [("kNN top-1 (res5)", ("top1",))]),
    "linear": (["--layers", "all"], "linear.json",
               [(f"linear top-1 ({s})", ("layers", s, "top1"))
                for s in ("conv1", "res2", "res3", "res4", "res5")]),
    "svm": ([], "svm.json", [("SVM mAP (res5)", ("mAP",)), ("SVM top-1 (res5)", ("top1",))]),
    "finetune": (["--fraction", "0.1"], "finetune.json",
                 [("fine-tune 10% labels, top-1", ("top1",))]),
    "neighbors": ([], "neighbors.json", [("neighbours precision@5 (res5)", ("precision_at_5",))]),
}


def _dig(d: Any, path: tuple[str, ...]) -> float:
    for k in path:
        d = d[k]
    return float(d)


def _eval(args: list[str]) -> float:
    """Run ``pirl eval ...``; returns its wall time, failing loudly with its output."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pirl", "eval", *args], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"pirl eval {' '.join(args)} failed ({proc.returncode}):\n"
                         f"{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="the pretrained checkpoint")
    ap.add_argument("--arch", default="resnet18", help="architecture of the random-init trunk")
    ap.add_argument("--small-stem", action="store_true", help="random-init trunk: small stem")
    add_data_root_argument(ap, "imagenette-96/train.tar and val.tar")
    ap.add_argument("--train-data", default=None,
                    help="ImageFolder folder or .tar (default: DATA_ROOT/imagenette-96/train.tar)")
    ap.add_argument("--val-data", default=None,
                    help="ImageFolder folder or .tar (default: DATA_ROOT/imagenette-96/val.tar)")
    ap.add_argument("--preset", default="imagenette-small", help="views (image size) preset")
    ap.add_argument("--workers", default="1")
    ap.add_argument("--out", default=".cache/protocols")
    args = ap.parse_args(argv)
    if args.train_data is None or args.val_data is None:
        root = data_root(args.data_root, "protocols.py") / "imagenette-96"
        args.train_data = args.train_data or str(root / "train.tar")
        args.val_data = args.val_data or str(root / "val.tar")
    out = Path(args.out)
    common = ["--train-data", args.train_data, "--val-data", args.val_data, "--preset",
              args.preset, "--quiet", "--workers", args.workers]
    random = ["--checkpoint", "random", "--arch", args.arch,
              "--small-stem" if args.small_stem else "--no-small-stem"]
    which = {"pretrained": ["--checkpoint", args.checkpoint], "random init": random}
    rows: dict[str, dict[str, float]] = {}
    walls: dict[str, float] = {}
    for name, ck in which.items():
        for proto, (extra, fname, keys) in PROTOCOLS.items():
            folder = out / f"{name.replace(' ', '-')}-{proto}"
            walls[f"{name} {proto}"] = _eval([proto, *ck, *common, *extra, "--out", str(folder)])
            result = json.loads((folder / fname).read_text())
            for label, path in keys:
                rows.setdefault(label, {})[name] = _dig(result, path)
            print(f"done: {name} {proto}", flush=True)
    inv = out / "invariance"
    walls["invariance"] = _eval(["invariance", "--checkpoint", args.checkpoint, *random,
                                 "--val-data", args.val_data, "--preset", args.preset, "--quiet",
                                 "--workers", args.workers, "--out", str(inv)])
    models = json.loads((inv / "invariance.json").read_text())["models"]
    for (name, m) in zip(which, models.values(), strict=True):
        rows.setdefault("invariance: res5 distance image vs patches (mean)", {})[name] = (
            float(m["trunk"]["mean"]))
    print(f"\nEvery protocol: {args.checkpoint} vs random init ({args.arch}); train "
          f"{args.train_data}, val {args.val_data}, views of preset {args.preset}\n")
    print("| protocol | pretrained | random init | difference |\n|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['pretrained']:.2f} | {r['random init']:.2f} | "
              f"{r['pretrained'] - r['random init']:+.2f} |")
    print(f"\nwall time {sum(walls.values()) / 60:.1f} min; invariance histogram: "
          f"{inv / 'invariance.png'}; neighbours: {out / 'pretrained-neighbors'}")
    (out / "protocols.json").write_text(json.dumps({"rows": rows, "wall_s": walls,
                                                    "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
