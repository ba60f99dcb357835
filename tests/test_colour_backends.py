"""The two implementations of the colour augmentation (``views.colour_backend``): the numba kernel
against torchvision's operations and against the torch backend, and how the backend is chosen."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF

from pirl.cli import main
from pirl.config import Config, ConfigError, validate
from pirl.data.augment import (
    Photometric,
    apply_photometric,
    identity_photometric,
    sample_photometric,
)
from pirl.kernels import colour
from pirl.kernels.colour import numba_available, photometric_jobs, resolve_colour_backend
from pirl.kernels.colour_job import GRAY_WEIGHTS, ColourJob

needs_numba = pytest.mark.skipif(not numba_available(),
                                 reason="numba not installed (pip install 'pirl[fast]')")


def test_ci_installs_numba() -> None:
    """CI installs the dev extra, which holds numba: there the numba tests must run, not skip."""
    if os.environ.get("CI") == "true":
        assert numba_available(), "CI=true but numba is missing: the numba tests would skip"


def _jobs(gen: torch.Generator, n_jobs: int = 12) -> list[tuple[list[torch.Tensor], Photometric]]:
    """Jobs like the training transform's (a channels-last image view and 9 patches, one order
    per job) plus planar views and odd sizes, with the paper's strengths and hue up to 1/2."""
    v = Config().views
    v.hue = 0.5
    jobs = []
    for k in range(n_jobs):
        image = torch.randint(0, 256, (1, 37 + k, 41, 3), dtype=torch.uint8,
                              generator=gen).permute(0, 3, 1, 2)
        patches = torch.randint(0, 256, (9, 3, 13, 11), dtype=torch.uint8, generator=gen)
        views = [image, patches] if k % 3 else [patches.contiguous(
            memory_format=torch.channels_last)]
        p = sample_photometric(sum(x.shape[0] for x in views), v, gen)
        p.grayscale[k % len(p)] = True
        jobs.append((views, p))
    return jobs


@needs_numba
def test_numba_and_torch_backends_agree() -> None:
    """Same views, same parameters: the backends differ by at most one grey level, on a few
    values in a million (float rounding: another summation order of the same formulas)."""
    diffs, total = 0, 0
    for views, p in _jobs(torch.Generator().manual_seed(0)):
        a = apply_photometric(views, p, "torch")
        b = apply_photometric(views, p, "numba")
        for x, y in zip(a, b, strict=True):
            d = (x.int() - y.int()).abs()
            assert int(d.max()) <= 1
            diffs += int((d > 0).sum())
            total += d.numel()
    assert diffs <= total * 1e-4, (diffs, total)


@needs_numba
@pytest.mark.parametrize("turns", [i / 24 - 0.5 for i in range(25)] + [0.013, -0.37, 0.49])
def test_numba_hue_every_case_matches_torchvision(turns: float) -> None:
    """Every rotation / direction case of the kernel's hue (shifts on a 1/24-turn grid hit the
    sextant boundaries exactly), grey pixels and ties included, against torchvision's rgb -> hsv
    -> rgb on the same uint8 pixels: the kernel's result is torchvision's rounded."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (1, 3, 10, 20), dtype=torch.uint8, generator=g)
    x[0, :, 0, :4] = torch.tensor([[128, 128, 128], [255, 255, 0], [51, 179, 179],
                                   [77, 77, 230]], dtype=torch.uint8).t()
    p = Photometric(torch.tensor([[1.0, 1.0, 1.0, turns]]), torch.zeros(1, dtype=torch.bool),
                    torch.zeros(1, dtype=torch.bool))
    out = apply_photometric(x, p, "numba")
    ref = TF.adjust_hue(x[0].float() / 255.0, turns) * 255.0
    assert (out[0].float() - ref).abs().max() <= 0.5 + 1e-3


@needs_numba
def test_numba_contrast_uses_the_whole_item_mean() -> None:
    """Contrast blends with the mean luma of the whole item (not of a row): an image whose top
    half is black and bottom half white, contrast 0 (every pixel = the mean), no other op."""
    x = torch.zeros(1, 3, 8, 6, dtype=torch.uint8)
    x[0, :, 4:] = 255
    p = Photometric(torch.tensor([[1.0, 0.0, 1.0, 0.0]]), torch.zeros(1, dtype=torch.bool),
                    torch.zeros(1, dtype=torch.bool))
    mean = 0.5 * 255 * sum(GRAY_WEIGHTS)
    for backend in ("numba", "torch"):
        out = apply_photometric(x, p, backend)
        assert torch.equal(out, torch.full_like(x, round(mean))), backend


@needs_numba
def test_numba_flip_grayscale_and_strided_outputs() -> None:
    """Flips and grayscale land where they should when the outputs are slices of a batch tensor
    (the collate writes the batch in place)."""
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.uint8).view(2, 3, 4, 5) * 2
    batch = torch.zeros(3, 2, 3, 4, 5, dtype=torch.uint8)
    p = replace_flags(identity_photometric(2), gray=[False, True], flip=[True, False])
    photometric_jobs([ColourJob([x], [batch[1]], p)], "numba")
    assert torch.equal(batch[1, 0], x[0].flip(-1))
    luma = sum(w * x[1, c].double() for c, w in enumerate(GRAY_WEIGHTS))
    assert (batch[1, 1].double() - luma).abs().max() <= 0.5 + 1e-6
    assert torch.equal(batch[1, 1, 0], batch[1, 1, 2])
    assert not batch[0].any() and not batch[2].any()  # the other slices are untouched
    # A non-contiguous output (every other column of a wider tensor) gets the same pixels.
    wide = torch.zeros(2, 3, 4, 10, dtype=torch.uint8)
    photometric_jobs([ColourJob([x], [wide[..., ::2]], p)], "numba")
    assert torch.equal(wide[..., ::2], batch[1]) and not wide[..., 1::2].any()


def replace_flags(p: Photometric, gray: list[bool], flip: list[bool]) -> Photometric:
    return Photometric(p.factors, torch.tensor(gray), torch.tensor(flip), p.jitter_order)


def test_backend_resolution_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_colour_backend("torch") == "torch"
    assert resolve_colour_backend("auto") == ("numba" if numba_available() else "torch")
    with pytest.raises(ValueError, match="colour_backend='cuda'"):
        resolve_colour_backend("cuda")
    cfg = Config()
    cfg.views.colour_backend = "fast"
    with pytest.raises(ConfigError, match="views.colour_backend='fast'"):
        validate(cfg)
    # Without numba: auto falls back to torch, and asking for numba says how to install it.
    monkeypatch.setattr(colour, "numba_available", lambda: False)
    assert resolve_colour_backend("auto") == "torch"
    with pytest.raises(ValueError, match=r"pip install 'pirl\[fast\]'"):
        resolve_colour_backend("numba")
    x = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs numba"):
        apply_photometric(x, identity_photometric(1), "numba")
    assert torch.equal(apply_photometric(x, identity_photometric(1), "auto"), x)


def test_cli_names_the_key_when_numba_is_missing(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    """`pirl pretrain ... colour_backend=numba` without numba: a one-line error (exit 2) that
    names the key and the fix, before the run folder is created."""
    monkeypatch.setattr(colour, "numba_available", lambda: False)
    code = main(["pretrain", "--data", "synthetic", "--preset", "demo", "--epochs", "1",
                 "--out", str(tmp_path / "run"), "views.colour_backend=numba"])
    err = capsys.readouterr().err
    assert code == 2
    assert "views.colour_backend='numba' needs numba" in err and "pirl[fast]" in err
    assert not (tmp_path / "run").exists()  # nothing written: the fixed command starts clean
