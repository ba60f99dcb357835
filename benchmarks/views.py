"""Benchmark: jigsaw + image views per image, paper preset, one process (issue 6, target 1).

Compares, side by side in one run, on a decoded 256 x 256 PIL image (no JPEG decode timed):

* ``baseline (PIL, view by view)``: the straightforward pipeline written with torchvision
  transforms on PIL images: RandomResizedCrop -> flip -> ColorJitter -> grayscale -> tensor for the
  image view; RandomResizedCrop(255) for the jigsaw crop, then for each of the 9 cells a crop at a
  random offset followed by its own flip / ColorJitter / grayscale / to-tensor; a random order.
* ``pirl fast path``: :func:`pirl.methods.build_train_transform` for method pirl, pretext
  jigsaw (uint8 tensors throughout, one batched colour call for the image view and 9 patches).
* ``pirl batched colour``: what training runs in each DataLoader worker: the same transform with
  ``defer_colour=True`` (crops and parameters only) on ``--batch`` images, then
  :class:`pirl.data.views.ColourCollate` colouring all their views in one call and writing the
  collated batch; the time of the whole batch divided by its size.  (The rows above include no
  collation: that favours them.)

Both rows run once per colour backend (``views.colour_backend``): ``torch`` always, ``numba``
when it is installed (``pip install pirl[fast]``; training's default then).  The benchmark checks
that each backend's batched path gives bit for bit its per-sample pixels and that the two backends
differ by at most one grey level.

All do the same operations with the same probabilities (colour jitter 0.4/0.4/0.4/0.2 always,
grayscale 0.2, flip 0.5).  The rounds alternate between the pipelines so that load from other
processes on the machine hits all alike; ms/image is the median over rounds.

    python benchmarks/views.py [--rounds 15] [--per-round 40] [--batch 32] [--image PATH_OR_TAR]

The image is the first of ``imagenette-96/val.tar`` under ``--data-root`` (default: the
environment variable ``PIRL_DATA``) unless ``--image`` names one; with neither, smooth noise.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import default_collate

from pirl.config import Config, ViewConfig
from pirl.data.jigsaw import JigsawView
from pirl.data.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ColourCollate,
    ImageView,
)
from pirl.kernels.colour import numba_available
from pirl.methods import build_train_transform

DEFAULT_TAR = "imagenette-96/val.tar"  # under --data-root / $PIRL_DATA


def load_input(path: str | None, side: int = 256, data_root: str | None = None) -> Image.Image:
    """A decoded RGB image of ``side x side``: the first JPEG of a tar / an image file (``path``,
    else ``data_root/imagenette-96/val.tar``), resized; random smooth noise when nothing is found
    (the timing hardly depends on the content)."""
    candidate = Path(path) if path else Path(data_root or ".") / DEFAULT_TAR
    img: Image.Image | None = None
    if candidate.is_file() and candidate.suffix == ".tar":
        with tarfile.open(candidate) as tar:
            for member in tar:
                if member.isfile() and member.name.lower().endswith((".jpg", ".jpeg", ".png")):
                    data = tar.extractfile(member)
                    assert data is not None
                    img = Image.open(io.BytesIO(data.read())).convert("RGB")
                    break
    elif candidate.is_file():
        img = Image.open(candidate).convert("RGB")
    if img is None:
        why = (f"{candidate} not found" if path or data_root else "no image (set PIRL_DATA to "
               "the folder holding imagenette-96/val.tar, or pass --data-root DIR or --image PATH)")
        print(f"views.py: {why}: timing on smooth noise")
        rng = np.random.default_rng(0)
        small = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(small)
    return img.resize((side, side), Image.Resampling.BILINEAR)


class BaselinePIL:
    """The straightforward pipeline: torchvision transforms on PIL, one view / patch at a time.

    ``float_output=True`` ends every view with ``ToTensor() + Normalize()`` as most public
    pipelines (VISSL's among them) do; the default ends with uint8 ``PILToTensor()``, the same
    output as the fast path (which normalises on the device), so it is the fair comparison.
    """

    def __init__(self, v: ViewConfig, float_output: bool = False) -> None:
        to_tensor: object = T.PILToTensor()
        if float_output:
            to_tensor = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        jitter = T.RandomApply([T.ColorJitter(v.brightness, v.contrast, v.saturation, v.hue)],
                               p=v.jitter_prob)
        self.image_tf = T.Compose([
            T.RandomResizedCrop(v.image_size, scale=(v.image_scale_min, 1.0)),
            T.RandomHorizontalFlip(v.flip_prob), jitter, T.RandomGrayscale(v.grayscale_prob),
            to_tensor,
        ])
        self.crop_tf = T.RandomResizedCrop(v.jigsaw_crop, scale=(v.jigsaw_scale_min, 1.0))
        self.patch_tf = T.Compose([
            T.RandomHorizontalFlip(v.flip_prob), jitter, T.RandomGrayscale(v.grayscale_prob),
            to_tensor,
        ])
        self.v = v

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        v = self.v
        image = self.image_tf(img)
        crop = self.crop_tf(img)
        patches = []
        for cell in range(v.grid * v.grid):
            r, c = divmod(cell, v.grid)
            dy, dx = (int(t) for t in torch.randint(v.cell - v.patch + 1, (2,)))
            top, left = r * v.cell + dy, c * v.cell + dx
            patch = crop.crop((left, top, left + v.patch, top + v.patch))
            patches.append(self.patch_tf(patch))
        order = torch.randperm(len(patches))
        return {"image": image, "patches": torch.stack(patches)[order]}


class BatchedColour:
    """``batch`` samples of ``TrainTransform(defer_colour=True)`` and one :class:`ColourCollate`
    call: ``__call__(img)`` returns the collated batch of ``batch`` views of ``img``."""

    def __init__(self, cfg: Config, batch: int) -> None:
        self.transform = build_train_transform(cfg, defer_colour=True)
        self.collate = ColourCollate(backend=cfg.views.colour_backend)
        self.batch = batch

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        out = self.collate([{**self.transform(img), "index": i} for i in range(self.batch)])
        assert isinstance(out, dict)
        return out


def numba_version() -> str:
    """", numba X.Y" when the numba colour backend is there, else ""."""
    if not numba_available():
        return ""
    import numba

    return f", numba {numba.__version__}"


def time_per_image(fn: Callable[[Image.Image], object], img: Image.Image, n: int) -> float:
    """Seconds per image over ``n`` images (``n // fn.batch`` calls, at least one, when ``fn``
    makes a batch of images per call)."""
    per_call = getattr(fn, "batch", 1)
    calls = max(1, n // per_call)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(img)
    return (time.perf_counter() - t0) / (calls * per_call)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="alternating timing rounds")
    ap.add_argument("--per-round", type=int, default=40, help="images per pipeline per round")
    ap.add_argument("--batch", type=int, default=32, help="images per batch of the batched "
                    "colour row (per round: per-round // batch batches, at least one)")
    ap.add_argument("--image", default=None, help="image file or ImageFolder tar to take one "
                    "image from (default: DATA_ROOT/imagenette-96/val.tar; noise if missing)")
    ap.add_argument("--data-root", default=os.environ.get("PIRL_DATA") or None, metavar="DIR",
                    help="folder holding imagenette-96/val.tar (default: $PIRL_DATA)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one process, one core: the per-worker cost
    torch.manual_seed(0)

    v = Config().views  # the paper's preset: 224 view, 255 crop, 85 cells, 64 patches
    backends = ["torch", "numba"] if numba_available() else ["torch"]
    configs = {b: Config() for b in backends}
    for b, c in configs.items():
        c.views.colour_backend = b
    img = load_input(args.image, data_root=args.data_root)
    best = configs[backends[-1]].views
    image_view, jigsaw_view = ImageView(best), JigsawView(best)
    pipelines: dict[str, Callable[[Image.Image], object]] = {
        "baseline (PIL, view by view)": BaselinePIL(v)}
    for b in backends:
        pipelines[f"pirl fast path (image + jigsaw), {b} colour"] = build_train_transform(
            configs[b])
    for b in backends:
        pipelines[f"pirl batched colour (batch {args.batch}, per image), {b} colour"] = (
            BatchedColour(configs[b], args.batch))
    pipelines[f"  of which: image view alone ({backends[-1]})"] = image_view
    pipelines[f"  of which: jigsaw view alone ({backends[-1]})"] = jigsaw_view
    pipelines["baseline + ToTensor/Normalize per view (float out)"] = BaselinePIL(
        v, float_output=True)
    # Shapes first: both produce the same outputs.
    base_out = pipelines["baseline (PIL, view by view)"](img)
    fast_out = build_train_transform(configs["torch"])(img)
    assert isinstance(base_out, dict) and isinstance(fast_out, dict)
    for key in ("image", "patches"):
        assert base_out[key].shape == fast_out[key].shape, key
        assert base_out[key].dtype == fast_out[key].dtype == torch.uint8, key
    # Each backend's batched path gives bit for bit its per-sample path's pixels (seeded per
    # sample, as training seeds them); the backends agree to one grey level.
    batches = {}
    for b in backends:
        per_sample_tf, batched = build_train_transform(configs[b]), BatchedColour(configs[b], 3)
        per_sample, deferred = [], []
        for i in range(batched.batch):
            torch.manual_seed(i)
            per_sample.append(per_sample_tf(img))
            torch.manual_seed(i)
            deferred.append(batched.transform(img))
        reference, batches[b] = default_collate(per_sample), batched.collate(deferred)
        for key in ("image", "patches"):
            assert torch.equal(batches[b][key], reference[key]), (b, key)
    for key in ("image", "patches"):
        diff = (batches["torch"][key].int() - batches[backends[-1]][key].int()).abs()
        assert int(diff.max()) <= 1, key
    torch.manual_seed(0)
    for fn in pipelines.values():  # warm-up
        time_per_image(fn, img, 5)
    times: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(args.rounds):
        for name, fn in pipelines.items():
            times[name].append(time_per_image(fn, img, args.per_round))
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    base = med["baseline (PIL, view by view)"]
    print(f"jigsaw + image views, paper preset (view {v.image_size}, crop {v.jigsaw_crop}, cell "
          f"{v.cell}, patch {v.patch}), {img.width}x{img.height} PIL input, 1 thread, "
          f"torch {torch.__version__}{numba_version()}; median of {args.rounds} rounds x "
          f"{args.per_round} images "
          f"(batched row: {max(1, args.per_round // args.batch)} x {args.batch}); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared machine)")
    print()
    print("| pipeline | ms/image | images/s | speed-up vs baseline |")
    print("|---|---|---|---|")
    for name, ms in med.items():
        print(f"| {name.strip()} | {ms:.2f} | {1e3 / ms:.0f} | {base / ms:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
