"""Benchmark: PIRL training throughput, samples/s of a full step (issue 6, targets 3 and 4).

Three steps, timed side by side in alternating rounds on the same synthetic batches (data loading
excluded), with the same ResNet trunk and heads:

* ``pirl``: the package's training step, as :func:`pirl.train.pretrain` runs it: forward (bf16
  autocast and channels_last on CUDA), :func:`pirl.methods.build_objective` loss against the memory
  bank (``objective.loss``, ``objective.negatives``), backward, SGD step, bank update.
* ``reference``: the same model and loss written the straightforward way in this file: gather the
  ``B x N`` negatives' bank rows into one ``[B, N, D]`` tensor, score them with a batched matrix
  product, the paper's NCE loss as the formula reads (docs/method.md: ``h = e^a / (e^a + S)``,
  ``S = sum_j e^(a_j)``, ``loss = -log h_p - sum_j log(1 - h_j)``, left to autograd), then
  backward, step, and the momentum update of the bank.  (The published PyContrast number in the
  issue, 38 samples/s on this machine kind, cannot be re-measured here: PyContrast is not
  installed and the machine has no network; its ratio below uses that published number.)
* ``trunk only``: the trunk's own forward + backward + SGD step on the same pixels (the image
  and its P patches), no heads, no bank, no loss beyond a mean: the ceiling a PIRL step can reach.

With ``--data`` (an ImageFolder ``.tar`` read in place, e.g. Imagenette-96) it also times the PIRL
step fed by a ``DataLoader`` with ``--workers`` worker processes running the real jigsaw + image
views the way :func:`pirl.train.pretrain` builds them (crops and colour parameters per sample,
the colour of the whole batch in :class:`pirl.data.views.ColourCollate`), and reports its
samples/s against the trunk-only number (issue 6 target: >= 0.8).

The issue's setting is ResNet-18, 64-px images and 21-px patches, batch 32, N = 32,000 negatives.
The 64-px preset (tiny64-r18) cuts 18-px patches from 24-px cells; ``--patch 21`` keeps its
geometry (72-px jigsaw crop, 24-px cells) and cuts 21-px patches instead.

    python benchmarks/train_step.py [--steps 3] [--rounds 5] [--data PATH.tar --workers 2]
    python benchmarks/train_step.py --data $PIRL_DATA/imagenette-96/train.tar --workers 1
    python benchmarks/train_step.py --device cuda --arch resnet50 --image-size 224 --patch 64 \\
        --batch 256 --bank 1281167
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pirl import config as C
from pirl.data import ColourCollate, ViewDataset, collate_views, open_source
from pirl.kernels.colour import resolve_colour_backend
from pirl.methods import build_model, build_objective, build_train_transform, fit_to_dataset
from pirl.presets import view_preset
from pirl.schedule import build_optimizer

PYCONTRAST_SAMPLES_S = 38.0  # issue 6: PyContrast, this machine kind, same setting

Batch = dict[str, Tensor]


def build_config(args: argparse.Namespace) -> C.Config:
    """The run config of the benchmark: the 64-px ResNet-18 preset with the issue's numbers."""
    cfg = C.from_preset("tiny64-r18")
    size = args.image_size
    views = view_preset(size) if size != 64 else {}
    C.apply_mapping(cfg, {**views, "arch": args.arch, "batch_size": args.batch,
                          "num_negatives": args.negatives, "negatives": args.mode,
                          "loss": args.loss, "bank_dtype": args.bank_dtype,
                          "colour_backend": args.colour_backend})
    if args.patch:
        cfg.views.patch = args.patch
    C.validate(cfg)
    fit_to_dataset(cfg, dataset_size=args.bank)
    return cfg


def _autocast(device: torch.device) -> Any:
    return (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
            else contextlib.nullcontext())


