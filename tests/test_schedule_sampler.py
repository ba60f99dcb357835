"""Learning-rate schedule, optimizer groups and the epoch-seeded sampler."""

from __future__ import annotations

import math

import torch
from torch import nn

from pirl.config import OptimConfig
from pirl.data.sampler import EpochSampler, SeededViews, epoch_order
from pirl.schedule import lr_at, param_groups, peak_lr


def test_linear_scaling_rule() -> None:
    assert peak_lr(OptimConfig(base_lr=0.03, batch_size=1024)) == 0.12


def test_warmup_then_cosine_written_out() -> None:
    peak, total, warm, ratio = 0.4, 110, 10, 1e-3
    for step in range(total + 1):
        if step < warm:
            expect = peak * (step + 1) / warm
        else:
            t = (step - warm) / (total - warm)
            expect = peak * ratio + (peak - peak * ratio) * (1 + math.cos(math.pi * t)) / 2
        assert abs(lr_at(step, total, warm, peak, ratio) - expect) < 1e-12
    assert abs(lr_at(total, total, warm, peak, ratio) - peak * ratio) < 1e-12


def test_no_weight_decay_on_batchnorm_and_biases() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    names_decay = {id(p) for p in decay["params"]}
    assert id(model[0].weight) in names_decay and id(model[3].weight) in names_decay
    assert {id(p) for p in no_decay["params"]} == {
        id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[3].bias)}


def test_sampler_ranks_tile_the_single_process_batches() -> None:
    n, batch = 50, 8
    single = list(EpochSampler(n, batch, seed=3, epoch=2))
    r0 = list(EpochSampler(n, batch, seed=3, rank=0, world=2, epoch=2))
    r1 = list(EpochSampler(n, batch, seed=3, rank=1, world=2, epoch=2))
    rebuilt = []
    for k in range(n // batch):
        rebuilt += r0[k * 4:(k + 1) * 4] + r1[k * 4:(k + 1) * 4]
    assert rebuilt == single
    assert len(single) == (n // batch) * batch
    assert all(2 * n <= d < 3 * n for d in single)  # draw ids carry the epoch
    assert len(set(single)) == len(single)


def test_sampler_resume_skips_completed_batches() -> None:
    full = list(EpochSampler(40, 4, seed=1, epoch=0))
    assert list(EpochSampler(40, 4, seed=1, epoch=0, start_batch=3)) == full[12:]
    assert not torch.equal(epoch_order(40, 1, 0), epoch_order(40, 1, 1))


class _Noisy:
    """Returns a random number per item: shows the RNG is reseeded per (epoch, index)."""

    def __init__(self, bad: set[int]) -> None:
        self.bad = bad

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        if i in self.bad:
            return None
        return {"index": i, "x": torch.rand(1).item()}


def test_seeded_views_are_a_function_of_epoch_and_index() -> None:
    ds = SeededViews(_Noisy(set()), seed=0)
    a, b = ds[3], ds[3]
    assert a == b
    assert ds[13]["x"] != a["x"]  # same image, next epoch: a new augmentation
    assert ds[13]["index"] == 3


def test_bad_images_are_substituted_and_counted() -> None:
    ds = SeededViews(_Noisy({4, 5}), seed=0)
    s = ds[4]
    assert s["index"] == 6 and s["skipped"] == 2
