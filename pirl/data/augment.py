"""Tensor primitives shared by the views: uint8 conversion, random resized crops, batched colour.

Everything here works on uint8 ``[3,H,W]`` / ``[B,3,H,W]`` tensors so that one decoded image is
converted once and then cropped, resized and colour-augmented without returning to PIL.  The
colour augmentation of a whole batch of views (e.g. the 9 jigsaw patches) is a single call with
per-item random factors: that is what makes the jigsaw pipeline fast (issue 6, target 1; see
``benchmarks/views.py``).

Randomness comes from ``torch``'s generator (the global one unless a ``torch.Generator`` is
passed), so DataLoader workers, which torch seeds one by one, draw different views.

Differences from ``torchvision.transforms.ColorJitter`` (all deliberate, all small):

* torchvision draws a new order of the four operations for every view; here one random order is
  drawn per *batched* call and shared by its items (the items still get independent factors,
  grayscale and flip).  The training transform colours a sample's image view and its 9 patches
  in one call, so those 10 views share one order (samples differ).
* torchvision's uint8 tensor path converts back to uint8 (truncating) after every operation; here
  the pixels stay float32 between operations and are rounded once at the end (closer to the exact
  result; differences are at most a few grey levels).
* Hue is shifted with the closed-form HSV -> RGB formula ``f(n) = V - C * clamp(min(k, 4 - k), 0,
  1)``, ``k = (n + 6 H) mod 6`` (n = 5, 3, 1 for R, G, B), which equals torchvision's
  rgb -> hsv -> rgb round trip up to float rounding, in about half the operations.
"""

from __future__ import annotations

import functools
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

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale uses for tensors.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
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

    torch's uint8 path matches PIL's bilinear filter to within a grey level and is 2-4x faster
    than PIL on this machine, *if* its input is a dense channels-last block: a crop of a decoded
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
    """

    factors: Tensor  # float [B, 4]
    grayscale: Tensor  # bool [B]
    flip: Tensor  # bool [B] horizontal flip
    jitter_order: tuple[int, ...] = (0, 1, 2, 3)

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
                       flip=self.flip[idx])


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
    return Photometric(torch.tensor(factors, dtype=torch.float32).view(n, 4), flags[:, 0],
                       flags[:, 1], order)


# Adding 2^23 to a float in [0, 2^23) leaves its value rounded to an integer (to nearest, ties to
# even) in the low mantissa bits; see _round_to_uint8.
_ROUND_MAGIC = float(2**23)


def _round_to_uint8(y: Tensor, out: Tensor) -> Tensor:
    """Round float values in [0, 255] (anything in (-0.5, 255.5)) to the nearest integer (ties to
    even) and store them in the uint8 tensor ``out`` (same shape); ``y`` is overwritten.

    ``y + 2^23`` is exactly ``2^23 + round(y)``: seen as int32 its bits are ``0x4B000000 +
    round(y)``, whose low byte is ``round(y)``, and the int32 -> uint8 conversion keeps that byte
    (modulo 256).  Two vectorised passes; torch's direct float -> uint8 conversion is not
    vectorised on CPU and is ~8x slower.
    """
    y.add_(_ROUND_MAGIC)
    return out.copy_(y.view(torch.int32))


# Constant matrices applied to [K, 3, Q] pixels with one batched matrix product (torch.bmm with an
# inner dimension of 3 costs about as much as one or two elementwise passes).
_GRAY_ROW = torch.tensor(GRAY_WEIGHTS)  # luma = w . rgb
_EYE = torch.eye(3)
_GRAY_MATRIX = _GRAY_ROW.expand(3, 3)  # every output channel = luma

# Hue.  Channels R, G, B = 0, 1, 2.  Along increasing hue (red -> yellow -> green -> cyan -> blue
# -> magenta) the channel that rises after channel n is _NEXT[n] (R -> G -> B -> R).
_NEXT = (1, 2, 0)
_PREV = (2, 0, 1)


def _hue_case_matrices() -> Tensor:
    """``[6, 6, 3]``: for case ``2 j + r`` (a rotation by ``2 j`` sextants, r = 1 for a backward
    fractional shift) the matrix whose product with ``x [3, N]`` gives rows 0-2: ``p - q`` and
    rows 3-5: ``p + q + 2 m``, where (see :func:`_shift_hue`) ``p_n = x[rot(n)] - m`` and ``q_n =
    x[nb(rot(n))] - m`` with ``rot = prev^j`` and ``nb = next`` (forward) or ``prev`` (backward).
    Permutation matrices have 0/1 entries, so the products are exact sums and differences."""
    cases = []
    for j in range(3):
        rot = [0, 1, 2]
        for _ in range(j):
            rot = [_PREV[k] for k in rot]
        for nb in (_NEXT, _PREV):
            p1 = torch.zeros(3, 3)
            p2 = torch.zeros(3, 3)
            for n in range(3):
                p1[n, rot[n]] = 1.0
                p2[n, nb[rot[n]]] = 1.0
            cases.append(torch.cat([p1 - p2, p1 + p2]))
    return torch.stack(cases)


_HUE_CASES = _hue_case_matrices()


def _hue_cases(shifts: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Split each hue shift (turns) into an exact channel rotation by ``2 j`` sextants and a
    fractional shift ``f`` in [-1, 1] sextants.  Returns the per-item case matrices ``[K, 6, 3]``
    and ``1/2 - |f|`` as ``[K, 1, 1]``."""
    case, half = [], []
    for s in shifts:
        d = 6.0 * (s % 1.0)  # [0, 6] sextants (6.0 only by rounding: the same as 0)
        j = round(d / 2.0)
        f = d - 2.0 * j
        case.append(2 * (j % 3) + (f < 0.0))
        half.append(0.5 - abs(f))
    return _HUE_CASES[case], torch.tensor(half, dtype=torch.float32).view(-1, 1, 1)