def synthetic_batches(cfg: C.Config, bank_size: int, device: torch.device, n: int,
                      seed: int = 0) -> list[Batch]:
    """``n`` batches of already-normalised float views as the loader + ``to_device`` hand them to
    the model: image ``[B,3,S,S]``, patches ``[B,P,3,p,p]``, index Long ``[B]`` (distinct)."""
    g = torch.Generator().manual_seed(seed)
    v, B = cfg.views, cfg.optim.batch_size
    P = v.grid * v.grid
    out = []
    for _ in range(n):
        batch = {"image": torch.randn(B, 3, v.image_size, v.image_size, generator=g),
                 "patches": torch.randn(B, P, 3, v.patch, v.patch, generator=g),
                 "index": torch.randperm(bank_size, generator=g)[:B]}
        out.append({k: t.to(device) for k, t in batch.items()})
    return out


def _channels_last(batch: Batch) -> Batch:
    out = dict(batch)
    out["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    return out


class PirlStep:
    """One training step of the package (the body of :func:`pirl.train.pretrain`'s loop without
    logging and checkpoints)."""

    def __init__(self, cfg: C.Config, bank_size: int, device: torch.device,
                 compile_trunk: bool = False) -> None:
        self.device = device
        self.model = build_model(cfg).to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.objective = build_objective(cfg, bank_size, device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        if compile_trunk:
            self.model.trunk = torch.compile(self.model.trunk)  # type: ignore[assignment]
        self.model.train()

    def __call__(self, batch: Batch) -> Tensor:
        if self.device.type == "cuda":
            batch = _channels_last(batch)
        with _autocast(self.device):
            out = self.model(batch)
        out = {k: v.float() for k, v in out.items()}
        loss, _ = self.objective.loss(out, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.objective.after_step(out, batch)
        return loss.detach()


class ReferenceStep:
    """The same model and NCE loss written the straightforward way (see the module docstring)."""

    def __init__(self, cfg: C.Config, bank_size: int, device: torch.device) -> None:
        o = cfg.objective
        self.device, self.tau, self.lam, self.m = device, o.tau, o.lam, o.bank_momentum
        self.N = min(o.num_negatives, bank_size - 1)
        self.size = bank_size
        self.model = build_model(cfg).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9,
                                         weight_decay=1e-4)
        self.bank = F.normalize(torch.randn(bank_size, cfg.model.embed_dim, device=device), dim=1)
        self.model.train()

    def nce(self, z: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        """NCE as the formula reads: z [B,D], pos [B,D], neg [B,N,D] -> mean over the batch."""
        e_pos = torch.exp((z * pos).sum(1) / self.tau)  # [B]
        e_neg = torch.exp(torch.bmm(neg, z.unsqueeze(2)).squeeze(2) / self.tau)  # [B,N]
        s = e_neg.sum(1, keepdim=True)
        h_pos = e_pos / (e_pos + s.squeeze(1))
        h_neg = e_neg / (e_neg + s)
        return (-torch.log(h_pos) - torch.log(1 - h_neg).sum(1)).mean()

    def __call__(self, batch: Batch) -> Tensor:
        with _autocast(self.device):
            out = self.model(batch)
        z_img, z_t = out["z_img"].float(), out["z_t"].float()
        idx = batch["index"]
        neg_idx = torch.randint(self.size, (idx.shape[0], self.N), device=self.device)
        neg = self.bank[neg_idx]  # [B,N,D] gather
        pos = self.bank[idx]
        loss = self.lam * self.nce(z_t, pos, neg) + (1 - self.lam) * self.nce(z_img, pos, neg)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.bank[idx] = F.normalize(self.m * pos + (1 - self.m) * z_img.detach(), dim=1)
        return loss.detach()


class TrunkStep:
    """The trunk alone on the same pixels: forward image and patches, mean, backward, SGD."""

    def __init__(self, cfg: C.Config, device: torch.device, compile_trunk: bool = False) -> None:
        self.device = device
        trunk = build_model(cfg).trunk
        assert isinstance(trunk, nn.Module)
        self.trunk: nn.Module = trunk.to(device)
        if device.type == "cuda":
            self.trunk = self.trunk.to(memory_format=torch.channels_last)
        if compile_trunk:
            self.trunk = torch.compile(self.trunk)  # type: ignore[assignment]
        self.optimizer = torch.optim.SGD(self.trunk.parameters(), lr=0.01, momentum=0.9)
        self.trunk.train()

    def __call__(self, batch: Batch) -> Tensor:
        if self.device.type == "cuda":
            batch = _channels_last(batch)
        with _autocast(self.device):
            a = self.trunk(batch["image"])
            b = self.trunk(batch["patches"].flatten(0, 1))
            loss = a.float().mean() + b.float().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[Batch], Tensor], batches: Iterator[Batch], n: int,
               batch_size: int, device: torch.device) -> float:
    """Samples/s over ``n`` steps (one sync at the end, as a training loop would run)."""
    _sync(device)
    t0 = time.perf_counter()
    last = None
    for _ in range(n):
        last = step(next(batches))
    if last is not None:
        float(last)  # also a device sync
    _sync(device)
    return n * batch_size / (time.perf_counter() - t0)


def loader_batches(cfg: C.Config, data: str, workers: int, device: torch.device,
                   bank_rows: int) -> Iterator[Batch]:
    """Endless batches of real views: ``DataLoader`` workers run the training transform on the
    tar's images (read in place); uint8 views are normalised on ``device`` as in training."""
    from pirl.train import to_device

    source = open_source(data)
    if len(source) > bank_rows:  # a sample's dataset index is its bank row
        raise SystemExit(f"train_step.py: --data {data} has {len(source)} images but the bank "
                         f"has --bank {bank_rows} rows; pass --bank {len(source)} or more")
    # As pirl/train.py: the workers draw each sample's crops and colour parameters, and colour
    # the whole batch in one call in the collate function (unreadable images dropped by
    # collate_views, which also counts them).
    dataset = ViewDataset(source, build_train_transform(cfg, defer_colour=True))
    collate = ColourCollate(collate_views, backend=cfg.views.colour_backend)
    g = torch.Generator().manual_seed(0)
    # One long epoch of 100 passes: at an epoch's end the loader's queue drains while the
    # workers start the next one, which a small tar (a few batches per pass) would otherwise
    # hit every few steps; a training run on a real dataset meets it once per thousands.
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=100 * len(dataset),
                                             generator=g)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.optim.batch_size, sampler=sampler, drop_last=True,
        num_workers=workers, collate_fn=collate,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None)
    while True:
        for raw in loader:
            yield to_device({k: v for k, v in raw.items() if k != "skipped"}, device, False)


