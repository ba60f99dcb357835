"""Benchmark: which built-in dataset and recipe make ``pirl demo`` clearly beat random init on
every seed?  Runs ``pirl demo`` on variants of the synthetic dataset x recipes x seeds.

Each job is one process that swaps the synthetic dataset's nuisance ranges
(:class:`pirl.data.synthetic.Style`, see ``STYLES``) and then runs the demo (pretraining on the
2,000 training images, kNN top-1 on the 1,000 held-out ones for the pretrained trunk and for the
same trunk at random init).  Jobs run ``--parallel`` at a time with one torch thread each, so the
search is cheap on a many-core or GPU machine (``amp`` and ``channels_last`` are off so a GPU
computes in fp32 like the CPU; quality does not depend on the device beyond float rounding).

    python benchmarks/demo_search.py --stage A --device cuda --parallel 16   # ~3 min on an H200
    python benchmarks/demo_search.py --stage B --device cuda --parallel 16
    python benchmarks/demo_search.py --stage C --device cuda --parallel 16
    python benchmarks/demo_search.py --stage shipped --parallel 2            # the demo, 3 seeds

Prints one markdown row per (dataset, recipe, epochs) with each seed's pretrained / random kNN
top-1 and the gain, and appends every job's result to ``--out``/rows.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pirl.data.synthetic import Style

# Dataset variants.  "shipped" is the dataset `pirl demo` uses (the Style defaults); "v1" is the
# one it used before this search (smaller shapes, colour contrast without a luminance gap).
UPRIGHT = 0.3  # radians: "up" variants tilt the shape by at most ~17 degrees
CLEAN = {"backgrounds": (0,), "clutter": 0.0, "noise": 0.0}
STYLES: dict[str, Style] = {
    "shipped": Style(),
    "v1": Style(radius=(0.25, 0.42), min_luma_gap=0.0),
    "v1+luma": Style(radius=(0.25, 0.42)),
    "big-up": Style(max_rotation=UPRIGHT, min_luma_gap=0.0),
    "big-up+luma": Style(max_rotation=UPRIGHT),
    "clean-up": Style(radius=(0.32, 0.45), max_rotation=UPRIGHT, min_luma_gap=0.0, **CLEAN),
    "clean-up+luma": Style(max_rotation=UPRIGHT, **CLEAN),
    "clean+luma": Style(max_rotation=math.pi, **CLEAN),
}

# Recipes on top of the `demo` preset.  OLD is the preset before this search (weak colour jitter,
# no grayscale); STRONG is today's preset's colour jitter.
OLD = ["brightness=0.2", "contrast=0.2", "saturation=0.2", "hue=0", "grayscale_prob=0"]
STRONG = ["brightness=0.4", "contrast=0.4", "saturation=0.4", "hue=0.5", "grayscale_prob=0.2"]
MILD = [*OLD, "hue=0.1", "grayscale_prob=0.2"]
GRAY = [*OLD, "grayscale_prob=0.2"]
SEEDS = (0, 1, 2)

Job = tuple[str, str, int, list[str], int]  # style, recipe name, epochs, overrides, seed


def _stage(name: str) -> list[Job]:
    if name == "A":  # datasets, old recipe
        jobs = [(s, "old", 16, OLD, seed) for s in ("big-up+luma", "clean-up+luma", "shipped",
                                                   "big-up", "clean-up") for seed in SEEDS]
        return [*jobs, ("v1", "old", 16, OLD, 0)]
    if name == "B":  # colour augmentation on the two best datasets of stage A
        jobs = [(s, r, 16, o, seed) for s in ("shipped", "big-up")
                for r, o in (("strong", STRONG), ("mild", MILD)) for seed in SEEDS]
        return [*jobs, *[("shipped", "old crop 0.3", 16, [*OLD, "image_scale_min=0.3"], seed)
                         for seed in SEEDS]]
    if name == "C":  # is the dataset change needed?  fewer epochs?  more seeds
        jobs = [(s, r, e, o, seed) for s, r, e, o in (
            ("v1", "strong", 16, STRONG), ("v1+luma", "strong", 16, STRONG),
            ("shipped", "strong", 12, STRONG), ("shipped", "gray", 16, GRAY)) for seed in SEEDS]
        return [*jobs, ("shipped", "strong", 16, STRONG, 3), ("shipped", "strong", 16, STRONG, 4),
                ("shipped", "strong crop 0.2", 16, [*STRONG, "image_scale_min=0.2"], 0),
                ("clean+luma", "strong", 16, STRONG, 0)]
    if name == "shipped":  # the demo exactly as shipped (its preset), three seeds
        return [("shipped", "preset", 12, [], seed) for seed in SEEDS]
    raise ValueError(f"unknown stage {name!r}")


def run_demo_process(style: str, run_dir: Path, epochs: int, device: str,
                     overrides: list[str]) -> dict[str, object]:
    """``pirl demo`` on dataset ``style`` in a child process (the style is process-global), one
    torch thread, fp32; its output goes to ``run_dir``.log.  Returns wall time and return code,
    plus epochs, steps, train seconds and kNN top-1 pretrained / random / gain from its
    demo.json, or the last line of its error."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--job", style, str(run_dir),
           str(epochs), device, *overrides, "amp=false", "channels_last=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    row: dict[str, object] = {"wall_s": time.perf_counter() - t0, "returncode": proc.returncode}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    run_dir.with_suffix(".log").write_text(proc.stdout + proc.stderr)
    summary = run_dir / "demo.json"
    if proc.returncode == 0 and summary.exists():
        s = json.loads(summary.read_text())
        row.update(epochs=s["config"]["optim"]["epochs"], steps=s["steps"],
                   train_s=s["train_seconds"], pirl=s["knn"]["PIRL pretrained"]["top1"],
                   random=s["knn"]["random init"]["top1"], gain=s["gain_top1"])
    else:
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
    return row


