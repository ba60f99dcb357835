"""Views: geometry of the jigsaw view, batched colour jitter vs torchvision, permutation sets,
train / eval transforms for every preset and method."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import default_collate

from pirl.config import Config, ViewConfig, apply_mapping
from pirl.data.augment import (
    Photometric,
    apply_photometric,
    identity_photometric,
    sample_photometric,
)
from pirl.data.datasets import collate_views
from pirl.data.jigsaw import hamming_distances
from pirl.data.views import (
    COLOUR_KEY,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ColourCollate,
    DeferredColour,
    ImageView,
    JigsawView,
    RotationView,
    build_eval_transform,
    maximal_hamming_permutations,
    normalize,
)
from pirl.kernels.colour import numba_available, photometric_jobs
from pirl.kernels.colour_job import ColourJob
from pirl.kernels.colour_reference import photometric_reference
from pirl.kernels.colour_torch import color_jitter_batch, colour_jobs
from pirl.methods import build_train_transform
from pirl.plots import show_views
from pirl.presets import view_preset

PRESETS = (224, 96, 64, 32)
# Both implementations of the colour augmentation; numba only where installed (it is in the dev
# extra, so CI runs it: tests/test_colour_backends.py fails under CI=true if it is missing).
BACKENDS = ["torch", pytest.param("numba", marks=pytest.mark.skipif(
    not numba_available(), reason="numba not installed (pip install 'pirl[fast]')"))]


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (upsampled noise: has structure at every cell position)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8))
    noise = (rng.random((h, w, 3)) * 40).astype(np.int16)
    base = np.asarray(small.resize((w, h), Image.BILINEAR)).astype(np.int16)
    return Image.fromarray(np.clip(base + noise - 20, 0, 255).astype(np.uint8))


def _cfg(size: int, **overrides: object) -> Config:
    cfg = Config()
    apply_mapping(cfg, {**view_preset(size), **overrides})
    return cfg


def _as_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def _resized_crop_reference(x: torch.Tensor, box: tuple[int, int, int, int],
                            size: int) -> torch.Tensor:
    """The crop region resized with torch's antialiased bilinear kernel (channels-last input,
    as the views feed it)."""
    top, left, h, w = box
    region = x[:, top:top + h, left:left + w][None].contiguous(memory_format=torch.channels_last)
    if (h, w) == (size, size):
        return region[0]
    return F.interpolate(region, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)[0]


# ---------------------------------------------------------------------------------- normalize
def test_normalize_matches_formula() -> None:
    x = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    out = normalize(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    for c in range(3):
        expected = (x[:, c].double() / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(out[:, c].double(), expected, atol=1e-5, rtol=0)
    with pytest.raises(TypeError):
        normalize(x.float())
    with pytest.raises(ValueError):
        normalize(torch.zeros(2, 4, 5, 5, dtype=torch.uint8))


# --------------------------------------------------------------------------- jigsaw geometry
@pytest.mark.parametrize("size", PRESETS)
@pytest.mark.parametrize("rotate", [False, True])
def test_jigsaw_geometry_patches_equal_crop_cells(size: int, rotate: bool) -> None:
    """Photometric off: every returned patch is the resized crop at its recorded cell and
    offset, and ``order`` permutes the cells."""
    v = _cfg(size).views
    img = _image(int(size * 1.3), int(size * 1.1), seed=size)
    x = _as_tensor(img)
    view = JigsawView(v, photometric=False, rotate=rotate,
                      generator=torch.Generator().manual_seed(3))
    P = v.grid * v.grid
    for _ in range(3):
        patches, order, params = view(img, return_params=True)
        assert patches.shape == (P, 3, v.patch, v.patch) and patches.dtype == torch.uint8
        assert sorted(order.tolist()) == list(range(P))
        assert torch.equal(order, params.order)
        top, left, h, w = params.crop_box
        assert top >= 0 and top + h <= x.shape[1] and left >= 0 and left + w <= x.shape[2]
        # At least jigsaw_scale_min of the area (up to rounding of the box sides).
        assert h * w >= v.jigsaw_scale_min * x.shape[1] * x.shape[2] * 0.97
        assert params.offsets.shape == (P, 2)
        assert int(params.offsets.min()) >= 0 and int(params.offsets.max()) <= v.cell - v.patch
        crop = _resized_crop_reference(x, params.crop_box, v.jigsaw_crop)
        # Cross-check the reference against torchvision's own resized_crop (other kernel).
        tv = TF.resized_crop(x, top, left, h, w, [v.jigsaw_crop, v.jigsaw_crop], antialias=True)
        assert (tv.int() - crop.int()).abs().max() <= 1
        crop = torch.rot90(crop, params.rotation, dims=(1, 2))
        assert params.rotation == 0 or rotate
        for k, cell in enumerate(order.tolist()):
            r, c = divmod(cell, v.grid)
            dy, dx = params.offsets[cell].tolist()
            y0, x0 = r * v.cell + dy, c * v.cell + dx
            assert torch.equal(patches[k], crop[:, y0:y0 + v.patch, x0:x0 + v.patch]), (k, cell)


def test_jigsaw_offsets_and_orders_vary() -> None:
    """Offsets are drawn per cell and direction; orders cover many of the 9! permutations."""
    v = Config().views
    img = _image(256, 256)
    view = JigsawView(v, photometric=False, generator=torch.Generator().manual_seed(0))
    orders, offsets = set(), []
    for _ in range(30):
        _, order, params = view(img, return_params=True)
        orders.add(tuple(order.tolist()))
        offsets.append(params.offsets)
    assert len(orders) == 30  # 30 draws from 9! = 362,880 permutations: no repeats expected
    off = torch.stack(offsets)  # [30, 9, 2]
    assert len(torch.unique(off[:, :, 0])) > 10 and len(torch.unique(off[:, :, 1])) > 10
    # Within one draw the cells do not share one offset (patch edges do not line up).
    assert sum(len(torch.unique(o[:, 0])) > 1 for o in offsets) >= 28


def test_jigsaw_patches_are_augmented_independently() -> None:
    """On a constant-colour image, patches of one view get different colours (each patch has its
    own jitter) and some are flipped/grayscale independently of the others."""
    v = Config().views
    img = Image.new("RGB", (256, 256), (150, 90, 40))
    view = JigsawView(v, generator=torch.Generator().manual_seed(0))
    distinct_counts = []
    for _ in range(5):
        patches, _, params = view(img, return_params=True)
        colours = {tuple(p[:, 0, 0].tolist()) for p in patches}
        distinct_counts.append(len(colours))
        # A constant patch stays constant under any colour op: each patch is one colour.
        assert all(bool((p == p[:, :1, :1]).all()) for p in patches)
        assert params.photometric is not None and len(params.photometric) == 9
    assert max(distinct_counts) >= 5


def test_image_view_geometry_without_photometric() -> None:
    v = _cfg(96).views
    img = _image(120, 150)
    view = ImageView(v, photometric=False, generator=torch.Generator().manual_seed(1))
    out, params = view(img, return_params=True)
    assert out.shape == (3, 96, 96) and out.dtype == torch.uint8 and out.is_contiguous()
    assert torch.equal(out, _resized_crop_reference(_as_tensor(img), params.crop_box, 96))
    top, left, h, w = params.crop_box
    assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


# ------------------------------------------------------------------- batched colour jitter
@pytest.mark.parametrize("backend", BACKENDS)
def test_color_jitter_identity(backend: str) -> None:
    x = torch.randint(0, 256, (4, 3, 9, 7), dtype=torch.uint8)
    one, zero = torch.ones(4), torch.zeros(4)
    for order in [(0, 1, 2, 3), (3, 2, 1, 0)]:
        assert torch.equal(color_jitter_batch(x, one, one, one, zero, order), x)
    out = apply_photometric(x, identity_photometric(4), backend)
    assert isinstance(out, torch.Tensor) and torch.equal(out, x)
    cl = x.contiguous(memory_format=torch.channels_last)  # the crops' layout: same result
    assert torch.equal(apply_photometric(cl, identity_photometric(4), backend), x)
    # Hue shifts of +1/2 and -1/2 turn are the same rotation.
    xf = torch.rand(4, 3, 9, 7)
    torch.testing.assert_close(color_jitter_batch(xf, one, one, one, zero + 0.5),
                               color_jitter_batch(xf, one, one, one, zero - 0.5))


@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue"])
def test_color_jitter_matches_torchvision(op: str) -> None:
    torch.manual_seed(0)
    x = torch.rand(6, 3, 11, 13)
    factor = {"brightness": [0.6, 0.85, 1.0, 1.2, 1.4, 0.0],
              "contrast": [0.6, 0.85, 1.0, 1.2, 1.4, 0.0],
              "saturation": [0.6, 0.85, 1.0, 1.2, 1.4, 0.0],
              "hue": [-0.5, -0.2, -0.05, 0.0, 0.13, 0.5]}[op]
    fac = torch.tensor(factor)
    one, zero = torch.ones(6), torch.zeros(6)
    args = {"brightness": (fac, one, one, zero), "contrast": (one, fac, one, zero),
            "saturation": (one, one, fac, zero), "hue": (one, one, one, fac)}[op]
    out = color_jitter_batch(x, *args)
    fn = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
          "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}[op]
    ref = torch.stack([fn(xi, f) for xi, f in zip(x, factor, strict=True)])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    # uint8 in, uint8 out: within one grey level of torchvision's uint8 path.
    xu = (x * 255).to(torch.uint8)
    out_u = color_jitter_batch(xu, *args)
    ref_u = torch.stack([fn(xi, f) for xi, f in zip(xu, factor, strict=True)])
    assert out_u.dtype == torch.uint8 and (out_u.int() - ref_u.int()).abs().max() <= 1


def test_hue_on_grey_and_primary_colours() -> None:
    """Exact HSV cases: grey is unchanged; red + 1/3 turn = green; red + 1/2 turn = cyan."""
    x = torch.tensor([[128.0, 128.0, 128.0], [255.0, 0.0, 0.0], [255.0, 0.0, 0.0]]) / 255
    x = x.view(3, 3, 1, 1)
    one = torch.ones(3)
    out = color_jitter_batch(x, one, one, one, torch.tensor([0.3, 1 / 3, 0.5]), (3,))
    torch.testing.assert_close(out.flatten(1), torch.tensor(
        [[128 / 255] * 3, [0.0, 1.0, 0.0], [0.0, 1.0, 1.0]]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_photometric_mixed_sizes_matches_per_item_torchvision(backend: str) -> None:
    """The fast path (image + patches in one blocked call, padded rows) equals torchvision's
    ops applied item by item (same order), within rounding; and equals separate calls."""
    gen = torch.Generator().manual_seed(5)
    v = Config().views
    for size in (50, 224):  # 50^2 is not a multiple of the patch size: padded rows
        image = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=gen)
        patches = torch.randint(0, 256, (9, 3, 16, 16), dtype=torch.uint8, generator=gen)
        for _ in range(3):
            p = sample_photometric(10, v, gen)
            p.grayscale[3] = True  # make sure the grayscale branch runs
            out_image, out_patches = apply_photometric([image, patches], p, backend)
            items = [image[0], *patches]
            for i, (got, x) in enumerate(zip([out_image[0], *out_patches], items, strict=True)):
                ref = photometric_reference(x, p.factors[i].tolist(), p.jitter_order,
                                            bool(p.grayscale[i]), bool(p.flip[i]))
                assert (got.float() - ref).abs().max() <= 0.51, (size, i, p.jitter_order)
            alone = apply_photometric(patches, p.index(slice(1, 10)), backend)
            assert isinstance(alone, torch.Tensor) and torch.equal(alone, out_patches)


def test_sample_photometric_ranges() -> None:
    v = Config().views
    p = sample_photometric(4000, v, torch.Generator().manual_seed(0))
    f = p.factors
    for k, s in enumerate((v.brightness, v.contrast, v.saturation)):
        assert float(f[:, k].min()) >= 1 - s and float(f[:, k].max()) <= 1 + s
    assert float(f[:, 3].abs().max()) <= v.hue
    assert abs(float(p.grayscale.float().mean()) - v.grayscale_prob) < 0.03
    assert abs(float(p.flip.float().mean()) - v.flip_prob) < 0.03
    assert sorted(p.jitter_order) == [0, 1, 2, 3]
    orders = {sample_photometric(2, v).jitter_order for _ in range(200)}
    assert len(orders) > 15  # all 24 orders occur
    off = Config().views
    off.jitter_prob = 0.0
    q = sample_photometric(50, off)
    assert torch.equal(q.factors, identity_photometric(50).factors)


# ------------------------------------------------------------------------- permutation sets
def test_maximal_hamming_permutations_properties() -> None:
    n = 100
    perms = maximal_hamming_permutations(n, grid=3, seed=0)
    assert perms.shape == (n, 9) and perms.dtype == torch.long
    assert all(sorted(row) == list(range(9)) for row in perms.tolist())
    assert len({tuple(r) for r in perms.tolist()}) == n
    assert torch.equal(perms, maximal_hamming_permutations(n, grid=3, seed=0))
    assert not torch.equal(perms, maximal_hamming_permutations(n, grid=3, seed=1))
    d = hamming_distances(perms, perms)
    d.fill_diagonal_(99)
    rand = torch.stack([torch.randperm(9, generator=torch.Generator().manual_seed(i))
                        for i in range(n)])
    dr = hamming_distances(rand, rand)
    dr.fill_diagonal_(99)
    assert int(d.min()) >= int(dr.min())
    assert int(d.min()) >= 6  # greedy max-min on all 9! candidates reaches 6 at n = 100
    # The greedy set is a prefix-stable sequence: the first k of n are the set for k.
    torch.testing.assert_close(maximal_hamming_permutations(10, seed=0), perms[:10])


def test_maximal_hamming_small_grid_and_errors() -> None:
    perms = maximal_hamming_permutations(24, grid=2, seed=0)  # all 4! permutations
    assert {tuple(r) for r in perms.tolist()} == set(itertools.permutations(range(4)))
    with pytest.raises(ValueError):
        maximal_hamming_permutations(25, grid=2)
    with pytest.raises(ValueError):
        maximal_hamming_permutations(0)
    assert math.factorial(4) == 24


# ------------------------------------------------------------------------------ transforms
@pytest.mark.parametrize("size", PRESETS)
def test_shapes_for_every_preset(size: int) -> None:
    v = _cfg(size).views
    img = _image(int(size * 1.25), int(size * 1.5), seed=1)
    P, p, S = v.grid * v.grid, v.patch, v.image_size
    out = build_train_transform(_cfg(size))(img)
    assert set(out) == {"image", "patches"}
    assert out["image"].shape == (3, S, S) and out["image"].dtype == torch.uint8
    assert out["patches"].shape == (P, 3, p, p) and out["patches"].dtype == torch.uint8
    assert out["image"].is_contiguous() and out["patches"].is_contiguous()
    rotated, r = RotationView(v)(img)
    assert rotated.shape == (3, S, S) and r in range(4)
    ev = build_eval_transform(v)(img)
    assert ev.shape == (3, S, S) and ev.dtype == torch.uint8


@pytest.mark.parametrize(("method", "pretext", "keys"), [
    ("pirl", "jigsaw", {"image", "patches"}),
    ("pirl", "rotation", {"image", "rotated"}),
    ("pirl", "jigsaw+rotation", {"image", "patches"}),
    ("jigsaw", "jigsaw", {"patches", "perm_label"}),
    ("rotation", "jigsaw", {"rotated", "rotation"}),
    ("npid", "jigsaw", {"image"}),
])
def test_train_transform_keys(method: str, pretext: str, keys: set[str]) -> None:
    cfg = _cfg(32, method=method, pretext=pretext)
    perms = maximal_hamming_permutations(5, seed=0)
    out = build_train_transform(cfg, perms if method == "jigsaw" else None)(_image(40, 40))
    assert set(out) == keys
    if "perm_label" in out:
        assert out["perm_label"].shape == () and 0 <= int(out["perm_label"]) < 5
        assert out["patches"].shape == (9, 3, 9, 9)
    if "rotation" in out:
        assert out["rotation"].shape == () and 0 <= int(out["rotation"]) < 4


def test_jigsaw_baseline_orders_patches_by_permutation() -> None:
    """Jigsaw baseline without colour: the k-th patch is cell perm[k] of the row-major cut."""
    cfg = _cfg(64, method="jigsaw", jitter_prob=0.0, grayscale_prob=0.0, flip_prob=0.0)
    perms = maximal_hamming_permutations(7, seed=0)
    tf = build_train_transform(cfg, perms)
    tf.generator = torch.Generator().manual_seed(2)  # type: ignore[attr-defined]
    assert tf.jigsaw_view is not None  # type: ignore[attr-defined]
    tf.jigsaw_view.generator = torch.Generator().manual_seed(9)  # type: ignore[attr-defined]
    img = _image(80, 80)
    out = tf(img)
    ref_view = JigsawView(cfg.views, shuffle=False, generator=torch.Generator().manual_seed(9))
    cells, order = ref_view(img)
    assert torch.equal(order, torch.arange(9))
    label = int(out["perm_label"])
    assert torch.equal(out["patches"], cells[perms[label]])


def test_eval_transform_deterministic_centre_crop() -> None:
    v = _cfg(96).views
    img = _image(130, 200)
    tf = build_eval_transform(v)
    a, b = tf(img), tf(img)
    assert torch.equal(a, b) and a.shape == (3, 96, 96)
    # Already at the resize size: the output is the exact centre crop of the input.
    sq = _image(v.eval_resize, v.eval_resize)
    off = (v.eval_resize - 96) // 2
    torch.testing.assert_close(tf(sq), _as_tensor(sq)[:, off:off + 96, off:off + 96])


def test_show_views_writes_png(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = _cfg(32)
    out = tmp_path / "views.png"
    show_views([_image(40, 48, seed=i) for i in range(3)], cfg, str(out), n=2)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_show_views_draws_from_the_runs_permutation_set(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With objective.num_pirl_permutations = 2 every drawn order is a row of the set training
    builds (permutation_set with train.seed); with 0 the orders are free (12 rows of 9! orders
    almost surely hold more than 2 distinct ones)."""
    from pirl.methods import permutation_set

    images = [_image(40, 48, seed=i) for i in range(12)]
    cfg = _cfg(32)
    cfg.objective.num_pirl_permutations = 2
    rows = {tuple(r) for r in permutation_set(cfg, seed=cfg.train.seed).tolist()}
    drawn = show_views(images, cfg, str(tmp_path / "k2.png"), n=12)
    assert len(drawn) == 12 and {tuple(o.tolist()) for o in drawn} <= rows
    cfg.objective.num_pirl_permutations = 0
    free = show_views(images, cfg, str(tmp_path / "all.png"), n=12)
    assert len({tuple(o.tolist()) for o in free}) > 2


