"""The plain colour augmentation the colour engines are tested against: torchvision's functional
operations on one image at a time, in float, with no rounding.

:mod:`pirl.kernels.colour_torch` and :mod:`pirl.kernels.colour_numba` compute the same result for
many views at once and round it to uint8; they agree with this to within rounding
(``tests/test_views.py``).
"""

from __future__ import annotations

import torchvision.transforms.functional as TF
from torch import Tensor


def photometric_reference(x: Tensor, factors: list[float], order: tuple[int, ...], gray: bool,
                          flip: bool) -> Tensor:
    """Flip, colour jitter and grayscale of one image, as torchvision does them.

    Args:
        x: uint8 ``[3,H,W]``.
        factors: ``[brightness, contrast, saturation, hue]`` (torchvision's ``ColorJitter``
            factors; hue is a shift in turns).
        order: the jitter operations (0 brightness, 1 contrast, 2 saturation, 3 hue) in the order
            they are applied.
        gray: whether the result is turned to grayscale (after the jitter).
        flip: whether the image is flipped horizontally (first).

    Returns float32 ``[3,H,W]`` in 0..255 (not rounded).
    """
    y = x.float() / 255.0
    if flip:
        y = y.flip(-1)
    for op in order:
        if op == 0:
            y = TF.adjust_brightness(y, factors[0])
        elif op == 1:
            y = TF.adjust_contrast(y, factors[1])
        elif op == 2:
            y = TF.adjust_saturation(y, factors[2])
        else:
            y = TF.adjust_hue(y, factors[3])
    if gray:
        y = TF.rgb_to_grayscale(y, 3)
    return y * 255.0
