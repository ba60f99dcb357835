"""PIRL with a fixed set of |T| jigsaw orders (``objective.num_pirl_permutations``, Fig. 7): the
set is the Jigsaw baseline's for the same size and seed, every drawn order is in it, the run
records it and a resume keeps it; 0 leaves the draws of any of the 9! untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pirl import config as C
from pirl.checkpoint import safe_load
from pirl.data.jigsaw import JigsawView, maximal_hamming_permutations
from pirl.methods import build_train_transform, fit_to_dataset, permutation_count, permutation_set
from pirl.presets import view_preset
from pirl.train import pretrain


def _cfg(method: str = "pirl", **overrides: object) -> C.Config:
    cfg = C.Config()
    C.apply_mapping(cfg, {**view_preset(32), "method": method, **overrides})
    return cfg


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((40, 44, 3)) * 255).astype(np.uint8))


def test_the_set_is_the_jigsaw_baselines_and_every_order_is_in_it() -> None:
    k, seed = 7, 3
    pirl_set = permutation_set(_cfg(num_pirl_permutations=k), seed)
    jigsaw_set = permutation_set(_cfg("jigsaw", num_permutations=k), seed)
    assert pirl_set is not None and jigsaw_set is not None
    assert torch.equal(pirl_set, jigsaw_set)
    assert torch.equal(pirl_set, maximal_hamming_permutations(k, 3, seed=seed))
    rows = {tuple(r) for r in pirl_set.tolist()}
    view = JigsawView(_cfg().views, photometric=False, orders=pirl_set)
    torch.manual_seed(0)
    seen = {tuple(view(_image(i), return_params=True)[2].order.tolist()) for i in range(60)}
    assert seen <= rows and len(seen) == k  # 60 draws from 7 rows: each row turns up


def test_the_transform_orders_the_patches_by_a_row_of_the_set() -> None:
    """The patches leaving the training transform are the row-major cells in a row's order."""
    cfg = _cfg(num_pirl_permutations=5, jitter_prob=0.0, grayscale_prob=0.0, flip_prob=0.0)
    perms = permutation_set(cfg, 0)
    assert perms is not None
    tf = build_train_transform(cfg, perms)
    unshuffled = JigsawView(cfg.views, photometric=False, shuffle=False)
    for i in range(8):
        torch.manual_seed(i)
        patches = tf(_image(i))["patches"]
        torch.manual_seed(i)
        tf.image_view.crop(_image(i))  # the transform crops the image view first
        cells, _ = unshuffled(_image(i))
        matches = [r for r in perms if torch.equal(cells[r], patches)]
        assert len(matches) == 1


def test_zero_keeps_any_order_and_other_views_refuse_a_size() -> None:
    assert permutation_count(_cfg()) == 0 and permutation_set(_cfg(), 0) is None
    assert permutation_count(_cfg("jigsaw", num_permutations=9)) == 9
    cfg = _cfg(pretext="rotation", num_pirl_permutations=4)
    with pytest.raises(C.ConfigError, match="num_pirl_permutations=4"):
        fit_to_dataset(cfg, 100)
    for bad in (-1, 362881):
        with pytest.raises(C.ConfigError, match=f"num_pirl_permutations={bad}: 0 .all. or"):
            fit_to_dataset(_cfg(num_pirl_permutations=bad), 100)
    # K = 0 draws exactly what the view drew before the option existed: a randperm.
    view = JigsawView(_cfg().views, photometric=False)
    torch.manual_seed(5)
    order = view(_image(0), return_params=True)[2].order
    g = torch.Generator().manual_seed(5)
    torch.rand(10, 4, generator=g)  # the crop box
    torch.randint(12 - 9 + 1, (9, 2), generator=g)  # the offsets
    assert torch.equal(order, torch.randperm(9, generator=g))


def test_a_run_records_the_set_and_resumes_with_it(tmp_path: Path) -> None:
    def cfg(k: int) -> C.Config:
        c = C.from_preset("cifar10-r18")
        for key, value in {"epochs": 2, "batch_size": 16, "warmup_epochs": 0,
                           "num_negatives": 16, "workers": 0, "quiet": True, "seed": 11,
                           "num_pirl_permutations": k}.items():
            C.set_value(c, key, value)
        return c

    run = tmp_path / "run"
    pretrain(cfg(6), "synthetic", run, stop_after_steps=1)
    saved = safe_load(run / "checkpoint.pt")["permutations"]
    assert torch.equal(saved, maximal_hamming_permutations(6, 3, seed=11))
    with pytest.raises(C.ConfigError, match="holds 6 jigsaw permutations but this run asks for 0"):
        pretrain(cfg(0), "synthetic", run, stop_after_steps=2)
    pretrain(cfg(6), "synthetic", run, stop_after_steps=2)
    assert torch.equal(safe_load(run / "checkpoint.pt")["permutations"], saved)


def test_all_nine_factorial_orders_come_at_once() -> None:
    """|T| = 9! (Fig. 7's last point): the set is every permutation, built without the greedy
    rounds (O(9!^2)); smaller sets are still the greedy's (its first rows are the same pool's)."""
    full = maximal_hamming_permutations(362_880, 3, seed=2)
    assert full.shape == (362_880, 9)
    assert torch.equal(full.sort(dim=1).values, torch.arange(9).expand(362_880, 9))
    assert len(torch.unique(full, dim=0)) == 362_880
    small = maximal_hamming_permutations(24, 2, seed=1)
    assert len({tuple(r) for r in small.tolist()}) == 24
    assert torch.equal(maximal_hamming_permutations(3, 3, seed=2)[0], full[0])