def test_photometric_dataclass_index() -> None:
    p = sample_photometric(5, Config().views, torch.Generator().manual_seed(0))
    q = p.index(torch.tensor([4, 0]))
    assert isinstance(q, Photometric) and len(q) == 2
    assert torch.equal(q.factors[0], p.factors[4]) and q.jitter_order == p.jitter_order


# ----------------------------------------------------------- colour deferred to the batch
def _random_jobs(v: ViewConfig, gen: torch.Generator) -> list[tuple[list[torch.Tensor],
                                                                    Photometric]]:
    """Views and parameters of mixed layouts: image + patches (channels-last image, as the
    transforms make it), a single image, patches only, and jobs without jitter / grayscale."""
    def u8(*shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)

    jobs = []
    for k in range(9):
        image = u8(1, 3, 40, 40).contiguous(memory_format=torch.channels_last)
        views = [[image, u8(9, 3, 12, 12)], [u8(1, 3, 40, 40)], [u8(9, 3, 12, 12)]][k % 3]
        p = sample_photometric(sum(x.shape[0] for x in views), v, gen)
        if k == 4:  # nothing to do but copy
            p = identity_photometric(len(p))
        elif k == 5:  # grayscale only
            p = replace(identity_photometric(len(p)), grayscale=torch.ones(len(p), dtype=bool))
        else:
            p.grayscale[k % len(p)] = True
        jobs.append((views, p))
    return jobs


