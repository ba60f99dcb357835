"""The colour augmentation as one compiled pass per view row (the ``numba`` colour backend).

Imported only when the backend is used (``pip install pirl[fast]``).  The import compiles the
kernel the first time (seconds; numba caches it on disk next to this file, or in its user cache
where this folder is read-only) and later loads it from that cache.

:func:`photometric_jobs` here is :func:`pirl.kernels.colour.photometric_jobs` for this backend
(what :func:`pirl.kernels.colour_torch.colour_jobs` and
:func:`pirl.kernels.colour_torch.flip_job_outputs_` do), with the same formulas (torchvision's
``ColorJitter`` operations, the closed-form hue of :func:`pirl.kernels.colour_torch._shift_hue`,
grayscale after the jitter, round half to even once at the end), so the two backends agree to
float rounding: a few pixel values in a million differ by one grey level
(``tests/test_colour_backends.py``); ``tests/test_views.py`` checks both against the plain
reference, :mod:`pirl.kernels.colour_reference`.

Why it is faster than the torch backend: every operation runs over one image row (at most a few
kB, in L1) inside one compiled loop, so nothing returns to memory between operations and there is
no per-operation dispatch; the channels-last crops are read in place (no transposing copy); the
flip is folded into the final store.  An item whose contrast is jittered is kept as float32 rows
(``3 x H x W``, 600 kB for 224 x 224: it stays in the L2 cache) between the operations before
contrast, which fix the mean luma contrast needs, and the ones from contrast on.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch
from numba import njit

from pirl.kernels.colour_job import GRAY_WEIGHTS, ColourJob

F32 = np.float32
# The luma weights as float32 constants: a Python float would turn the float32 arithmetic into
# float64.
_WR, _WG, _WB = (F32(w) for w in GRAY_WEIGHTS)
_ZERO, _ONE, _HALF, _TOP = F32(0.0), F32(1.0), F32(0.5), F32(255.0)
# Adding and subtracting 2^23 rounds a float32 in [0, 2^23) to an integer, half to even (the
# rounding of the addition itself); cheaper than np.rint followed by the conversion.
_MAGIC = F32(2.0**23)


@njit(cache=True, nogil=True)
def _clamp_row(t: np.ndarray, W: int) -> None:
    """Clamp the float32 row ``t [3, W]`` to [0, 255] in place."""
    for ch in range(3):
        for x in range(W):
            t[ch, x] = min(max(t[ch, x], _ZERO), _TOP)


@njit(cache=True, nogil=True)
def _hue_row(t: np.ndarray, W: int, a: np.ndarray, b: np.ndarray, half: np.float32) -> None:
    """``_shift_hue`` on one row ``t [3, W]``: channel n becomes ``clamp(x[a_n] - x[b_n] +
    (V + m) / 2 + (V - m) * half * sign(x[a_n] + x[b_n] - V - m), m, V)`` (V, m: the pixel's
    maximum and minimum channel; ``a``, ``b``: the rotation and neighbour channels of the shift's
    case, ``half = 1/2 - |f|``)."""
    a0, a1, a2, b0, b1, b2 = a[0], a[1], a[2], b[0], b[1], b[2]
    for x in range(W):
        r, g, bl = t[0, x], t[1, x], t[2, x]
        # The channels by index, as selects (indexing t by a loop-invariant row stopped the
        # vectoriser).
        xa0 = r if a0 == 0 else (g if a0 == 1 else bl)
        xa1 = r if a1 == 0 else (g if a1 == 1 else bl)
        xa2 = r if a2 == 0 else (g if a2 == 1 else bl)
        xb0 = r if b0 == 0 else (g if b0 == 1 else bl)
        xb1 = r if b1 == 0 else (g if b1 == 1 else bl)
        xb2 = r if b2 == 0 else (g if b2 == 1 else bl)
        v = max(r, max(g, bl))
        m = min(r, min(g, bl))
        mid = v + m
        z = (v - m) * half
        hm = mid * _HALF
        d0, d1, d2 = xa0 + xb0 - mid, xa1 + xb1 - mid, xa2 + xb2 - mid
        s0 = _ONE if d0 > _ZERO else (-_ONE if d0 < _ZERO else _ZERO)
        s1 = _ONE if d1 > _ZERO else (-_ONE if d1 < _ZERO else _ZERO)
        s2 = _ONE if d2 > _ZERO else (-_ONE if d2 < _ZERO else _ZERO)
        t[0, x] = min(max((xa0 - xb0) + s0 * z + hm, m), v)
        t[1, x] = min(max((xa1 - xb1) + s1 * z + hm, m), v)
        t[2, x] = min(max((xa2 - xb2) + s2 * z + hm, m), v)


@njit(cache=True, nogil=True)
def _apply_ops(t: np.ndarray, W: int, order: np.ndarray, first: int, last: int,
               fac: np.ndarray, offset: np.float32, hue_a: np.ndarray, hue_b: np.ndarray,
               hue_half: np.float32) -> None:
    """Operations ``order[first:last]`` on one row ``t [3, W]`` (float32, 0..255).  ``fac`` =
    (brightness, contrast, saturation, hue); an identity factor skips its operation; a factor
    above 1 clamps after it (a factor <= 1 cannot leave the range).  Contrast adds ``offset``
    = (1 - c) times the item's mean luma."""
    for k in range(first, last):
        op = order[k]
        if op <= 1:
            # Brightness is contrast around 0: f x + 0 (adding +0.0 leaves f x exact).
            f = fac[op]
            add = offset if op == 1 else _ZERO
            if f != _ONE:
                for ch in range(3):
                    for x in range(W):
                        t[ch, x] = t[ch, x] * f + add
                if f > _ONE:
                    _clamp_row(t, W)
        elif op == 2:
            f = fac[2]
            if f != _ONE:
                keep = _ONE - f
                for x in range(W):
                    luma = keep * (_WR * t[0, x] + _WG * t[1, x] + _WB * t[2, x])
                    t[0, x] = f * t[0, x] + luma
                    t[1, x] = f * t[1, x] + luma
                    t[2, x] = f * t[2, x] + luma
                if f > _ONE:
                    _clamp_row(t, W)
        elif fac[3] != _ZERO:
            _hue_row(t, W, hue_a, hue_b, hue_half)


