"""Benchmark: which recipe makes ``pirl demo`` learn?  Runs ``pirl demo`` variants side by side.

Each variant is the ``demo`` preset as it stood when the search ran (``SEARCH_BASE``) plus a few
``key=value`` overrides, trained on the built-in synthetic dataset *as it was then* (style ``v1``
of ``benchmarks/demo_search.py``: smaller shapes, no luminance gap; the dataset has changed
since, see docs/demo.md) and scored, like the demo itself, by kNN top-1 on the held-out split
against the same trunk at random initialisation.  Variants run as independent processes
(``demo_search.py --job``), ``--parallel`` at a time (one torch thread each), so the search is
cheap on a many-core or GPU machine; quality does not depend on the device beyond float
rounding (``amp`` and ``channels_last`` are switched off so a GPU computes in fp32 like the CPU).

    python benchmarks/demo_recipe.py [--parallel 2] [--device cpu] [--only NAME ...]

Prints a markdown table (variant, overrides, epochs, steps, kNN top-1 pretrained / random, gain)
and writes ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_search import run_demo_process  # noqa: E402  (a sibling script, not a package)

# The base every variant starts from: the `demo` preset as it stood when this search ran (8
# epochs, crops down to 0.2 of the image, hue jitter 0.05) with BatchNorm statistics from both
# passes (the behaviour then), so the tables in docs/demo.md come out of this script unchanged
# whatever the preset has become since.  A variant's own overrides come after and win.
SEARCH_BASE = ["image_scale_min=0.2", "hue=0.05", "bn_stats=all", "brightness=0.2", "contrast=0.2",
               "saturation=0.2", "grayscale_prob=0"]
SEARCH_STYLE = "v1"  # the synthetic dataset of the time (demo_search.STYLES)
SEARCH_EPOCHS = 8  # passed as --epochs (an epochs= override would beat a variant's --epochs)

STRONG_COLOUR = ["brightness=0.4", "contrast=0.4", "saturation=0.4", "hue=0.5",
                 "grayscale_prob=0.2"]

# name -> (epochs or None for the base's 8, overrides on top of SEARCH_BASE)
VARIANTS: dict[str, tuple[int | None, list[str]]] = {
    "preset": (None, []),  # the base alone: the demo preset of the time
    "20ep": (20, []),
    "20ep lr x4": (20, ["base_lr=0.12"]),
    "20ep lr x16": (20, ["base_lr=0.48"]),
    "20ep tau 0.2": (20, ["tau=0.2"]),
    "20ep strong colour": (20, STRONG_COLOUR),
    "20ep strong colour lr x4": (20, [*STRONG_COLOUR, "base_lr=0.12"]),
    "20ep strong colour lr x16": (20, [*STRONG_COLOUR, "base_lr=0.48"]),
    "20ep strong colour lr x4 tau 0.2": (20, [*STRONG_COLOUR, "base_lr=0.12", "tau=0.2"]),
    "20ep rotation pretext": (20, ["pretext=rotation"]),
    "20ep rotation strong colour lr x4": (20, ["pretext=rotation", *STRONG_COLOUR,
                                               "base_lr=0.12"]),
    "20ep infonce": (20, ["loss=infonce"]),
    "20ep all negatives": (20, ["num_negatives=1999"]),
    "20ep crop >= 0.5": (20, ["image_scale_min=0.5"]),
    "20ep batch 64 lr x4": (20, ["batch_size=64", "base_lr=0.12"]),
    "20ep npid (lambda 0)": (20, ["lam=0"]),
    # round 2: around the two winners of round 1 (milder crops, rotation pretext), with seeds
    "20ep crop >= 0.5 seed 1": (20, ["image_scale_min=0.5", "seed=1"]),
    "20ep crop >= 0.5 seed 2": (20, ["image_scale_min=0.5", "seed=2"]),
    "20ep crop >= 0.7": (20, ["image_scale_min=0.7"]),
    "20ep crop >= 0.35": (20, ["image_scale_min=0.35"]),
    "16ep crop >= 0.5": (16, ["image_scale_min=0.5"]),
    "20ep crop >= 0.5 lr x0.5": (20, ["image_scale_min=0.5", "base_lr=0.015"]),
    "20ep lr x0.5": (20, ["base_lr=0.015"]),
    "20ep crop >= 0.5 all negatives": (20, ["image_scale_min=0.5", "num_negatives=1999"]),
    "20ep crop >= 0.5 jigsaw crop >= 0.8": (20, ["image_scale_min=0.5", "jigsaw_scale_min=0.8"]),
    "20ep crop >= 0.5 no hue": (20, ["image_scale_min=0.5", "hue=0"]),
    "20ep crop >= 0.5 batch 16": (20, ["image_scale_min=0.5", "batch_size=16"]),
    "20ep crop >= 0.5 jigsaw+rotation": (20, ["image_scale_min=0.5", "pretext=jigsaw+rotation"]),
    "20ep rotation crop >= 0.5": (20, ["pretext=rotation", "image_scale_min=0.5"]),
    "20ep rotation seed 1": (20, ["pretext=rotation", "seed=1"]),
    "20ep rotation crop >= 0.5 seed 1": (20, ["pretext=rotation", "image_scale_min=0.5",
                                              "seed=1"]),
    "20ep seed 1": (20, ["seed=1"]),
}
ROUND1 = list(VARIANTS)[:16]


def run_variant(name: str, epochs: int | None, overrides: list[str], out: Path, device: str,
                ) -> dict[str, object]:
    """One ``pirl demo`` process on the search's base; returns its row (demo.json summary plus
    wall time and status)."""
    run_dir = out / name.replace(" ", "_").replace(">=", "ge").replace("(", "").replace(")", "")
    row: dict[str, object] = {"name": name, "overrides": overrides}
    row.update(run_demo_process(SEARCH_STYLE, run_dir,
                                SEARCH_EPOCHS if epochs is None else epochs, device,
                                [*SEARCH_BASE, *overrides]))
    print(f"done: {name} ({float(str(row['wall_s'])):.0f} s, rc {row['returncode']}): "
          f"{row.get('pirl', '-')} vs {row.get('random', '-')}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".cache/demo_recipe", help="folder for runs and results")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parallel", type=int, default=1, help="variants run at once")
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run")
    ap.add_argument("--round", type=int, choices=(1, 2), default=None,
                    help="only the variants of search round 1 or 2")
    ap.add_argument("--epochs", type=int, default=None, help="override every variant's epochs "
                    "(a quick smoke run)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(VARIANTS)
    if args.round:
        names = [n for n in names if (n in ROUND1) == (args.round == 1)]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(
            lambda n: run_variant(n, args.epochs or VARIANTS[n][0], VARIANTS[n][1], out,
                                  args.device), names))
    print(f"\n`pirl demo` variants on the synthetic dataset ({args.device}, {args.parallel} at "
          "once); kNN top-1 % on the held-out split (k = 20)\n")
    print("| variant | overrides | epochs | steps | train min | PIRL | random | gain |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "gain" in r:
            print(f"| {r['name']} | {' '.join(r['overrides']) or '-'} | {r['epochs']} | "
                  f"{r['steps']} | {float(r['train_s']) / 60:.1f} | {float(r['pirl']):.1f} | "
                  f"{float(r['random']):.1f} | {float(r['gain']):+.1f} |")
        else:
            print(f"| {r['name']} | {' '.join(r['overrides'])} | failed: {r.get('error')} |")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    return 0 if all("gain" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