def test_colour_jobs_equal_one_call_per_job() -> None:
    """A batch of jobs (different layouts, orders, some with nothing to do) written into slices
    of batch tensors gives bit for bit the pixels of one apply_photometric call per job."""
    v = Config().views
    jobs = _random_jobs(v, torch.Generator().manual_seed(11))
    assert len({p.jitter_order for _, p in jobs}) > 3  # several orders in one batch
    batch = [ColourJob(views, [torch.full_like(x, 7).contiguous() for x in views], p)
             for views, p in jobs]
    colour_jobs(batch)
    for job, (views, p) in zip(batch, jobs, strict=True):
        no_flip = replace(p, flip=torch.zeros(len(p), dtype=torch.bool))
        alone = apply_photometric(views, no_flip, "torch")
        for got, ref in zip(job.outs, alone, strict=True):
            assert torch.equal(got, ref)
    # The colour did something (the identity job is a copy), and the inputs are untouched.
    assert not torch.equal(batch[0].outs[1], jobs[0][0][1])
    assert torch.equal(batch[4].outs[0], jobs[4][0][0])
    gray = batch[5].outs[0].int()
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_photometric_jobs_equal_one_call_per_job(backend: str) -> None:
    """photometric_jobs (colour and flips) on a batch of jobs written into slices of batch
    tensors: bit for bit one apply_photometric call per job, for each backend."""
    v = Config().views
    jobs = _random_jobs(v, torch.Generator().manual_seed(12))
    batch = [ColourJob(views, [torch.full_like(x, 7).contiguous() for x in views], p)
             for views, p in jobs]
    photometric_jobs(batch, backend)
    for job, (views, p) in zip(batch, jobs, strict=True):
        for got, ref in zip(job.outs, apply_photometric(views, p, backend), strict=True):
            assert torch.equal(got, ref)
    assert any(bool(p.flip.any()) for _, p in jobs)  # the flips ran too


