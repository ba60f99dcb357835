"""The ``torch`` colour backend: colour jitter, grayscale and flip of many views as a few batched,
cache-blocked torch operations (always available; the fallback where numba is not installed).

:func:`colour_jobs` colours a batch of :class:`~pirl.kernels.colour_job.ColourJob` (every view of
a training batch in one call, each job bit for bit as it would be alone); :func:`color_jitter_batch`
jitters one ``[B,3,H,W]`` batch with one set of factors per item.  Both apply torchvision's
``ColorJitter`` operations in float32 and round to uint8 once at the end; hue uses the closed-form
HSV -> RGB formula ``f(n) = V - C * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6 H) mod 6`` (n = 5,
3, 1 for R, G, B), which equals torchvision's rgb -> hsv -> rgb round trip up to float rounding, in
about half the operations (:func:`_shift_hue`).  The plain reference they are tested against is
:func:`pirl.kernels.colour_reference.photometric_reference` (torchvision, one image at a time).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pirl.kernels.colour_job import GRAY_WEIGHTS, ColourJob, check_jobs, check_order

# Adding 2^23 to a float in [0, 2^23) leaves its value rounded to an integer (to nearest, ties to
# even) in the low mantissa bits; see _round_to_uint8.
_ROUND_MAGIC = float(2**23)


def _round_to_uint8(y: Tensor, out: Tensor) -> Tensor:
    """Round float values in [0, 255] (anything in (-0.5, 255.5)) to the nearest integer (ties to
    even) and store them in the uint8 tensor ``out`` (same shape); ``y`` is overwritten.

    ``y + 2^23`` is exactly ``2^23 + round(y)``: seen as int32 its bits are ``0x4B000000 +
    round(y)``, whose low byte is ``round(y)``, and the int32 -> uint8 conversion keeps that byte
    (modulo 256).  Two vectorised passes; torch's direct float -> uint8 conversion is not
    vectorised on CPU.
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


class _Block:
    """The parameters of one block of rows as the batched operations consume them: a ``[k,1,1]``
    view per factor, contrast's ``1 - c``, saturation's ``[k,3,3]`` matrices and the hue cases
    (views into :class:`_RowParams`' tensors), and per operation whether it changes any row of
    the block (``active``) and whether a factor above 1 needs a clamp after it (``clamp``)."""

    __slots__ = ("fac", "keep", "sat", "hue", "active", "clamp")

    def __init__(self, cols: list[list[float]], fac: list[Tensor], keep: Tensor,
                 sat: Tensor | None, hue: tuple[Tensor, Tensor] | None) -> None:
        self.fac, self.keep, self.sat, self.hue = fac, keep, sat, hue
        self.active = [any(c != 1.0 for c in col) for col in cols[:3]]
        self.active.append(hue is not None and any(c != 0.0 for c in cols[3]))
        self.clamp = [max(col, default=1.0) > 1.0 for col in cols[:3]] + [False]


class _RowParams:
    """The colour parameters of K rows: the factors as Python lists and ``[K,1,1]`` tensors, and
    what the operations derive from them, computed once for all rows: contrast's ``1 - c``,
    saturation's 3 x 3 matrices and the hue cases.  :meth:`blocks` cuts them into the views
    each block uses, a few ``split`` calls for all blocks (slicing each block's tensors one by
    one costs ~1.4 us per view, a quarter of a small elementwise pass)."""

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
            idx = torch.tensor(owner, dtype=torch.long)
            tensors = tensors[:, idx]
            if hue is not None:
                hue = (hue[0][idx], hue[1][idx])
        self.lists = cols
        self.tensors = tensors.to(device).view(4, -1, 1, 1)
        self.keep = 1.0 - self.tensors[1]  # [K,1,1]: contrast keeps (1 - c) of the mean
        # Saturation: s y + (1 - s) luma(y) = M y with M = s I + (1 - s) [w; w; w], [K,3,3].
        self.sat: Tensor | None = None
        if any(s != 1.0 for s in cols[2]):
            self.sat = torch.lerp(_GRAY_MATRIX.to(device), _EYE.to(device), self.tensors[2])
        self.hue = None if hue is None else (hue[0].to(device), hue[1].to(device))

    def blocks(self, sizes: list[int]) -> list[_Block]:
        """The parameters of consecutive blocks of ``sizes`` rows (summing to K)."""
        if sum(sizes) != len(self.lists[0]):
            raise ValueError(f"blocks of {sum(sizes)} rows for {len(self.lists[0])} rows")
        fac = [self.tensors[op].split(sizes) for op in range(3)]
        keep = self.keep.split(sizes)
        sat = None if self.sat is None else self.sat.split(sizes)
        hue = None if self.hue is None else (self.hue[0].split(sizes), self.hue[1].split(sizes))
        out, a = [], 0
        for i, n in enumerate(sizes):
            out.append(_Block([col[a:a + n] for col in self.lists], [f[i] for f in fac], keep[i],
                              None if sat is None else sat[i],
                              None if hue is None else (hue[0][i], hue[1][i])))
            a += n
        return out


