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


def _to_uint8(y: Tensor) -> Tensor:
    """Round float values in [0, 255] to uint8.  (+0.5 then truncate; via int16 because torch's
    direct float -> uint8 conversion is unvectorised on CPU and 5x slower.)"""
    return y.add_(0.5).to(torch.int16).to(torch.uint8)


# Constant 3 x 3 matrices applied to [B, 3, N] pixels with one batched matrix product (torch.bmm
# with K = 3 is about as fast as a single elementwise op and replaces several of them).
_GRAY_ROW = torch.tensor(GRAY_WEIGHTS)  # luma = w . rgb
_EYE = torch.eye(3)
_GRAY_MATRIX = _GRAY_ROW.expand(3, 3)  # every output channel = luma
# k - 5 for the HSV -> RGB formula's n = (5, 3, 1) (see _shift_hue).
_HUE_K_MINUS_5 = torch.tensor([0.0, -2.0, -4.0]).view(1, 3, 1)


def _shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue of float pixels ``[B,3,N]`` (any positive scale) by ``shift`` turns [B].

    V = max and C = max - min are kept (so are S and V).  The hue in sextants (0..6) comes from
    the channel that is the maximum: (g - b) / C for red, 2 + (b - r) / C for green, 4 + (r - g)
    / C for blue (red first, then green on ties, as in PIL and torchvision).  The shifted hue h
    goes back to RGB with the closed form f(n) = V - C * clamp(min(k, 4 - k), 0, 1),
    k = (n + h) mod 6, n = (5, 3, 1) for (R, G, B).  With h wrapped into [0, 6) and u = |k - 5|
    (in [0, 6) because f is symmetric about k = 5 and 6-periodic) this is

        f = min + clamp(|C u - 3 C| - C, 0, C)

    which needs no modulo on the 3-channel tensor and only six passes over it.  Written for
    speed on CPU with torch's vectorised kernels: no ``where`` / ``argmax`` / ``remainder``
    (unvectorised there, 5-30x slower than arithmetic); the sextant is chosen with ``lerp`` by
    ``sign(V - channel)``, exactly 0 where the channel is the maximum and 1 elsewhere; the rest of
    the work happens on [B,1,N] planes.
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    v = x.amax(dim=1, keepdim=True)  # [B,1,N]
    mn = x.amin(dim=1, keepdim=True)
    c = v - mn
    # C * h: numerators with the sextant offsets folded in: red (g - b), green (b - r) + 2C,
    # blue (r - g) + 4C; green over blue where green is a maximum, then red over both.
    ch = torch.lerp(torch.sub(b, r).add_(c, alpha=2.0), torch.sub(r, g).add_(c, alpha=4.0),
                    torch.sign(v - g))
    ch = torch.lerp(g - b, ch, torch.sign(v - r))  # in [-C, 5C)
    # Shift by 6 * (shift mod 1) sextants, then wrap C h into [0, 6C).  Grey pixels (C = 0)
    # have ch = 0 and stay 0 with any positive divisor.
    six_c = c.mul(6.0)
    ch.addcmul_(six_c, torch.remainder(shift.to(x), 1.0).view(-1, 1, 1))
    ch.addcmul_(torch.floor(ch / six_c.clamp(min=1e-6)), six_c, value=-1.0)
    u = torch.addcmul(ch, c, _HUE_K_MINUS_5.to(x)).abs_()  # C |k - 5|, [B,3,N]
    u.sub_(six_c.mul_(0.5)).abs_()  # |C u - 3 C|
    return u.add_(mn - c).clamp_(min=mn, max=v)


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
    rounded once at the end.
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected [B,3,H,W], got {list(x.shape)}")
    B, shape = x.shape[0], x.shape
    factors = torch.stack([brightness, contrast, saturation, hue], 1).float()
    if x.dtype == torch.uint8:
        y = torch.empty(shape, dtype=torch.float32, device=x.device).copy_(x).view(B, 3, -1)
        return _to_uint8(_jitter(y, 255.0, factors, order)).view(shape)
    y = x.reshape(B, 3, -1).clone()
    return _jitter(y, 1.0, factors, order).view(shape)


