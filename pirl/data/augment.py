"""Tensor primitives of the views: uint8 conversion, random resized crops, photometric parameters.

Everything here works on uint8 ``[3,H,W]`` / ``[B,3,H,W]`` tensors so that one decoded image is
converted once and then cropped, resized and colour-augmented without returning to PIL.  The
colour augmentation of many views (a sample's image view and 9 jigsaw patches) is a single call
with per-item random factors (:func:`apply_photometric`), and the views of a whole batch of
samples, each sample with its own parameters, are one call too
(:func:`pirl.kernels.colour.photometric_jobs`, which the training DataLoader's collate function
runs): that is what makes the jigsaw pipeline fast (see ``benchmarks/views.py``).  A batch gives
bit for bit the pixels of one call per sample.  The colour engines that do it (``torch`` and
``numba``, ``views.colour_backend``) live in :mod:`pirl.kernels`; they agree to float rounding.

Randomness comes from ``torch``'s generator (the global one unless a ``torch.Generator`` is
passed), so DataLoader workers, which torch seeds one by one, draw different views.

Differences from ``torchvision.transforms.ColorJitter`` (all deliberate, all small):

* torchvision draws a new order of the four operations for every view; here one random order is
  drawn per :class:`Photometric` (a sample's views) and shared by its items (the items still get
  independent factors, grayscale and flip).  The training transform colours a sample's image view
  and its 9 patches together, so those 10 views share one order (samples differ, also when a batch
  of samples is coloured in one call).
* torchvision's uint8 tensor path converts back to uint8 (truncating) after every operation; here
  the pixels stay float32 between operations and are rounded once at the end (closer to the exact
  result; differences are at most a few grey levels).
* Hue is shifted with a closed-form HSV -> RGB formula
  (:func:`pirl.kernels.colour_torch._shift_hue`), which equals torchvision's rgb -> hsv -> rgb
  round trip up to float rounding, in about half the operations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import overload

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from pirl.config import ViewConfig
from pirl.kernels.colour import photometric_jobs
from pirl.kernels.colour_job import ColourJob, OpParams
from pirl.presets import photo_ops

# Aspect-ratio range of every random resized crop (the usual 3/4 .. 4/3).
RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)

ImageLike = Image.Image | Tensor


def to_uint8_tensor(img: ImageLike) -> Tensor:
    """PIL image (any mode) or uint8 ``[3,H,W]`` tensor -> uint8 ``[3,H,W]``.

    The result of a PIL conversion is an ``HWC`` buffer seen as ``CHW`` (channels-last strides):
    no copy, and exactly the layout in which torch's uint8 antialiased resize is fastest.
    """
    if isinstance(img, Tensor):
        if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"expected a uint8 [3,H,W] tensor, got {img.dtype} "
                             f"{list(img.shape)}")
        return img
    if img.mode != "RGB":
        img = img.convert("RGB")
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def _uniform(generator: torch.Generator | None, *shape: int) -> Tensor:
    return torch.rand(*shape, generator=generator)


def sample_crop_box(height: int, width: int, scale: tuple[float, float],
                    generator: torch.Generator | None = None,
                    ratio: tuple[float, float] = RATIO_RANGE) -> tuple[int, int, int, int]:
    """A random resized crop box ``(top, left, h, w)`` inside a ``height x width`` image.

    The standard Inception-style sampling: area fraction uniform in ``scale``, aspect ratio
    log-uniform in ``ratio``; up to 10 tries, then a centre crop with the ratio clamped to the
    range (the same rule as torchvision's ``RandomResizedCrop``).
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    # One generator call for all tries: (scale, log-ratio, top, left) uniforms per try.
    u = _uniform(generator, 10, 4).tolist()
    for us, ur, ut, ul in u:
        target = area * (scale[0] + (scale[1] - scale[0]) * us)
        aspect = math.exp(log_lo + (log_hi - log_lo) * ur)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(ut * (height - h + 1)), height - h)
            left = min(int(ul * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, antialiased resize of uint8 ``[3,H,W]`` (or ``[B,3,H,W]``) to ``size = (h, w)``.

    torch's uint8 path matches PIL's bilinear filter to within a grey level and is faster than
    PIL, *if* its input is a dense channels-last block: a crop of a decoded
    image is not (its rows are strided), and handing it over as is costs twice as much as
    copying it into one first.  The result is channels-last (strides ``(1, 3w, 3)``); callers
    that need planar memory call ``.contiguous()``.
    """
    batched = x.dim() == 4
    xb = x if batched else x.unsqueeze(0)
    if tuple(xb.shape[-2:]) == tuple(size):
        out = xb
    else:
        xb = xb.contiguous(memory_format=torch.channels_last)
        out = F.interpolate(xb, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out if batched else out[0]


def resized_crop(x: Tensor, box: tuple[int, int, int, int], size: int) -> Tensor:
    """Crop ``box = (top, left, h, w)`` out of uint8 ``[3,H,W]`` and resize to ``[3,size,size]``."""
    top, left, h, w = box
    return resize(x[:, top:top + h, left:left + w], (size, size))


@dataclass
class Photometric:
    """Per-item photometric parameters of one batched call (B items).

    ``factors[i] = (brightness, contrast, saturation, hue)`` follow torchvision's ColorJitter:
    the first three are multiplicative factors (1 = unchanged), hue is a shift in turns (0 =
    unchanged, in [-0.5, 0.5]).  ``jitter_order`` lists the operations (0 brightness,
    1 contrast, 2 saturation, 3 hue) in the order they are applied to every item of the call.
    The colour engines read it as a :class:`pirl.kernels.colour_job.ColourParams`.
    """

    factors: Tensor  # float [B, 4]
    grayscale: Tensor  # bool [B]
    flip: Tensor  # bool [B] horizontal flip
    jitter_order: tuple[int, ...] = (0, 1, 2, 3)
    ops: OpParams | None = None  # the optional operations (views.photometric_ops); None: off

    def __len__(self) -> int:
        return int(self.factors.shape[0])

    @property
    def brightness(self) -> Tensor:
        return self.factors[:, 0]

    @property
    def contrast(self) -> Tensor:
        return self.factors[:, 1]

    @property
    def saturation(self) -> Tensor:
        return self.factors[:, 2]

    @property
    def hue(self) -> Tensor:
        return self.factors[:, 3]

    def index(self, idx: Tensor | slice) -> Photometric:
        """The parameters of items ``idx`` (Long [K] or a slice), same jitter order."""
        return replace(self, factors=self.factors[idx], grayscale=self.grayscale[idx],
                       flip=self.flip[idx], ops=None if self.ops is None else self.ops.index(idx))


def identity_photometric(n: int) -> Photometric:
    """Parameters that leave ``n`` items unchanged."""
    no = torch.zeros(n, dtype=torch.bool)
    return Photometric(_IDENTITY.repeat(n, 1), no, no.clone())


_IDENTITY = torch.tensor([1.0, 1.0, 1.0, 0.0])


def sample_photometric(n: int, cfg: ViewConfig,
                       generator: torch.Generator | None = None) -> Photometric:
    """Independent photometric parameters for ``n`` items from the config's strengths.

    Each item: with probability ``jitter_prob`` colour jitter with brightness / contrast /
    saturation factors uniform in ``[max(0, 1 - s), 1 + s]`` and hue shift uniform in
    ``[-hue, hue]`` (otherwise the identity factors); grayscale with ``grayscale_prob``; a
    horizontal flip with ``flip_prob``.  One random order of the four jitter operations per call.
    With ``photometric_ops`` set, then the parameters of those operations (:func:`sample_ops`).
    """
    # One generator call for all the random numbers; the arithmetic on ~60 floats is cheaper in
    # Python than as a dozen tiny tensor ops.
    u = _uniform(generator, n, 8).tolist()
    strengths = (cfg.brightness, cfg.contrast, cfg.saturation)
    lo = [max(0.0, 1.0 - st) for st in strengths] + [-cfg.hue]
    width = [1.0 + st - max(0.0, 1.0 - st) for st in strengths] + [2.0 * cfg.hue]
    factors = [[lo[k] + width[k] * row[1 + k] for k in range(4)]
               if row[0] < cfg.jitter_prob else [1.0, 1.0, 1.0, 0.0] for row in u]
    flags = torch.tensor([[row[5] < cfg.grayscale_prob, row[6] < cfg.flip_prob] for row in u],
                         dtype=torch.bool).view(n, 2)
    # The order: argsort of 4 uniforms is a uniform random permutation.
    first = u[0][7] if n else 0.0
    keys = [first, *(_uniform(generator, 3).tolist())]
    order = tuple(sorted(range(4), key=keys.__getitem__))
    names = photo_ops(cfg.photometric_ops)
    # Drawn after everything else and only when on, so that a run without them draws the same
    # numbers as before they existed.
    ops = sample_ops(n, names, cfg.photometric_prob, generator) if names else None
    return Photometric(torch.tensor(factors, dtype=torch.float32).view(n, 4), flags[:, 0],
                       flags[:, 1], order, ops)


def sample_ops(n: int, names: tuple[str, ...], prob: float,
               generator: torch.Generator | None = None) -> OpParams:
    """Parameters of the optional operations ``names`` for ``n`` items, with the magnitudes of
    the authors' release: each item gets all of them with probability ``prob``; posterize keeps
    4..8 bits, sharpness factor uniform in [0.1, 1.9], solarize threshold 0..256 (uniform
    integers, both ends included)."""
    u = _uniform(generator, n, 4).double()  # [n, 4]: coin, bits, sharpness, threshold
    return OpParams(names, u[:, 0] < prob, 4 + (u[:, 1] * 5).long().clamp_(max=4),
                    0.1 + 1.8 * u[:, 2], (u[:, 3] * 257).long().clamp_(max=256))


@overload
def apply_photometric(x: Tensor, p: Photometric, backend: str = "auto") -> Tensor: ...
@overload
def apply_photometric(x: Sequence[Tensor], p: Photometric, backend: str = "auto"
                      ) -> list[Tensor]: ...
def apply_photometric(x: Tensor | Sequence[Tensor], p: Photometric, backend: str = "auto"
                      ) -> Tensor | list[Tensor]:
    """Flip, colour-jitter and grayscale uint8 views, each item with its own parameters, as one
    batched computation (:func:`pirl.kernels.colour.photometric_jobs` with one job and
    ``backend``).

    ``x`` is a uint8 ``[B,3,H,W]`` batch or a list of such batches of different sizes (e.g. the
    image view ``[1,3,224,224]`` and the jigsaw patches ``[9,3,64,64]``), planar or channels-last;
    ``p`` holds one parameter set per item over all of them, in order.  Returns new contiguous
    uint8 tensors shaped like the inputs.  Per item as in the standard pipeline: (flip,) colour
    jitter, grayscale.  The flip is applied to the result: it commutes with every colour operation
    (they act on each pixel, and contrast's mean does not depend on the pixel order).
    """
    views = [x] if isinstance(x, Tensor) else list(x)
    outs = [torch.empty(v.shape, dtype=torch.uint8, device=v.device) for v in views]
    photometric_jobs([ColourJob(views, outs, p)], backend)
    return outs[0] if isinstance(x, Tensor) else outs