def _jitter_block(y: Tensor, blk: _Block, bound: float, order: Sequence[int],
                  contrast_offset: Tensor | None = None) -> Tensor:
    """Colour jitter of the float rows ``y [k,3,Q]`` of one block in ``[0, bound]``; in place
    where possible (use the returned tensor, possibly a strided view of a new one).  Contrast
    blends with the mean luma of each row, or adds ``contrast_offset [k,1,1]`` (``(1 - c)``
    times the mean) when rows are pieces of larger items (:func:`colour_jobs` computes it over
    the whole item).  An operation whose factors are all the identity in these rows is skipped,
    and so is a clamp that no factor above 1 makes necessary."""
    for op in order:
        if not blk.active[op]:
            continue
        if op == 3:
            assert blk.hue is not None  # active
            y = _shift_hue(y, *blk.hue)
            continue
        if op == 0:
            y.mul_(blk.fac[0])
        elif op == 1:
            offset = contrast_offset
            if offset is None:
                mean = torch.matmul(y.mean(dim=2), _GRAY_ROW.to(y))  # [k]
                offset = mean.view(-1, 1, 1) * blk.keep
            # c y + (1 - c) mean, in place (torch.addcmul broadcasting [k,1,1] is slower).
            y.mul_(blk.fac[1]).add_(offset)
        else:
            assert blk.sat is not None  # active
            y = torch.bmm(blk.sat, y)
        # A factor <= 1 cannot leave the range (brightness scales down, contrast and
        # saturation are then convex combinations of values in range).
        if blk.clamp[op]:
            y.clamp_(0.0, bound)
    return y


def _jitter(y: Tensor, bound: float, factors: list[list[float]],
            order: Sequence[int]) -> Tensor:
    """Colour jitter of float pixels ``y [K,3,Q]`` in ``[0, bound]`` with ``factors`` (K rows of
    ``[brightness, contrast, saturation, hue]``), as one block; see :func:`_jitter_block`."""
    check_order(order)
    blk = _RowParams(factors, y.device).blocks([y.shape[0]])[0]
    return _jitter_block(y, blk, bound, order)


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


# Rows and blocks in colour_jobs.  The colour operations are memory-bound and need ~60 bytes of
# live temporaries per pixel: a block has to stay in the L2 cache (2 MB per core here) through
# all the operations, and smaller blocks pay more per-call overhead.  45k pixels (2 blocks per
# sample of the paper preset) was the fastest size measured (docs/performance.md).
_ROW_MAX = 8192
_BLOCK_PIXELS = 45056


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


def _row_parts(lay: _ViewLayout, rows: Tensor) -> list[Tensor]:
    """The parts of ``rows [K,3,Q]`` that hold the batch of ``lay``: ``[B, full, 3, r, W]`` for
    the complete chunks and ``[B, 3, rest, W]`` for the last, shorter one (where present); see
    :func:`_image_parts` for the matching parts of the images."""
    B, W, r, n = lay.batch, lay.width, lay.rows, lay.chunks
    R = rows[lay.start:lay.start + B * n].view(B, n, 3, -1)
    full = lay.height // r
    parts = []
    if full:
        parts.append(R[:, :full, :, :r * W].unflatten(3, (r, W)))
    rest = lay.height - full * r
    if rest:
        parts.append(R[:, full, :, :rest * W].unflatten(2, (rest, W)))
    return parts


def _image_parts(lay: _ViewLayout, img: Tensor) -> list[Tensor]:
    """The parts of ``img [B,3,H,W]`` (any strides) matching :func:`_row_parts`: one
    ``as_strided`` view each (chained slicing and reshaping would cost four)."""
    sb, sc, sh, sw = img.stride()
    B, W, r = lay.batch, lay.width, lay.rows
    full = lay.height // r
    base = img.storage_offset()
    parts = []
    if full:
        parts.append(img.as_strided((B, full, 3, r, W), (sb, r * sh, sc, sh, sw), base))
    rest = lay.height - full * r
    if rest:
        parts.append(img.as_strided((B, 3, rest, W), (sb, sc, sh, sw), base + full * r * sh))
    return parts