def _shift_hue(y: Tensor, mats: Tensor, half: Tensor) -> Tensor:
    """Rotate the HSV hue of float pixels ``y [K,3,N]`` (any positive scale) by per-row shifts
    given as :func:`_hue_cases` returns them (``mats [K,6,3]``, ``half [K,1,1]``); exactly
    torchvision's rgb -> hsv -> (h + shift) mod 1 -> rgb up to float rounding.

    The maximum V, minimum m and so C = V - m of a pixel do not change.  A shift by two sextants
    (1/3 turn) is a cyclic permutation of the channels, so each shift is split into such a
    rotation and a fractional shift f in [-1, 1] sextants; a backward shift is a forward one of
    the hue-mirrored pixel (mirroring swaps the roles of the channel that rises after a channel and
    the one before it).  For a forward shift by f in [0, 1], write A = C f, and for every channel
    p = x - m and q = x_next - m, where x_next is the channel that rises after it.  Then (p, q) lies
    on the boundary of the square [0, C]^2, and the new value of the channel is

        x' = m + clamp(p - q + A,     0, C)   where p + q < C  (the minimum, or a rising middle)
        x' = m + clamp(p - q + C - A, 0, C)   where p + q > C  (the maximum, or a falling middle)

    (the two agree where p + q = C).  That is, with s = sign(p + q - C),

        x' = clamp(p - q + (V + m) / 2 + C (1/2 - f) s, m, V)

    Per block: two reductions (V, m), one [K,6,3] x [K,3,N] product giving p - q and p + q + 2m
    (exact: the matrices hold 0 and +-1), and five elementwise passes over the 3 channels; no
    division, remainder or ``where``.  Returns a ``[K,3,N]`` strided view of a new tensor.
    """
    v = y.amax(dim=1, keepdim=True)  # [K,1,N]
    mn = y.amin(dim=1, keepdim=True)
    z = torch.sub(v, mn).mul_(half)  # C (1/2 - f)
    mid = torch.add(v, mn)  # V + m
    x = torch.bmm(mats, y)  # [K,6,N]
    s = x[:, 3:].sub_(mid).sign_()  # sign(p + q - C)
    return x[:, :3].addcmul_(s, z).add_(mid.mul_(0.5)).clamp_(min=mn, max=v)


