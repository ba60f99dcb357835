"""The optional photometric operations of :mod:`pirl.kernels.colour_ops` as one compiled pass per
item (the ``numba`` colour backend; imported only when that backend runs them).

The same rules as the torch pass, in the same order (the listed operations, then the grayscale
the engine left out), on the uint8 item in place.  Posterize, solarize and equalize are integer
arithmetic and autocontrast the same float32 operations as torchvision's (a subtraction and a
division), so these equal torchvision bit for bit; sharpness sums the 3 x 3 blur in its own order
and the grayscale multiplies and adds separately, so a value whose float lands on a rounding edge
may differ from torchvision's (and the torch pass's) by one grey level: a few values in ten
thousand (``tests/test_photo_ops.py`` bounds both).  Each item is processed alone, so batched
and per-sample pixels are identical within this backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from pirl.kernels.colour_job import GRAY_WEIGHTS, ColourJob
from pirl.presets import PHOTO_OP_NAMES

F32 = np.float32
# Operation codes: positions in PHOTO_OP_NAMES (posterize, sharpness, solarize, autocontrast,
# equalize).
_CODES = {name: k for k, name in enumerate(PHOTO_OP_NAMES)}
_WR, _WG, _WB = (F32(w) for w in GRAY_WEIGHTS)
_INV255 = F32(1.0 / 255.0)
_A, _B = F32(1.0 / 13.0), F32(5.0 / 13.0)  # the smoothing kernel: 1s around a 5, over 13
_TOP, _ZERO = F32(255.0), F32(0.0)


@njit(cache=True, nogil=True)
def _autocontrast(x: np.ndarray) -> None:
    """Each channel of uint8 ``[3,H,W]`` stretched to 0..255 in place (constant ones kept)."""
    C, H, W = x.shape
    for c in range(C):
        lo, hi = 255, 0
        for y in range(H):
            for i in range(W):
                v = x[c, y, i]
                lo = min(lo, v)
                hi = max(hi, v)
        if hi == lo:
            continue
        span = F32(hi - lo) * _INV255
        flo = F32(lo)
        for y in range(H):
            for i in range(W):
                v = (F32(x[c, y, i]) - flo) / span
                x[c, y, i] = np.uint8(min(max(v, _ZERO), _TOP))  # truncates, as torch's cast


@njit(cache=True, nogil=True)
def _equalize(x: np.ndarray) -> None:
    """PIL's histogram equalisation of each channel of uint8 ``[3,H,W]``, in place."""
    C, H, W = x.shape
    hist = np.empty(256, dtype=np.int64)
    lut = np.empty(256, dtype=np.uint8)
    for c in range(C):
        hist[:] = 0
        for y in range(H):
            for i in range(W):
                hist[x[c, y, i]] += 1
        last = 255
        while hist[last] == 0:
            last -= 1
        step = (H * W - hist[last]) // 255
        if step == 0:
            continue
        before = 0
        for v in range(256):
            lut[v] = min(255, (before + step // 2) // step)
            before += hist[v]
        for y in range(H):
            for i in range(W):
                x[c, y, i] = lut[x[c, y, i]]


@njit(cache=True, nogil=True)
def _sharpness(x: np.ndarray, alpha: np.float32, tmp: np.ndarray) -> None:
    """Blend the interior of uint8 ``[3,H,W]`` with its rounded 3 x 3 smoothing, in place:
    ``v + alpha * (round(blur) - v)``, alpha = 1 - factor, clamped and truncated."""
    C, H, W = x.shape
    if H <= 2 or W <= 2:
        return
    tmp[:] = x
    for c in range(C):
        for y in range(1, H - 1):
            for i in range(1, W - 1):
                s = (_A * F32(tmp[c, y - 1, i - 1]) + _A * F32(tmp[c, y - 1, i])
                     + _A * F32(tmp[c, y - 1, i + 1]) + _A * F32(tmp[c, y, i - 1])
                     + _B * F32(tmp[c, y, i]) + _A * F32(tmp[c, y, i + 1])
                     + _A * F32(tmp[c, y + 1, i - 1]) + _A * F32(tmp[c, y + 1, i])
                     + _A * F32(tmp[c, y + 1, i + 1]))
                v = F32(tmp[c, y, i])
                out = v + alpha * (F32(np.rint(s)) - v)
                x[c, y, i] = np.uint8(min(max(out, _ZERO), _TOP))


@njit(cache=True, nogil=True)
def ops_item(x: np.ndarray, codes: np.ndarray, bits: int, factor: float, threshold: int,
             gray: bool, tmp: np.ndarray) -> None:
    """The operations ``codes`` (positions in ``PHOTO_OP_NAMES``) in order, then the grayscale
    when ``gray``, on one uint8 ``[3,H,W]`` item (C-contiguous) in place; ``tmp`` is a uint8
    workspace of its shape."""
    C, H, W = x.shape
    for code in codes:
        if code == 0:  # posterize
            mask = np.uint8((((1 << bits) - 1) << (8 - bits)) & 255)
            for c in range(C):
                for y in range(H):
                    for i in range(W):
                        x[c, y, i] &= mask
        elif code == 1:
            _sharpness(x, F32(1.0 - factor), tmp)
        elif code == 2:  # solarize; 256 changes nothing
            for c in range(C):
                for y in range(H):
                    for i in range(W):
                        if x[c, y, i] >= threshold:
                            x[c, y, i] = 255 - x[c, y, i]
        elif code == 3:
            _autocontrast(x)
        else:
            _equalize(x)
    if gray:
        for y in range(H):
            for i in range(W):
                lum = _WR * F32(x[0, y, i]) + _WG * F32(x[1, y, i]) + _WB * F32(x[2, y, i])
                v = np.uint8(lum)  # truncates, as torchvision's uint8 grayscale
                x[0, y, i] = v
                x[1, y, i] = v
                x[2, y, i] = v


def apply_ops_(jobs: Sequence[ColourJob]) -> None:
    """:func:`pirl.kernels.colour_ops.apply_ops_` for the numba backend: after the engine, the
    operations and then the grayscale of every item that gets them, in place in the outs."""
    for job in jobs:
        ops = job.params.ops
        if ops is None:
            continue
        codes = np.array([_CODES[name] for name in ops.names], dtype=np.int64)
        apply, gray = ops.apply.tolist(), job.params.grayscale.tolist()
        bits, thresholds = ops.bits.tolist(), ops.threshold.tolist()
        factors = ops.sharpness.tolist()
        i = 0
        for out in job.outs:
            dense = out if out.is_contiguous() else out.contiguous()
            arr = dense.numpy()
            tmp = np.empty(arr.shape[1:], dtype=np.uint8)
            for k in range(arr.shape[0]):
                if apply[i]:
                    ops_item(arr[k], codes, bits[i], factors[i], thresholds[i], gray[i], tmp)
                i += 1
            if dense is not out:
                out.copy_(dense)