@functools.lru_cache(maxsize=64)
def _piece_layout(rows: tuple[int, ...], pixels: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """For items made of ``rows[j]`` consecutive rows holding ``pixels[j]`` real pixels: the
    row -> item one-hot matrix ``[K, I]``, the pixel counts ``[I]`` (float) and the owner item
    of each row ``[K]`` (Long)."""
    owner = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(rows))
    return (F.one_hot(owner, len(rows)).float(), torch.tensor(pixels, dtype=torch.float32),
            owner)


def _jitter(y: Tensor, bound: float, factors: Tensor, order: tuple[int, ...] | list[int],
            contrast_mean: Tensor | None = None) -> Tensor:
    """Colour jitter of float pixels ``y [K,3,Q]`` in ``[0, bound]`` with ``factors [K,4]`` per
    row; in place where possible (use the returned tensor).

    Contrast blends with the mean luma of each row, or with ``contrast_mean [K]`` when rows are
    pieces of larger items (:func:`apply_photometric` computes it over the whole item).
    """
    K = y.shape[0]
    fl = factors.tolist()
    fac = factors.to(y)
    for op in order:
        if op == 0:
            y.mul_(fac[:, 0].view(K, 1, 1))
            if max(f[0] for f in fl) > 1.0:  # factors <= 1 cannot leave the range
                y.clamp_(max=bound)
        elif op == 1:
            c = fac[:, 1].view(K, 1, 1)
            mean = contrast_mean
            if mean is None:
                mean = torch.matmul(y.mean(dim=2), _GRAY_ROW.to(y))  # [K]
            # c y + (1 - c) mean, in place (torch.addcmul broadcasting [K,1,1] is 3x slower).
            y.mul_(c).add_(mean.view(K, 1, 1) * (1.0 - c))
            if max(f[1] for f in fl) > 1.0:  # a convex combination stays in range
                y.clamp_(0.0, bound)
        elif op == 2:
            # s y + (1 - s) luma(y) = M y with M = s I + (1 - s) [w; w; w].
            matrix = torch.lerp(_GRAY_MATRIX.to(y), _EYE.to(y), fac[:, 2].view(K, 1, 1))
            y = torch.bmm(matrix, y)
            if max(f[2] for f in fl) > 1.0:
                y.clamp_(0.0, bound)
        elif op == 3:
            if any(f[3] != 0.0 for f in fl):  # hue 0 everywhere: skip the costliest operation
                y = _shift_hue(y, fac[:, 3])
        else:
            raise ValueError(f"unknown colour operation {op} (expected 0..3)")
    return y


# Pixels per row / per block of rows in apply_photometric.  The colour operations are memory-bound
# and need ~80 bytes of live temporaries per pixel: a block of <= 24k pixels (~2 MB) stays in the
# L2 cache through all ~60 operations, where a whole 224 x 224 view spills to L3 and runs 2-3x
# slower per pixel.  Smaller blocks would pay more per-call overhead (~2 us per torch op).
_ROW_MAX = 8192
_BLOCK_PIXELS = 24576