class _Workspace:
    """Row buffers for jobs of one row layout, with the views every job uses (made once and
    reused job after job, so that the buffers stay in the cache): rows ``y [K,3,Q]`` (float),
    ``y8`` (uint8), per-row channel sums, their blocks, the row parts of each view and the
    padding to zero, and the layout's item-mean matrices."""

    def __init__(self, shapes: tuple[tuple[int, int, int], ...], device: torch.device) -> None:
        Q, K, layouts, onehot, pixels, owner = _row_layout(shapes)
        self.Q, self.K, self.layouts, self.owner = Q, K, layouts, owner
        self.y = torch.empty(K, 3, Q, dtype=torch.float32, device=device)
        self.y8 = torch.empty(K, 3, Q, dtype=torch.uint8, device=device)
        self.row_sums = torch.empty(K, 3, dtype=torch.float32, device=device)
        per_block = max(1, _BLOCK_PIXELS // Q)
        self.sizes = [min(per_block, K - a) for a in range(0, K, per_block)]
        self.bounds = [(a, a + n) for a, n in zip(range(0, K, per_block), self.sizes,
                                                 strict=True)]
        self.y_blocks = self.y.split(self.sizes)
        self.y8_blocks = self.y8.split(self.sizes)
        self.sum_blocks = self.row_sums.split(self.sizes)
        self.y_parts = [_row_parts(lay, self.y) for lay in layouts]
        self.y8_parts = [_row_parts(lay, self.y8) for lay in layouts]
        # Pixels of the rows that hold no image pixel (zeroed for every job).
        self.padding = []
        for lay in layouts:
            R = self.y[lay.start:lay.start + lay.batch * lay.chunks].view(
                lay.batch, lay.chunks, 3, Q)
            used = lay.rows * lay.width
            if used < Q:
                self.padding.append(R[..., used:])
            rest = lay.height % lay.rows
            if rest:
                self.padding.append(R[:, -1, :, rest * lay.width:used])
        self.onehot = onehot.to(device)  # [K, I]
        self.pixels = pixels.to(device)  # [I]
        self.gray_row = _GRAY_ROW.to(device)


_IDENTITY_LIST = [1.0, 1.0, 1.0, 0.0]


def colour_jobs(jobs: Sequence[ColourJob]) -> None:
    """Colour-jitter and grayscale the views of every job into its ``outs`` (no flip: see
    :func:`flip_job_outputs_`). Each job is computed exactly as it would be alone (the same blocks,
    the same operations on the same values), so a batch of jobs gives bit for bit the pixels of one
    call per job; what the batch shares is everything around the pixel work: one conversion of the
    parameters for all jobs, and one set of row buffers and views, reused job after job while they
    are still in the cache.

    How each job is computed: its items are copied (and converted to float) into K rows of Q
    pixels: each item is cut into chunks of whole image rows (:func:`_row_layout`); unused pixels
    are 0.  Rows are processed in blocks of ~45k pixels that fit in the L2 cache.  Contrast needs
    each item's mean luma at its place in the operation order, so the operations before contrast
    sweep all blocks first (zero padding stays 0 through them and adds nothing to the sums), the
    rest in a second sweep that also applies grayscale and rounds each block to uint8, which is
    then copied to ``outs``.
    """
    if jobs:
        colour_checked_jobs(jobs, check_jobs(jobs))


def colour_checked_jobs(jobs: Sequence[ColourJob],
                        shapes: list[tuple[tuple[int, int, int], ...]]) -> None:
    """:func:`colour_jobs` after :func:`~pirl.kernels.colour_job.check_jobs` (``shapes``: what it
    returned)."""
    device = jobs[0].sources[0].device
    # One conversion to Python lists for all jobs (a .tolist() per job costs more than its rows).
    factors = torch.cat([job.params.factors for job in jobs]).tolist()
    grays = torch.cat([job.params.grayscale for job in jobs]).tolist()
    spaces: dict[tuple[tuple[int, int, int], ...], _Workspace] = {}
    plans: list[tuple[_Workspace, int, int, bool] | None] = []  # (rows, first item, jitter)
    owner: list[int] = []  # the item of every row, over all jobs
    sizes: list[int] = []  # the blocks of rows, over all jobs
    item = 0
    for job, shape in zip(jobs, shapes, strict=True):
        n = len(job.params)
        jitter = any(f != _IDENTITY_LIST for f in factors[item:item + n])
        if jitter or any(grays[item:item + n]):
            if shape not in spaces:
                spaces[shape] = _Workspace(shape, device)
            space = spaces[shape]
            plans.append((space, len(sizes), item, jitter))
            owner.extend(item + i for i in space.owner)
            sizes.extend(space.sizes)
        else:
            plans.append(None)
        item += n
    blocks = _RowParams(factors, device, owner).blocks(sizes) if owner else []
    for job, plan in zip(jobs, plans, strict=True):
        if plan is None:  # nothing but (later) flips
            for v, o in zip(job.sources, job.outs, strict=True):
                o.copy_(v)
            continue
        space, b0, item0, jitter = plan
        _colour_job(job, space, blocks[b0:b0 + len(space.sizes)], item0, jitter, grays)


def _colour_job(job: ColourJob, space: _Workspace, blocks: list[_Block], item0: int,
                jitter: bool, grays: list[bool]) -> None:
    """One job of :func:`colour_jobs` in ``space``'s buffers: ``blocks`` are its rows'
    parameters, ``grays[item0 + i]`` whether its item i ends grayscale."""
    K = space.K
    for v, lay, parts in zip(job.sources, space.layouts, space.y_parts, strict=True):
        for rows_part, img_part in zip(parts, _image_parts(lay, v), strict=True):
            rows_part.copy_(img_part)
    for pad in space.padding:
        pad.zero_()
    ops = list(job.params.jitter_order) if jitter else []
    # Contrast that changes some row needs the item means: the operations before it first.
    split = 1 in ops and any(blk.active[1] for blk in blocks)
    stages = [ops[:ops.index(1)], ops[ops.index(1):]] if split else [ops]
    parts = list(space.y_blocks)
    row_gray = [grays[item0 + i] for i in space.owner]
    offsets: Sequence[Tensor | None] = [None] * len(blocks)
    for si, stage in enumerate(stages):
        last = si == len(stages) - 1
        if si == 1:
            # Each item's mean luma (the rows' sums, added up per item), then contrast's
            # (1 - c) * mean for each of its rows.
            luma = torch.mv(space.row_sums, space.gray_row)  # [K]
            item_mean = torch.matmul(luma, space.onehot) / space.pixels  # [I]
            offset = torch.mv(space.onehot, item_mean).view(K, 1, 1)
            offsets = [off.mul_(blk.keep)
                       for off, blk in zip(offset.split(space.sizes), blocks, strict=True)]
        for bi, ((a, b), blk) in enumerate(zip(space.bounds, blocks, strict=True)):
            yb = _jitter_block(parts[bi], blk, 255.0, stage, offsets[bi])
            if not last:
                torch.sum(yb, dim=2, out=space.sum_blocks[bi])
                parts[bi] = yb  # possibly a new tensor (saturation, hue): no copy back
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
                run.copy_(torch.matmul(space.gray_row, run).unsqueeze(1).expand_as(run))
                i = j
            _round_to_uint8(yb, space.y8_blocks[bi])
    for out, lay, parts8 in zip(job.outs, space.layouts, space.y8_parts, strict=True):
        for rows_part, img_part in zip(parts8, _image_parts(lay, out), strict=True):
            img_part.copy_(rows_part)


def flip_job_outputs_(jobs: Sequence[ColourJob]) -> None:
    """Apply each job's horizontal flips (``params.flip``, one per item over its outputs in
    order) to its coloured ``outs`` in place: the step after :func:`colour_jobs` (the flip
    commutes with every colour operation, so it may come last)."""
    if not jobs:
        return
    flips = torch.cat([job.params.flip for job in jobs]).tolist()  # one conversion for all
    start = 0
    for job in jobs:
        for out in job.outs:
            flip_items_(out, flips[start:start + out.shape[0]])
            start += out.shape[0]


def flip_items_(v: Tensor, flips: Sequence[bool]) -> Tensor:
    """Horizontally flip, in place, the items of ``v [N,3,H,W]`` marked in ``flips``; returns
    ``v``.  Item by item: a gather / flip / scatter of all of them at once (advanced indexing)
    costs 3x more on uint8."""
    if len(flips) != v.shape[0]:
        raise ValueError(f"{len(flips)} flip flags for {v.shape[0]} items")
    for i, f in enumerate(flips):
        if f:
            v[i] = v[i].flip(-1)
    return v