class _RowParams:
    """The colour parameters of K rows as the batched operations consume them: one ``[K,1,1]``
    factor tensor per operation (sliced per block), the same as Python lists (to skip identity
    operations and unneeded clamps without a tensor op) and the hue cases."""

    def __init__(self, factors: list[list[float]], device: torch.device,
                 owner: list[int] | None = None) -> None:
        """``factors``: one ``[b, c, s, h]`` per item; ``owner``: the item of each row (default:
        one row per item).  Per-item work (the hue cases) is done once per item."""
        n = len(factors)
        cols = [list(col) for col in zip(*factors, strict=True)] if n else [[], [], [], []]
        tensors = torch.tensor(cols, dtype=torch.float32).view(4, n)
        hue: tuple[Tensor, Tensor] | None = None
        if any(h != 0.0 for h in cols[3]):
            hue = _hue_cases(cols[3])
        if owner is not None and owner != list(range(n)):
            cols = [[col[i] for i in owner] for col in cols]
            idx = torch.tensor(owner)
            tensors = tensors[:, idx]
            if hue is not None:
                hue = (hue[0][idx], hue[1][idx])
        self.lists = cols
        self.tensors = tensors.to(device).view(4, -1, 1, 1)
        self.hue = None if hue is None else (hue[0].to(device), hue[1].to(device))

    def jitter(self, y: Tensor, a: int, b: int, bound: float, order: Sequence[int],
               contrast_mean: Tensor | None = None) -> Tensor:
        """Colour jitter of float rows ``y [b-a,3,Q]`` (rows ``a:b`` of the parameters) in
        ``[0, bound]``; in place where possible (use the returned tensor, possibly a strided
        view).  Contrast blends with the mean luma of each row, or with ``contrast_mean [b-a]``
        when rows are pieces of larger items (:func:`apply_photometric` computes it over the
        whole item).  An operation whose factors are all the identity here is skipped."""
        for op in order:
            col = self.lists[op][a:b]
            if op == 3:
                if self.hue is not None and any(c != 0.0 for c in col):
                    y = _shift_hue(y, self.hue[0][a:b], self.hue[1][a:b])
                continue
            if op not in (0, 1, 2):
                raise ValueError(f"unknown colour operation {op} (expected 0..3)")
            if all(c == 1.0 for c in col):
                continue
            fac = self.tensors[op, a:b]  # [k,1,1]
            if op == 0:
                y.mul_(fac)
            elif op == 1:
                mean = contrast_mean
                if mean is None:
                    mean = torch.matmul(y.mean(dim=2), _GRAY_ROW.to(y))  # [k]
                # c y + (1 - c) mean, in place (torch.addcmul broadcasting [k,1,1] is slower).
                y.mul_(fac).add_(mean.view(-1, 1, 1) * (1.0 - fac))
            else:
                # s y + (1 - s) luma(y) = M y with M = s I + (1 - s) [w; w; w].
                y = torch.bmm(torch.lerp(_GRAY_MATRIX.to(y), _EYE.to(y), fac), y)
            # A factor <= 1 cannot leave the range (brightness scales down, contrast and
            # saturation are then convex combinations of values in range).
            if max(col) > 1.0:
                y.clamp_(0.0, bound)
        return y


def _jitter(y: Tensor, bound: float, factors: list[list[float]],
            order: Sequence[int]) -> Tensor:
    """Colour jitter of float pixels ``y [K,3,Q]`` in ``[0, bound]`` with ``factors`` (K rows of
    ``[brightness, contrast, saturation, hue]``); see :meth:`_RowParams.jitter`."""
    return _RowParams(factors, y.device).jitter(y, 0, y.shape[0], bound, order)