@njit(cache=True, nogil=True)
def _load_row(src: np.ndarray, i: int, y: int, t: np.ndarray) -> None:
    """Row ``y`` of item ``i`` of ``src [n, H, W * 3]`` (uint8, C-contiguous: channels-last
    pixels) as float32 ``t [3, W]``.  The known unit stride lets the compiler vectorise the
    de-interleaving, which a strided ``[n, 3, H, W]`` view would not allow."""
    row = src[i, y]
    for x in range(t.shape[1]):
        t[0, x] = F32(row[3 * x])
        t[1, x] = F32(row[3 * x + 1])
        t[2, x] = F32(row[3 * x + 2])


@njit(cache=True, nogil=True)
def _store_row(t: np.ndarray, gray: bool, flip: bool, out: np.ndarray, i: int, y: int) -> None:
    """Grayscale (every channel = the luma), round half to even, store row ``y`` of item ``i``
    of ``out [n, 3, H, W]`` (mirrored when ``flip``)."""
    W = t.shape[1]
    if gray:
        for x in range(W):
            luma = _WR * t[0, x] + _WG * t[1, x] + _WB * t[2, x]
            t[0, x] = luma
            t[1, x] = luma
            t[2, x] = luma
    # Values are in [0, 255] up to float noise: clamp, then round (to exact integers).
    if flip:
        for ch in range(3):
            for x in range(W):
                v = (min(max(t[ch, x], _ZERO), _TOP) + _MAGIC) - _MAGIC
                out[i, ch, y, W - 1 - x] = np.uint8(np.int32(v))
    else:
        for ch in range(3):
            for x in range(W):
                v = (min(max(t[ch, x], _ZERO), _TOP) + _MAGIC) - _MAGIC
                out[i, ch, y, x] = np.uint8(np.int32(v))


_NEXT = np.array([1, 2, 0], dtype=np.int64)  # the channel that rises after channel n (R->G->B)
_PREV = np.array([2, 0, 1], dtype=np.int64)


@njit(cache=True, nogil=True)
def _hue_case(shift: float, a: np.ndarray, b: np.ndarray) -> np.float32:
    """:func:`pirl.kernels.colour_torch._hue_cases` for one shift (turns): fills the rotation
    channels ``a`` and neighbour channels ``b``; returns ``1/2 - |f|``."""
    d = 6.0 * (shift % 1.0)
    j = int(np.round(d / 2.0))
    f = d - 2.0 * j
    for n in range(3):
        r = n
        for _ in range(j % 3):
            r = _PREV[r]
        a[n] = r
        b[n] = _NEXT[r] if f >= 0.0 else _PREV[r]
    return F32(0.5 - abs(f))


# One explicit signature, every array C-contiguous (the wrapper below makes them so): one
# compilation, done when this module is first imported (or loaded from numba's disk cache), rather
# than one per combination of array layouts met at run time, each a compilation of its own.
_SIGNATURE = ("void(uint8[:, :, ::1], uint8[:, :, :, ::1], float32[:, ::1], boolean[::1], "
              "boolean[::1], int64[::1], float32[:, :, ::1])")


