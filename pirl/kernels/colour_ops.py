"""The optional photometric operations (posterize, sharpness, solarize, autocontrast, equalize)
and the grayscale that follows them, on uint8 views, one item at a time.

Why a pass of its own: the colour engines keep the jitter's pixels in float and round once, but
these operations are defined on uint8 pixels (torchvision's and PIL's references are integer
look-up tables, or round the blur to uint8), so they run on the engines' uint8 output.  The
authors' release applies them after the colour jitter and before the random grayscale, so when
an item gets them (one coin per item) the engines leave its grayscale out
(:func:`without_grayscale`) and :func:`apply_ops_` does it here, after them, as torchvision's
``rgb_to_grayscale`` on uint8 (truncating); an item whose coin says no is coloured exactly as
with the operations off.  The flip that the engines have already applied commutes with all of
it (each operation acts on a pixel, a 3 x 3 symmetric neighbourhood or a whole-image histogram;
the blur's float sums up to rounding).

Each item is processed on its own, with the same torch calls whichever batch it arrives in,
so a batch of jobs gives bit for bit the pixels of one call per item; the engine (torch or
numba) only computes the jitter before.  Against the references (``tests/test_photo_ops.py``):
every operation is torchvision's ``v2.functional`` on uint8, so the torch backend is the reference
itself; against PIL, posterize, solarize and equalize are exact, autocontrast and sharpness (an
integer-rounded smoothing filter) within 1 grey level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torchvision.transforms.v2.functional as TF
from torch import Tensor

from pirl.kernels.colour_job import ColourJob, ColourParams, OpParams


def posterize(x: Tensor, bits: int) -> Tensor:
    """Keep the top ``bits`` (0..8) bits of every uint8 value of ``x``."""
    return TF.posterize(x, bits)


def solarize(x: Tensor, threshold: int) -> Tensor:
    """Invert (255 - v) every uint8 value ``v >= threshold``; 256 changes nothing."""
    if threshold > 255:  # torchvision refuses a threshold above the dtype's maximum
        return x
    return TF.solarize(x, threshold)


def autocontrast(x: Tensor) -> Tensor:
    """Stretch each channel of uint8 ``[3,H,W]`` to 0..255 (a constant channel stays)."""
    return TF.autocontrast(x)


def equalize(x: Tensor) -> Tensor:
    """Histogram equalisation of each channel of uint8 ``[3,H,W]`` (PIL's rule)."""
    return TF.equalize(x)


def sharpness(x: Tensor, factor: float) -> Tensor:
    """Blend uint8 ``[3,H,W]`` with its 3 x 3 smoothing by ``factor`` (0 = smooth, 1 =
    unchanged, 2 = sharper)."""
    return TF.adjust_sharpness(x, factor)


def grayscale(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma of uint8 ``[3,H,W]`` (truncated), on the 3 channels."""
    return TF.rgb_to_grayscale(x, num_output_channels=3)


def apply_item(x: Tensor, ops: OpParams, i: int, gray: bool) -> Tensor:
    """Item ``i``'s operations, then its grayscale (when ``gray``), on uint8 ``[3,H,W]``;
    returns a new tensor.  Only for items with ``ops.apply[i]``: the others are the engine's."""
    for name in ops.names:
        if name == "posterize":
            x = posterize(x, int(ops.bits[i]))
        elif name == "solarize":
            x = solarize(x, int(ops.threshold[i]))
        elif name == "sharpness":
            x = sharpness(x, float(ops.sharpness[i]))
        elif name == "autocontrast":
            x = autocontrast(x)
        else:
            x = equalize(x)
    return grayscale(x) if gray else x


@dataclass
class _NoGray:
    """A job's parameters with the grayscale of the items that get the operations left out (it
    comes after them)."""

    inner: ColourParams
    ops: OpParams

    @property
    def factors(self) -> Tensor:
        return self.inner.factors

    @property
    def grayscale(self) -> Tensor:
        return self.inner.grayscale & ~self.ops.apply

    @property
    def flip(self) -> Tensor:
        return self.inner.flip

    @property
    def jitter_order(self) -> tuple[int, ...]:
        return self.inner.jitter_order

    def __len__(self) -> int:
        return len(self.inner)


def without_grayscale(jobs: Sequence[ColourJob]) -> list[ColourJob]:
    """The jobs as the colour engines must run them: the items that get operations lose their
    grayscale (:func:`apply_ops_` does it after the operations); the rest is unchanged, so an
    item whose coin says no is coloured exactly as with the operations off."""
    out = []
    for j in jobs:
        ops = j.params.ops
        out.append(j if ops is None else ColourJob(j.sources, j.outs, _NoGray(j.params, ops)))
    return out


def apply_ops_(jobs: Sequence[ColourJob]) -> None:
    """After the engine: the operations and then the grayscale of every item of the jobs that
    have operations, in place in their outs."""
    for job in jobs:
        ops = job.params.ops
        if ops is None:
            continue
        gray, apply = job.params.grayscale.tolist(), ops.apply.tolist()
        i = 0
        for out in job.outs:
            for item in out:  # [3,H,W] views into the job's output
                if apply[i]:
                    item.copy_(apply_item(item, ops, i, gray[i]))
                i += 1
