"""The optional photometric operations (``views.photometric_ops``: posterize, sharpness,
solarize, autocontrast, equalize) against torchvision's ``v2.functional`` and PIL, through both
colour backends, and the batched = per-sample guarantee with them on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF2
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import default_collate

from pirl import config as C
from pirl.data.augment import Photometric, apply_photometric, sample_photometric
from pirl.data.views import ColourCollate
from pirl.kernels import colour_ops as O
from pirl.kernels.colour import numba_available
from pirl.kernels.colour_job import ColourJob, OpParams
from pirl.methods import build_train_transform
from pirl.presets import RELEASE_PHOTO_OPS, photo_ops, view_preset

BACKENDS = ["torch", pytest.param("numba", marks=pytest.mark.skipif(
    not numba_available(), reason="numba not installed (pip install 'pirl[fast]')"))]


def _images(n: int, h: int = 23, w: int = 19, seed: int = 0) -> torch.Tensor:
    """uint8 [n,3,h,w]: noise over a narrow random range per image and channel (so that
    autocontrast and equalize have something to stretch), with a flat channel in image 0."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.randint(0, 120, (n, 3, 1, 1), generator=g)
    span = torch.randint(1, 120, (n, 3, 1, 1), generator=g)
    x = (lo + torch.rand(n, 3, h, w, generator=g) * span).to(torch.uint8)
    x[0, 1] = 77
    return x


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def _from_pil(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def _agree(got: torch.Tensor, want: torch.Tensor, exact: bool) -> bool:
    """Bit for bit, or (numba's float blur and grayscale: another order of the same float
    operations) at most one grey level on at most one value in a thousand."""
    d = (got.int() - want.int()).abs()
    if exact:
        return bool(torch.equal(got, want))
    return int(d.max()) <= 1 and int((d > 0).sum()) <= max(1, d.numel() // 1000)


def _ops(names: tuple[str, ...], n: int, bits: int = 5, factor: float = 1.0,
         threshold: int = 128) -> OpParams:
    return OpParams(names, torch.ones(n, dtype=torch.bool), torch.full((n,), bits),
                    torch.full((n,), factor, dtype=torch.float64), torch.full((n,), threshold))


# (name, parameters, torchvision on uint8 [3,H,W], PIL, largest difference allowed from PIL)
CASES = [
    ("posterize", {"bits": 4}, lambda x: TF2.posterize(x, 4), lambda p: ImageOps.posterize(p, 4),
     0),
    ("posterize", {"bits": 7}, lambda x: TF2.posterize(x, 7), lambda p: ImageOps.posterize(p, 7),
     0),
    ("solarize", {"threshold": 90}, lambda x: TF2.solarize(x, 90.0),
     lambda p: ImageOps.solarize(p, 90), 0),
    ("solarize", {"threshold": 0}, lambda x: TF2.solarize(x, 0.0),
     lambda p: ImageOps.solarize(p, 0), 0),
    ("solarize", {"threshold": 256}, lambda x: x, lambda p: ImageOps.solarize(p, 256), 0),
    ("autocontrast", {}, TF2.autocontrast, ImageOps.autocontrast, 1),
    ("equalize", {}, TF2.equalize, ImageOps.equalize, 0),
    # PIL's smoothing filter rounds in integers and its blend differently: 1 grey level.
    ("sharpness", {"factor": 0.1}, lambda x: TF2.adjust_sharpness(x, 0.1),
     lambda p: ImageEnhance.Sharpness(p).enhance(0.1), 1),
    ("sharpness", {"factor": 1.9}, lambda x: TF2.adjust_sharpness(x, 1.9),
     lambda p: ImageEnhance.Sharpness(p).enhance(1.9), 1),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "kw", "tv", "pil", "pil_tol"), CASES,
                         ids=[f"{c[0]}-{next(iter(c[1].values()), '')}" for c in CASES])
def test_each_op_through_the_pipeline_equals_torchvision_and_pil(
        backend: str, name: str, kw: dict, tv, pil, pil_tol: int) -> None:
    """One operation, no jitter, no grayscale: apply_photometric (the batched call of training)
    gives torchvision's result bit for bit on every image, flipped ones included (numba's
    sharpness: within float rounding, see :func:`_agree`), and PIL's within ``pil_tol``."""
    x = _images(6)
    n = len(x)
    flip = torch.tensor([i % 2 == 1 for i in range(n)])
    p = Photometric(torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(n, 1),
                    torch.zeros(n, dtype=torch.bool), flip, ops=_ops((name,), n, **kw))
    got = apply_photometric(x, p, backend)
    for i in range(n):
        src = x[i].flip(-1) if flip[i] else x[i]
        want = tv(src)
        assert _agree(got[i], want, backend == "torch" or name != "sharpness"), (name, i)
        ref = _from_pil(pil(_pil(src)))
        assert int((got[i].int() - ref.int()).abs().max()) <= pil_tol, (name, i)


@pytest.mark.parametrize("backend", BACKENDS)
def test_release_ops_come_after_the_jitter_and_before_the_grayscale(backend: str) -> None:
    """The release's order: jitter (the engine, rounded), posterize, sharpness, solarize,
    autocontrast, then grayscale (torchvision's, on uint8); items whose coin says no get the
    jitter and grayscale only, as the engine does them without operations."""
    x = _images(8, seed=1)
    cfg = C.Config().views
    torch.manual_seed(0)
    p = sample_photometric(8, cfg)
    p.grayscale[:] = torch.tensor([True, False] * 4)
    n = len(x)
    ops = OpParams(RELEASE_PHOTO_OPS, torch.tensor([True] * 5 + [False] * 3),
                   torch.arange(n) % 5 + 4, torch.linspace(0.1, 1.9, n, dtype=torch.float64),
                   torch.tensor([0, 30, 100, 200, 255, 256, 7, 9]))
    with_ops = Photometric(p.factors, p.grayscale, p.flip, p.jitter_order, ops)
    got = apply_photometric(x, with_ops, backend)
    no_gray = Photometric(p.factors, torch.zeros(n, dtype=torch.bool), p.flip, p.jitter_order)
    jittered = apply_photometric(x, no_gray, backend)
    plain = apply_photometric(x, p, backend)
    for i in range(n):
        if not ops.apply[i]:
            assert torch.equal(got[i], plain[i]), i
            continue
        y = TF2.posterize(jittered[i], int(ops.bits[i]))
        y = TF2.adjust_sharpness(y, float(ops.sharpness[i]))
        y = TF2.solarize(y, float(ops.threshold[i])) if ops.threshold[i] < 256 else y
        y = TF2.autocontrast(y)
        if p.grayscale[i]:
            y = TF2.rgb_to_grayscale(y, num_output_channels=3)
        assert _agree(got[i], y, backend == "torch"), i


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_equals_per_sample_with_ops_on(backend: str) -> None:
    """TrainTransform(defer_colour=True) + ColourCollate = the per-sample transform, bit for bit,
    with the release's operations (and equalize) on; the draws are the same in both modes."""
    cfg = C.Config()
    C.apply_mapping(cfg, {**view_preset(32), "photometric_ops":
                          "posterize,sharpness,solarize,autocontrast,equalize",
                          "photometric_prob": 0.7, "colour_backend": backend})
    now = build_train_transform(cfg)
    later = build_train_transform(cfg, defer_colour=True)
    per_sample, deferred = [], []
    for i in range(4):
        img = _pil(_images(1, 40 + 3 * i, 44, seed=i)[0])
        torch.manual_seed(100 + i)
        per_sample.append({**now(img), "index": i})
        torch.manual_seed(100 + i)
        deferred.append({**later(img), "index": i})
    assert deferred[0]["deferred_colour"].jobs[0][1].ops is not None
    reference = default_collate(per_sample)
    batch = ColourCollate(backend=backend)(deferred)
    for key, value in reference.items():
        assert torch.equal(batch[key], value), key


def test_off_by_default_and_the_draw_of_the_parameters() -> None:
    """Off (paper preset): no parameters, and the jitter draws what it drew before; on: the
    release's magnitudes (bits 4..8, factor in [0.1, 1.9], threshold 0..256, the coin)."""
    cfg = C.Config().views
    g = torch.Generator().manual_seed(3)
    off = sample_photometric(500, cfg, g)
    assert off.ops is None
    cfg.photometric_ops, cfg.photometric_prob = "release", 0.66
    g = torch.Generator().manual_seed(3)
    on = sample_photometric(500, cfg, g)
    assert torch.equal(on.factors, off.factors) and on.jitter_order == off.jitter_order
    ops = on.ops
    assert ops is not None and ops.names == RELEASE_PHOTO_OPS
    assert set(ops.bits.tolist()) == {4, 5, 6, 7, 8}
    assert float(ops.sharpness.min()) >= 0.1 and float(ops.sharpness.max()) <= 1.9
    assert int(ops.threshold.min()) >= 0 and int(ops.threshold.max()) <= 256
    assert 0.58 < float(ops.apply.double().mean()) < 0.74
    assert on.index(torch.tensor([3, 1])).ops.bits.tolist() == ops.bits[[3, 1]].tolist()


def test_ops_names_are_checked() -> None:
    assert photo_ops("") == () and photo_ops("release") == RELEASE_PHOTO_OPS
    assert photo_ops(" equalize , solarize") == ("equalize", "solarize")
    cfg = C.Config()
    for bad in ("blur", "solarize,solarize"):
        cfg.views.photometric_ops = bad
        with pytest.raises(C.ConfigError, match="views.photometric_ops"):
            C.validate(cfg)
    cfg.views.photometric_ops = "release"
    cfg.views.photometric_prob = 1.5
    with pytest.raises(C.ConfigError, match="views.photometric_prob"):
        C.validate(cfg)


def test_grayscale_matches_torchvision() -> None:
    x = _images(3)
    for i in range(3):
        assert torch.equal(O.grayscale(x[i]), TF2.rgb_to_grayscale(x[i], num_output_channels=3))


@pytest.mark.skipif(not numba_available(), reason="numba not installed (pip install 'pirl[fast]')")
def test_numba_pass_agrees_with_the_torch_pass_on_many_pixels() -> None:
    """Every operation and the grayscale on 64 x 64 noise, numba against torch, item by item:
    the integer operations and autocontrast bit for bit, everything within :func:`_agree`."""
    from pirl.kernels.colour_ops_numba import apply_ops_ as numba_ops

    x = _images(12, 64, 64, seed=4)
    n = len(x)
    g = torch.Generator().manual_seed(4)
    names = ("equalize", "autocontrast", "posterize", "solarize", "sharpness")
    ops = OpParams(names, torch.rand(n, generator=g) < 0.8, torch.randint(4, 9, (n,), generator=g),
                   0.1 + 1.8 * torch.rand(n, generator=g, dtype=torch.float64),
                   torch.randint(0, 257, (n,), generator=g))
    p = Photometric(torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(n, 1),
                    torch.rand(n, generator=g) < 0.5, torch.zeros(n, dtype=torch.bool), ops=ops)
    a, b = x.clone(), x.clone()
    O.apply_ops_([ColourJob([x], [a], p)])
    numba_ops([ColourJob([x], [b], p)])
    assert _agree(a, b, exact=False)
    for i in range(n):
        if not ops.apply[i]:
            assert torch.equal(a[i], x[i]) and torch.equal(b[i], x[i])