@overload
def apply_photometric(x: Tensor, p: Photometric) -> Tensor: ...
@overload
def apply_photometric(x: Sequence[Tensor], p: Photometric) -> list[Tensor]: ...
def apply_photometric(x: Tensor | Sequence[Tensor], p: Photometric
                      ) -> Tensor | list[Tensor]:
    """Flip, colour-jitter and grayscale uint8 views, each item with its own parameters, as one
    batched, cache-blocked computation.

    ``x`` is a uint8 ``[B,3,H,W]`` batch or a list of such batches of different sizes (e.g. the
    image view ``[1,3,224,224]`` and the jigsaw patches ``[9,3,64,64]``); ``p`` holds one
    parameter set per item over all of them, in order.  Returns contiguous uint8 tensors shaped
    like the inputs.  Per item as in the standard pipeline: (flip,) colour jitter, grayscale
    (flipping commutes with the colour operations).

    How: every item is cut into rows of Q pixels (Q = the smallest item's pixel count, at most
    8192; an item's last row is zero-padded when Q does not divide it: 6% extra for a 224-px view
    next to 64-px patches).  Rows are processed in blocks of ~24k pixels that fit in the L2
    cache.  Contrast needs each item's mean luma at its place in the operation order, so the
    operations before contrast sweep all blocks first (padding stays 0 and adds nothing to the
    sums), the rest in a second sweep.
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
    starts = [0]
    for v in views:
        starts.append(starts[-1] + v.shape[0])
    views = [_flip_items(v, flips[a:b])
             for v, a, b in zip(views, starts[:-1], starts[1:], strict=True)]
    if not jitter and not any(grays):
        outs = [v.contiguous() for v in views]
        return outs[0] if isinstance(x, Tensor) else outs

    device = views[0].device
    sizes = [v.shape[2] * v.shape[3] for v in views]
    Q = min(sizes)
    Q = -(-Q // -(-Q // _ROW_MAX))  # split rows longer than _ROW_MAX evenly
    rows_per_item = [-(-n // Q) for n in sizes]
    K = sum(v.shape[0] * r for v, r in zip(views, rows_per_item, strict=True))
    y = torch.empty(K, 3, Q, dtype=torch.float32, device=device)
    row = 0
    for v, n, r in zip(views, sizes, rows_per_item, strict=True):
        B = v.shape[0]
        block = y[row:row + B * r].view(B, r, 3, Q).transpose(1, 2)  # [B,3,r,Q] view of rows
        flat = v.reshape(B, 3, n)  # uint8 (copies a channels-last view to planar)
        full = (r - 1) * Q
        if r * Q == n:
            block.copy_(flat.view(B, 3, r, Q))
        else:  # the last row of each item is partly padding (zeros)
            block[:, :, :r - 1].copy_(flat[:, :, :full].reshape(B, 3, r - 1, Q))
            block[:, :, r - 1, :n - full].copy_(flat[:, :, full:])
            block[:, :, r - 1, n - full:].zero_()
        row += B * r
    item_rows = [r for v, r in zip(views, rows_per_item, strict=True) for _ in range(v.shape[0])]
    item_pixels = [n for v, n in zip(views, sizes, strict=True) for _ in range(v.shape[0])]
    onehot, pixels, owner = _piece_layout(tuple(item_rows), tuple(item_pixels))
    factors = p.factors if total == K else p.factors[owner]
    gray_rows = p.grayscale if total == K else p.grayscale[owner]

    ops = list(p.jitter_order) if jitter else []
    stages = [ops[:ops.index(1)], ops[ops.index(1):]] if 1 in ops else [ops]
    per_block = max(1, _BLOCK_PIXELS // Q)
    blocks = [(a, min(a + per_block, K)) for a in range(0, K, per_block)]
    y8 = torch.empty(K, 3, Q, dtype=torch.uint8, device=device)
    row_luma = torch.empty(K, dtype=torch.float32, device=device)
    mean_rows: Tensor | None = None
    for si, stage in enumerate(stages):
        last = si == len(stages) - 1
        if si == 1:
            oh, px = onehot.to(y), pixels.to(y)
            mean_rows = torch.mv(oh, torch.matmul(row_luma, oh) / px)  # [K] item means
        for a, b in blocks:
            yb = _jitter(y[a:b], 255.0, factors[a:b], stage,
                         None if mean_rows is None else mean_rows[a:b])
            if not last:
                row_luma[a:b] = torch.matmul(yb.sum(dim=2), _GRAY_ROW.to(yb))
                if yb.data_ptr() != y[a:b].data_ptr():
                    y[a:b] = yb
                continue
            g = gray_rows[a:b]
            if bool(g.any()):
                # One product for the block: luma matrix for grayscale rows, identity otherwise.
                matrix = torch.lerp(_EYE.to(yb), _GRAY_MATRIX.to(yb), g.to(yb).view(-1, 1, 1))
                yb = torch.bmm(matrix, yb)
            y8[a:b] = _to_uint8(yb)
    outs = []
    row = 0
    for v, n, r in zip(views, sizes, rows_per_item, strict=True):
        B = v.shape[0]
        block = y8[row:row + B * r].view(B, r, 3, Q).transpose(1, 2).reshape(B, 3, r * Q)
        outs.append(block[:, :, :n].reshape(v.shape).contiguous())
        row += B * r
    return outs[0] if isinstance(x, Tensor) else outs


def _flip_items(v: Tensor, flips: list[bool]) -> Tensor:
    """Horizontally flip the items of ``v [B,3,H,W]`` marked in ``flips`` (a copy if any)."""
    if not any(flips):
        return v
    v = v.clone()
    for i, f in enumerate(flips):
        if f:
            v[i] = v[i].flip(-1)
    return v