def _median_table(rows: list[tuple[str, list[float]]], ref: float) -> list[str]:
    lines = ["| step | samples/s (median) | min..max | vs reference | vs PyContrast 38/s* |",
             "|---|---|---|---|---|"]
    for name, xs in rows:
        med = statistics.median(xs)
        lines.append(f"| {name} | {med:.1f} | {min(xs):.1f}..{max(xs):.1f} | {med / ref:.2f}x | "
                     f"{med / PYCONTRAST_SAMPLES_S:.2f}x |")
    return lines


def run(args: argparse.Namespace) -> dict[str, float]:
    """Run the benchmark; prints markdown tables and returns the medians by name."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = build_config(args)
    B, v = cfg.optim.batch_size, cfg.views
    steps: dict[str, Callable[[Batch], Tensor]] = {
        "pirl": PirlStep(cfg, args.bank, device),
        "reference (gather B x N, naive NCE)": ReferenceStep(cfg, args.bank, device),
        "trunk only (same pixels)": TrunkStep(cfg, device),
    }
    if args.compile:  # the same two steps with torch.compile'd trunks, timed alongside
        steps["pirl, compiled trunk"] = PirlStep(cfg, args.bank, device, compile_trunk=True)
        steps["trunk only, compiled"] = TrunkStep(cfg, device, compile_trunk=True)
    batches = synthetic_batches(cfg, args.bank, device, 4)
    pool = itertools.cycle(batches)
    for step in steps.values():  # warm-up (allocator, autotuning, first-touch of the bank)
        time_steps(step, pool, args.warmup, B, device)
    results: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            results[name].append(time_steps(step, pool, args.steps, B, device))
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"training step, {cfg.model.arch}, {v.image_size}-px images, {v.patch}-px patches "
          f"(crop {v.jigsaw_crop}, cell {v.cell}), batch {B}, N = {args.negatives} "
          f"{cfg.objective.negatives} negatives, loss {cfg.objective.loss}, bank "
          f"{args.bank} x {cfg.model.embed_dim} {cfg.objective.bank_dtype}; {dev}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; synthetic batches "
          f"(no data loading); median of {args.rounds} rounds x {args.steps} steps; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared machine)")
    print()
    ref = statistics.median(results["reference (gather B x N, naive NCE)"])
    print("\n".join(_median_table(list(results.items()), ref)))
    print()
    print("*PyContrast's 38 samples/s is the issue's published number for this setting and "
          "machine kind, not re-measured here (PyContrast is not installed; no network).")
    medians = {name: statistics.median(xs) for name, xs in results.items()}
    trunk = medians["trunk only (same pixels)"]
    print(f"\npirl / trunk-only (synthetic batches): {medians['pirl'] / trunk:.2f}")
    if args.data:
        data = str(args.data)
        if not Path(data).exists():
            print(f"\n(--data {data} not found: real-data timing skipped)")
            return medians
        real = loader_batches(cfg, data, args.workers, device, args.bank)
        pirl = steps["pirl"]
        time_steps(pirl, real, args.warmup + 1, B, device)  # starts the workers
        xs, ts = [], []
        for _ in range(args.rounds):
            xs.append(time_steps(pirl, real, args.steps, B, device))
            ts.append(time_steps(steps["trunk only (same pixels)"], pool, args.steps, B, device))
        med, tmed = statistics.median(xs), statistics.median(ts)
        medians["pirl + real data"] = med
        medians["trunk only (same rounds)"] = tmed
        backend = resolve_colour_backend(cfg.views.colour_backend)
        print(f"\nwith real data loading: {Path(data).name}, {args.workers} DataLoader "
              f"worker(s), training transform and batch colour (ColourCollate, {backend} "
              f"backend) in the workers, tar read in place")
        print()
        print("| step | samples/s (median) | min..max | vs trunk only |")
        print("|---|---|---|---|")
        print(f"| pirl, real data | {med:.1f} | {min(xs):.1f}..{max(xs):.1f} | "
              f"{med / tmed:.2f} |")
        print(f"| trunk only, synthetic (alternating rounds) | {tmed:.1f} | "
              f"{min(ts):.1f}..{max(ts):.1f} | 1.00 |")
    if any(not math.isfinite(x) for x in medians.values()):
        raise RuntimeError("a timing came out non-finite")
    return medians


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared with ``pirl bench train-step``)."""
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] (cuda: bf16 autocast, "
                    "channels_last)")
    ap.add_argument("--arch", default="resnet18", choices=C.ARCHS)
    ap.add_argument("--image-size", type=int, default=64, choices=(32, 64, 96, 224))
    ap.add_argument("--patch", type=int, default=21, help="patch side, px (0: the preset's)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--negatives", type=int, default=32000)
    ap.add_argument("--mode", default="per-sample", choices=C.NEGATIVE_MODES)
    ap.add_argument("--loss", default="nce", choices=C.LOSSES)
    ap.add_argument("--bank", type=int, default=50000, help="memory bank rows (|D|)")
    ap.add_argument("--bank-dtype", default="float32", choices=C.BANK_DTYPES)
    ap.add_argument("--colour-backend", default="auto", choices=C.COLOUR_BACKENDS,
                    help="colour augmentation of the --data loader (views.colour_backend)")
    ap.add_argument("--steps", type=int, default=3, help="steps per timing round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per step kind")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--data", default=None, help="ImageFolder .tar (or folder) for the "
                    "real-data timing, e.g. $PIRL_DATA/imagenette-96/train.tar")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for --data")
    ap.add_argument("--compile", action="store_true", help="also time the PIRL and trunk-only "
                    "steps with torch.compile'd trunks")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    run(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