def test_colour_jobs_rejects_mismatches() -> None:
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    p = identity_photometric(2)
    with pytest.raises(ValueError, match="parameter sets"):
        colour_jobs([ColourJob([x], [x.clone()], identity_photometric(3))])
    with pytest.raises(ValueError, match="output"):
        colour_jobs([ColourJob([x], [torch.zeros(2, 3, 4, 5, dtype=torch.uint8)], p)])
    with pytest.raises(ValueError, match="unknown colour operation"):
        colour_jobs([ColourJob([x], [x.clone()], replace(p, jitter_order=(0, 5)))])


@pytest.mark.parametrize(("method", "pretext"), [
    ("pirl", "jigsaw"), ("pirl", "rotation"), ("pirl", "jigsaw+rotation"),
    ("jigsaw", "jigsaw"), ("rotation", "jigsaw"), ("npid", "jigsaw"),
])
@pytest.mark.parametrize("size", [224, 64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_deferred_colour_collate_equals_per_sample(method: str, pretext: str, size: int,
                                                   backend: str) -> None:
    """TrainTransform(defer_colour=True) + ColourCollate gives bit for bit the batch of the
    per-sample transform + default_collate, seeded per sample as SeededViews does (images of
    different sizes; every method and pretext; each colour backend)."""
    cfg = _cfg(size, method=method, pretext=pretext, colour_backend=backend)
    perms = maximal_hamming_permutations(6, seed=0)
    now = build_train_transform(cfg, perms)
    later = build_train_transform(cfg, perms, defer_colour=True)
    images = [_image(int(size * (1.0 + 0.3 * (i % 3))), int(size * (1.5 - 0.2 * (i % 2))),
                     seed=i) for i in range(5)]
    per_sample, deferred = [], []
    for i, img in enumerate(images):
        torch.manual_seed(100 + i)
        per_sample.append({**now(img), "index": i})
        torch.manual_seed(100 + i)
        deferred.append({**later(img), "index": i})
    assert all(isinstance(d[COLOUR_KEY], DeferredColour) for d in deferred)
    reference = default_collate(per_sample)
    collate = ColourCollate(backend=backend)
    assert collate.backend == backend
    batch = collate(deferred)
    assert set(batch) == set(reference)
    for key, value in reference.items():
        assert batch[key].dtype == value.dtype and torch.equal(batch[key], value), key
    coloured = [k for k in ("image", "patches", "rotated") if k in batch]
    assert coloured and all(batch[k].is_contiguous() for k in coloured)
    # The deferred samples held the uncoloured crops: the collate did the colour.
    for k in coloured:
        raw = torch.stack([d[k].contiguous() for d in deferred])
        assert not torch.equal(raw, batch[k]), k


def test_colour_collate_with_collate_views_and_errors() -> None:
    """With collate_views as the inner collate, unreadable (None) items are dropped and counted;
    a batch mixing deferred and per-sample items is refused."""
    cfg = _cfg(32)
    later = build_train_transform(cfg, defer_colour=True)
    now = build_train_transform(cfg)
    items = [{**later(_image(40, 44, seed=i)), "index": i, "label": i % 2} for i in range(3)]
    batch = ColourCollate(collate_views)([items[0], None, items[1], items[2], None])
    assert batch["skipped"] == 2 and batch["index"].tolist() == [0, 1, 2]
    assert batch["image"].shape == (3, 3, 32, 32) and batch["patches"].shape[:2] == (3, 9)
    assert ColourCollate(collate_views)([None]) == {"skipped": 1}
    plain = [{**now(_image(40, 44)), "index": 0}]
    assert torch.equal(ColourCollate()(plain)["image"], default_collate(plain)["image"])
    with pytest.raises(ValueError, match="mixes"):
        ColourCollate()([items[0], plain[0]])