def color_jitter_batch(x: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor,
                       hue: Tensor, order: tuple[int, ...] = (0, 1, 2, 3)) -> Tensor:
    """Colour jitter of a batch with one set of factors per item, in a handful of batched ops.

    Args:
        x: ``[B,3,H,W]`` uint8 (0..255) or float (0..1).
        brightness, contrast, saturation: ``[B]`` factors (1 = unchanged).
        hue: ``[B]`` shifts in turns, in [-0.5, 0.5] (0 = unchanged).
        order: the order of the operations (0 brightness, 1 contrast, 2 saturation, 3 hue).

    Returns ``[B,3,H,W]`` of the input dtype.  Each operation is torchvision's: brightness
    ``b x``; contrast ``c x + (1 - c) mean(gray(x))``; saturation ``s x + (1 - s) gray(x)``; each
    clamped to the valid range; hue as in :func:`_shift_hue`.  Internally float32; uint8 output is
    rounded once at the end (to nearest).
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected [B,3,H,W], got {list(x.shape)}")
    B, shape = x.shape[0], x.shape
    factors = torch.stack([brightness, contrast, saturation, hue], 1).float().tolist()
    if x.dtype == torch.uint8:
        y = torch.empty(shape, dtype=torch.float32, device=x.device).copy_(x).view(B, 3, -1)
        y = _jitter(y, 255.0, factors, order)
        return _round_to_uint8(y, torch.empty_like(x).view(B, 3, -1)).view(shape)
    y = x.reshape(B, 3, -1).clone()
    return _jitter(y, 1.0, factors, order).reshape(shape)


# Rows and blocks in apply_photometric.  The colour operations are memory-bound and need ~60 bytes
# of live temporaries per pixel: a block of <= 24k pixels (~1.5 MB) stays in the L2 cache through
# all the operations, where a whole 224 x 224 view spills to L3 and runs 1.5-2x slower per pixel.
# Smaller blocks would pay more per-call overhead (~1-2 us per torch op).
_ROW_MAX = 8192
_BLOCK_PIXELS = 24576


@dataclass(frozen=True)
class _ViewLayout:
    """How the items of one ``[B,3,H,W]`` batch sit in the rows: each item is cut into ``chunks``
    chunks of ``rows`` image rows (the last one may hold fewer); chunk k of item i is row
    ``start + i * chunks + k``, its first ``rows * W`` pixels holding the image rows."""

    start: int
    batch: int
    height: int
    width: int
    rows: int
    chunks: int


@functools.lru_cache(maxsize=64)
def _row_layout(shapes: tuple[tuple[int, int, int], ...]
                ) -> tuple[int, int, tuple[_ViewLayout, ...], Tensor, Tensor, list[int]]:
    """Row layout for batches of shapes ``(B, H, W)``: returns the row length Q, the row count
    K, one :class:`_ViewLayout` per batch, the row -> item one-hot matrix ``[K, I]``, each item's
    pixel count ``[I]`` (float) and each row's item (a list of K ints).

    Q is the smallest item's pixel count (at most 8192, at least the widest row); every item is
    cut into chunks of whole image rows as even as possible that fit in Q, so that copying between
    the views and the rows is a strided copy with long contiguous runs (no per-pixel gather).
    """
    q0 = min(min(h * w for _, h, w in shapes), _ROW_MAX)
    layouts, start, Q = [], 0, 0
    for B, H, W in shapes:
        per = max(1, q0 // W)  # at most this many image rows per chunk
        rows = -(-H // -(-H // per))  # the fewest chunks, then rows spread evenly over them
        chunks = -(-H // rows)
        layouts.append(_ViewLayout(start, B, H, W, rows, chunks))
        start += B * chunks
        Q = max(Q, rows * W)
    K = start
    chunk_items = [lay.chunks for lay in layouts for _ in range(lay.batch)]
    owner = torch.repeat_interleave(torch.arange(len(chunk_items)), torch.tensor(chunk_items))
    pixels = torch.tensor([lay.height * lay.width for lay in layouts for _ in range(lay.batch)],
                          dtype=torch.float32)
    return Q, K, tuple(layouts), F.one_hot(owner, len(chunk_items)).float(), pixels, owner.tolist()


def _chunk_views(lay: _ViewLayout, rows: Tensor, img: Tensor
                 ) -> list[tuple[Tensor, Tensor]]:
    """Pairs (part of the rows, the matching part of ``img [B,3,H,W]``) of equal shapes that
    together cover the batch: the complete chunks and the last, shorter one."""
    B, W, r, n = lay.batch, lay.width, lay.rows, lay.chunks
    R = rows[lay.start:lay.start + B * n].view(B, n, 3, -1)
    full = lay.height // r
    pairs = []
    if full:
        pairs.append((R[:, :full, :, :r * W].unflatten(3, (r, W)),  # [B, full, 3, r, W]
                      img[:, :, :full * r].unflatten(2, (full, r)).transpose(1, 2)))
    rest = lay.height - full * r
    if rest:
        pairs.append((R[:, full, :, :rest * W].unflatten(2, (rest, W)), img[:, :, full * r:]))
    return pairs


@overload
def apply_photometric(x: Tensor, p: Photometric) -> Tensor: ...
@overload
def apply_photometric(x: Sequence[Tensor], p: Photometric) -> list[Tensor]: ...
def apply_photometric(x: Tensor | Sequence[Tensor], p: Photometric
                      ) -> Tensor | list[Tensor]:
    """Flip, colour-jitter and grayscale uint8 views, each item with its own parameters, as one
    batched, cache-blocked computation.

    ``x`` is a uint8 ``[B,3,H,W]`` batch or a list of such batches of different sizes (e.g. the
    image view ``[1,3,224,224]`` and the jigsaw patches ``[9,3,64,64]``), planar or channels-last;
    ``p`` holds one parameter set per item over all of them, in order.  Returns new contiguous
    uint8 tensors shaped like the inputs.  Per item as in the standard pipeline: (flip,) colour
    jitter, grayscale.  The flip is applied to the result: it commutes with every colour operation
    (they act on each pixel, and contrast's mean does not depend on the pixel order).

    How: the items are copied (and converted to float) into K rows of Q pixels: each item is cut
    into chunks of whole image rows (:func:`_row_layout`); unused pixels are 0.  Rows are
    processed in blocks of ~24k pixels that fit in the L2 cache.  Contrast needs each item's mean
    luma at its place in the operation order, so the operations before contrast sweep all blocks
    first (zero padding stays 0 through them and adds nothing to the sums), the rest in a second
    sweep that also rounds each block to uint8.
    """
    views = [x] if isinstance(x, Tensor) else list(x)
    for v in views:
        if v.dim() != 4 or v.shape[1] != 3 or v.dtype != torch.uint8:
            raise ValueError(f"expected uint8 [B,3,H,W] views, got {v.dtype} {list(v.shape)}")
    total = sum(v.shape[0] for v in views)
    if len(p) != total:
        raise ValueError(f"{len(p)} photometric parameter sets for {total} views")
    flips, grays, fl = p.flip.tolist(), p.grayscale.tolist(), p.factors.tolist()
    jitter = any(f != [1.0, 1.0, 1.0, 0.0] for f in fl)
    if not jitter and not any(grays):
        starts = [0]
        for v in views:
            starts.append(starts[-1] + v.shape[0])
        outs = [_flip_items(v, flips[a:b]).contiguous()
                for v, a, b in zip(views, starts[:-1], starts[1:], strict=True)]
        return outs[0] if isinstance(x, Tensor) else outs
    outs = _colour(views, fl if jitter else None, grays, p.jitter_order)
    item = 0
    for out in outs:
        for i in range(out.shape[0]):
            if flips[item]:
                out[i] = out[i].flip(-1)
            item += 1
    return outs[0] if isinstance(x, Tensor) else outs


def _colour(views: list[Tensor], fl: list[list[float]] | None, grays: list[bool],
            order: Sequence[int]) -> list[Tensor]:
    """The colour part of :func:`apply_photometric` (``fl`` None: grayscale only); returns new
    contiguous uint8 tensors (which the caller may modify)."""
    device = views[0].device
    Q, K, layouts, onehot, pixels, owner = _row_layout(
        tuple((v.shape[0], v.shape[2], v.shape[3]) for v in views))
    y = torch.empty(K, 3, Q, dtype=torch.float32, device=device)
    for v, lay in zip(views, layouts, strict=True):
        for rows_part, img_part in _chunk_views(lay, y, v):
            rows_part.copy_(img_part)
        # Zero the pixels of the rows that hold no image pixel.
        R = y[lay.start:lay.start + lay.batch * lay.chunks].view(lay.batch, lay.chunks, 3, Q)
        used = lay.rows * lay.width
        if used < Q:
            R[..., used:].zero_()
        rest = lay.height % lay.rows
        if rest:
            R[:, -1, :, rest * lay.width:used].zero_()
    row_gray = [grays[i] for i in owner]
    ops = list(order) if fl is not None else []
    params = _RowParams(fl if fl is not None else [], device, owner if fl is not None else None)
    stages = [ops[:ops.index(1)], ops[ops.index(1):]] if 1 in ops else [ops]
    per_block = max(1, _BLOCK_PIXELS // Q)
    blocks = [(a, min(a + per_block, K)) for a in range(0, K, per_block)]
    y8 = torch.empty(K, 3, Q, dtype=torch.uint8, device=device)
    row_luma = torch.empty(K, dtype=torch.float32, device=device)
    gray_row = _GRAY_ROW.to(y)
    mean_rows: Tensor | None = None
    for si, stage in enumerate(stages):
        last = si == len(stages) - 1
        if si == 1:
            oh, px = onehot.to(y), pixels.to(y)
            mean_rows = torch.mv(oh, torch.matmul(row_luma, oh) / px)  # [K] item means
        for a, b in blocks:
            yb = params.jitter(y[a:b], a, b, 255.0, stage,
                               None if mean_rows is None else mean_rows[a:b])
            if not last:
                row_luma[a:b] = torch.matmul(yb.sum(dim=2), gray_row)
                if yb.data_ptr() != y[a:b].data_ptr() or yb.stride() != y[a:b].stride():
                    y[a:b] = yb
                continue
            i = a
            while i < b:  # runs of grayscale rows: every channel = the row's luma
                if not row_gray[i]:
                    i += 1
                    continue
                j = i + 1
                while j < b and row_gray[j]:
                    j += 1
                run = yb[i - a:j - a]
                run.copy_(torch.matmul(gray_row, run).unsqueeze(1).expand_as(run))
                i = j
            _round_to_uint8(yb, y8[a:b])
    outs = []
    for v, lay in zip(views, layouts, strict=True):
        out = torch.empty(v.shape, dtype=torch.uint8, device=device)
        for rows_part, img_part in _chunk_views(lay, y8, out):
            img_part.copy_(rows_part)
        outs.append(out)
    return outs


def _flip_items(v: Tensor, flips: list[bool]) -> Tensor:
    """Horizontally flip the items of ``v [B,3,H,W]`` marked in ``flips`` (a copy if any)."""
    if not any(flips):
        return v
    v = v.clone()
    for i, f in enumerate(flips):
        if f:
            v[i] = v[i].flip(-1)
    return v