def run_job(job: Job, out: Path, device: str) -> dict[str, object]:
    """One job of a stage; prints its row and appends it to ``out``/rows.jsonl."""
    style, recipe, epochs, overrides, seed = job
    run_dir = out / f"{style}_{recipe}_{epochs}ep_s{seed}".replace(" ", "-").replace("+", "p")
    row: dict[str, object] = {"style": style, "recipe": recipe, "epochs": epochs, "seed": seed,
                              "overrides": overrides}
    row.update(run_demo_process(style, run_dir, epochs, device, [*overrides, f"seed={seed}"]))
    print(json.dumps(row), flush=True)
    with open(out / "rows.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


def table(rows: list[dict[str, object]]) -> str:
    """One markdown row per (style, recipe, epochs): per-seed 'pirl / random (gain)', min gain."""
    groups: dict[tuple[object, object, object], list[dict[str, object]]] = {}
    for r in rows:
        groups.setdefault((r["style"], r["recipe"], r["epochs"]), []).append(r)
    lines = ["| dataset | recipe | epochs | per seed: PIRL / random (gain) | min gain |",
             "|---|---|---|---|---|"]
    for (style, recipe, epochs), rs in groups.items():
        ok = sorted((r for r in rs if "gain" in r), key=lambda r: int(str(r["seed"])))
        cells = "; ".join(f"s{r['seed']}: {float(str(r['pirl'])):.1f} / "
                          f"{float(str(r['random'])):.1f} ({float(str(r['gain'])):+.1f})"
                          for r in ok)
        worst = f"{min(float(str(r['gain'])) for r in ok):+.1f}" if ok else "failed"
        lines.append(f"| {style} | {recipe} | {epochs} | {cells} | {worst} |")
    return "\n".join(lines)


def job_main(style: str, run_dir: str, epochs: int, device: str, overrides: list[str]) -> int:
    import pirl.data.synthetic as synthetic
    from pirl.demo import run_demo

    # DataLoader workers are forked from this process, so they see the swapped style too.
    synthetic.STYLE = STYLES[style]
    return run_demo(Path(run_dir), device=device, epochs=epochs, quiet=True, overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--job"]:
        style, run_dir, epochs, device, *overrides = argv[1:]
        return job_main(style, run_dir, int(epochs), device, overrides)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=("A", "B", "C", "shipped"), required=True)
    ap.add_argument("--out", default=".cache/demo_search", help="folder for runs and rows.jsonl")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parallel", type=int, default=1, help="jobs run at once")
    args = ap.parse_args(argv)
    out = Path(args.out) / args.stage
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda j: run_job(j, out, args.device), _stage(args.stage)))
    print(f"\n`pirl demo` on synthetic dataset variants, stage {args.stage} ({args.device}, "
          f"{args.parallel} at once); kNN top-1 % on the held-out split (k = 20)\n")
    print(table(rows))
    return 0 if all("gain" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