@njit(_SIGNATURE, cache=True, nogil=True)
def colour_items(src: np.ndarray, out: np.ndarray, factors: np.ndarray,
                 gray: np.ndarray, flip: np.ndarray, order: np.ndarray, rows: np.ndarray) -> None:
    """Colour jitter (operations in ``order``), grayscale and flip of ``n`` items.

    Args:
        src: uint8 ``[n, H, W * 3]``, C-contiguous (channels-last pixels).
        out: uint8 ``[n, 3, H, W]``, C-contiguous (overwritten).
        factors: float32 ``[n, 4]`` (brightness, contrast, saturation, hue shift in turns).
        gray, flip: bool ``[n]``.
        order: int64 ``[4]``, a permutation of 0..3 (brightness, contrast, saturation, hue).
        rows: float32 ``[H, 3, W]`` workspace (passed in: a fresh one per call would be a fresh
            mapping of pages, and page faults, for every view).
    """
    n, H, W = out.shape[0], out.shape[2], out.shape[3]
    acc = np.empty(W, dtype=np.float64)
    hue_a = np.empty(3, dtype=np.int64)
    hue_b = np.empty(3, dtype=np.int64)
    at = 4  # contrast's place in the order
    for k in range(4):
        if order[k] == 1:
            at = k
    for i in range(n):
        fac = factors[i]
        hue_half = _hue_case(float(fac[3]), hue_a, hue_b) if fac[3] != _ZERO else _ZERO
        if fac[1] == _ONE:  # no contrast: every row in one go
            for y in range(H):
                t = rows[0]
                _load_row(src, i, y, t)
                _apply_ops(t, W, order, 0, 4, fac, _ZERO, hue_a, hue_b, hue_half)
                _store_row(t, gray[i], flip[i], out, i, y)
            continue
        # The operations before contrast on every row, and the luma they leave (summed per
        # column in float64: a vectorisable sum, and as exact as the mean needs).
        acc[:] = 0.0
        for y in range(H):
            t = rows[y]
            _load_row(src, i, y, t)
            _apply_ops(t, W, order, 0, at, fac, _ZERO, hue_a, hue_b, hue_half)
            for x in range(W):
                acc[x] += _WR * t[0, x] + _WG * t[1, x] + _WB * t[2, x]
        offset = (_ONE - fac[1]) * F32(acc.sum() / (H * W))
        for y in range(H):
            t = rows[y]
            _apply_ops(t, W, order, at, 4, fac, offset, hue_a, hue_b, hue_half)
            _store_row(t, gray[i], flip[i], out, i, y)


# Workspaces by (H, W), reused call after call; one set per thread (the kernel releases the GIL,
# so threads may colour at the same time; each DataLoader worker process has its own anyway).
_LOCAL = threading.local()


def _rows(H: int, W: int) -> np.ndarray:
    """This thread's float32 ``[H, 3, W]`` workspace."""
    spaces: dict[tuple[int, int], np.ndarray] | None = getattr(_LOCAL, "rows", None)
    if spaces is None:
        spaces = _LOCAL.rows = {}
    rows = spaces.get((H, W))
    if rows is None:
        rows = spaces[(H, W)] = np.empty((H, 3, W), dtype=np.float32)
    return rows


def photometric_jobs(jobs: Sequence[ColourJob]) -> None:
    """Colour, grayscale and flip every job's sources into its outs: the numba backend of
    :func:`pirl.kernels.colour.photometric_jobs` (CPU tensors only; the caller checks the jobs)."""
    for job in jobs:
        p = job.params
        # The parameters as the contiguous arrays the signature asks for (a few bytes each).
        factors = np.ascontiguousarray(p.factors.to(torch.float32).numpy())
        gray = np.ascontiguousarray(p.grayscale.numpy())
        flip = np.ascontiguousarray(p.flip.numpy())
        order = np.asarray(p.jitter_order, dtype=np.int64)
        start = 0
        for src, out in zip(job.sources, job.outs, strict=True):
            n, _, H, W = src.shape
            # Channels-last crops (the resize's output, the stacked jigsaw patches) are read in
            # place; other layouts (a rotated crop) are copied channels-last first.
            arr = src.permute(0, 2, 3, 1).contiguous().view(n, H, W * 3).numpy()
            # The outputs are contiguous slices of a batch in training; others go through a
            # contiguous buffer.
            dense = out if out.is_contiguous() else torch.empty(out.shape, dtype=torch.uint8)
            end = start + n
            colour_items(arr, dense.numpy(), factors[start:end], gray[start:end],
                         flip[start:end], order, _rows(H, W))
            if dense is not out:
                out.copy_(dense)
            start = end
