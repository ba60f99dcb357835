"""The jigsaw view I^t (docs/method.md, "Views") and the maximal-Hamming permutation set.

Geometry at the paper's numbers (``view_preset(224)``): an *independent* random resized crop
covering at least 60% of the image, resized to 255 x 255, cut into a 3 x 3 grid of 85 x 85 cells;
from each cell one 64 x 64 patch at a random offset (0..21 in each direction, drawn per cell, so
patch edges do not line up across cells); colour jitter, grayscale and flip drawn for each patch
independently; the 9 patches returned in a random order (any of 9! permutations).

The fast path: the image is a uint8 tensor from the start, the crop is resized once with torch's
uint8 antialiased resize, the patches are slices of it, and the photometric augmentation of all 9
patches is one batched call (:func:`pirl.data.augment.apply_photometric`); in training it waits
for the batch (:meth:`JigsawView.draw`, :class:`pirl.data.views.ColourCollate`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pirl.config import ViewConfig
from pirl.data.augment import (
    ImageLike,
    Photometric,
    apply_photometric,
    resized_crop,
    sample_crop_box,
    sample_photometric,
    to_uint8_tensor,
)


@dataclass
class JigsawParams:
    """Everything that was drawn for one jigsaw view (for tests and ``show_views``).

    ``crop_box`` is ``(top, left, h, w)`` in the input image; the crop is resized to
    ``jigsaw_crop`` and then rotated by ``rotation`` quarter turns (``torch.rot90`` on the last two
    dims; 0 unless the view rotates).  ``offsets[c] = (dy, dx)`` is the patch position inside grid
    cell ``c`` (row-major), so that cell's patch is ``crop[:, r*cell + dy : ... + patch,
    col*cell + dx : ... + patch]``.  ``order[k]`` is the cell of the k-th returned patch and
    ``photometric`` holds the parameters of the returned patches in returned order (None when
    photometric augmentation is off).
    """

    crop_box: tuple[int, int, int, int]
    rotation: int
    offsets: Tensor  # Long [P, 2]
    order: Tensor  # Long [P]
    photometric: Photometric | None


class JigsawView:
    """The jigsaw view: ``__call__(img) -> (patches uint8 [P,3,p,p], order Long[P])``.

    Args:
        cfg: geometry (``jigsaw_crop``, ``jigsaw_scale_min``, ``grid``, ``cell``, ``patch``) and
            photometric strengths.
        photometric: apply colour jitter / grayscale / flip to each patch (False for geometry
            tests and for looking at the raw cut).
        shuffle: return the patches in a random order (False: row-major cell order).
        rotate: rotate the resized crop by a random multiple of 90 degrees before cutting
            (PIRL's Jigsaw+Rotation pretext: rotate first, then cut the patches).
        generator: optional ``torch.Generator`` (default: torch's global generator).
        orders: optional Long ``[K,P]`` set of permutations: a shuffled view takes its order
            from a uniformly drawn row instead of any of the P! (PIRL with a fixed |T|).
    """

    def __init__(self, cfg: ViewConfig, photometric: bool = True, shuffle: bool = True,
                 rotate: bool = False, generator: torch.Generator | None = None,
                 orders: Tensor | None = None) -> None:
        if cfg.patch > cfg.cell or cfg.grid * cfg.cell > cfg.jigsaw_crop:
            raise ValueError(f"jigsaw geometry does not fit: grid={cfg.grid} x cell={cfg.cell} "
                             f"in jigsaw_crop={cfg.jigsaw_crop}, patch={cfg.patch}")
        self.cfg = cfg
        self.photometric = photometric
        self.shuffle = shuffle
        self.rotate = rotate
        self.generator = generator
        if orders is not None and (orders.dim() != 2 or orders.shape[1] != cfg.grid**2):
            raise ValueError(f"orders: expected [K, {cfg.grid**2}], got {list(orders.shape)}")
        self.orders = None if orders is None else orders.long()

    @property
    def num_patches(self) -> int:
        return self.cfg.grid * self.cfg.grid

    def __call__(self, img: ImageLike, return_params: bool = False
                 ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, JigsawParams]:
        """``img``: PIL image or uint8 ``[3,H,W]``.  Returns ``(patches [P,3,p,p] uint8,
        order Long[P])``, plus :class:`JigsawParams` when ``return_params``."""
        patches, params = self.draw(img)
        if params.photometric is not None:
            patches = apply_photometric(patches, params.photometric,
                                        self.cfg.colour_backend)
        else:
            patches = patches.contiguous()
        if return_params:
            return patches, params.order, params
        return patches, params.order

    def draw(self, img: ImageLike) -> tuple[Tensor, JigsawParams]:
        """Everything random, nothing coloured yet: the patches and parameters of :meth:`cut`
        plus, when photometric, the patches' photometric parameters (in returned order)."""
        patches, params = self.cut(img)
        if self.photometric:
            params.photometric = sample_photometric(self.num_patches, self.cfg, self.generator)
        return patches, params

    def cut(self, img: ImageLike) -> tuple[Tensor, JigsawParams]:
        """The geometric part alone: the patches ``[P,3,p,p]`` uint8 (not yet colour-augmented,
        channels-last strided) in returned order, and the parameters drawn (with
        ``photometric=None``).  :class:`pirl.data.views.TrainTransform` uses this to augment
        the image view and the patches in one batched colour call."""
        cfg, g = self.cfg, self.generator
        x = to_uint8_tensor(img)
        box = sample_crop_box(x.shape[1], x.shape[2], (cfg.jigsaw_scale_min, 1.0), g)
        crop = resized_crop(x, box, cfg.jigsaw_crop)  # [3, crop, crop]
        rotation = int(torch.randint(4, (1,), generator=g)) if self.rotate else 0
        if rotation:
            crop = torch.rot90(crop, rotation, dims=(1, 2))
        P, p, cell, grid = self.num_patches, cfg.patch, cfg.cell, cfg.grid
        # Independent offset per cell and direction, uniform over 0..cell-patch inclusive.
        offsets = torch.randint(cell - p + 1, (P, 2), generator=g)
        if not self.shuffle:
            order = torch.arange(P)
        elif self.orders is None:
            order = torch.randperm(P, generator=g)
        else:
            order = self.orders[int(torch.randint(len(self.orders), (1,), generator=g))]
        offs = offsets.tolist()
        tops = [(c // grid) * cell + offs[c][0] for c in range(P)]
        lefts = [(c % grid) * cell + offs[c][1] for c in range(P)]
        # Slicing the patches straight in the returned order saves a gather.  The crop is
        # channels-last (the resize's layout): stacking its pixels as [P, p, p, 3] copies runs
        # of 3p bytes (32 us), where a planar [P, 3, p, p] stack transposes every pixel (100
        # us); the colour step reads either layout.
        hwc = crop.permute(1, 2, 0)
        patches = torch.stack([hwc[tops[c]:tops[c] + p, lefts[c]:lefts[c] + p]
                               for c in order.tolist()]).permute(0, 3, 1, 2)  # [P, 3, p, p]
        return patches, JigsawParams(box, rotation, offsets, order, None)


def hamming_distances(perms: Tensor, others: Tensor) -> Tensor:
    """Pairwise Hamming distances: ``perms [A,P]``, ``others [B,P]`` -> Long ``[A,B]``."""
    return (perms[:, None, :] != others[None, :, :]).sum(-1)


# Above this many permutations (P! for P = grid^2) the candidate pool is a random sample.
_POOL_LIMIT = 400_000


def maximal_hamming_permutations(n: int, grid: int = 3, seed: int = 0) -> Tensor:
    """A set of ``n`` permutations of ``grid^2`` cells far apart in Hamming distance.

    Algorithm (greedy farthest-point selection, deterministic from ``seed``):

    1. The candidate pool is every permutation of P = grid^2 items when P! <= 400,000 (all 9! =
       362,880 for the 3 x 3 jigsaw), otherwise 400,000 random permutations; its order is
       shuffled by ``seed``.
    2. The first permutation is the first of the shuffled pool.
    3. Each round adds the candidate whose *minimum* Hamming distance to the chosen set is largest;
       ties go to the largest *total* distance to the chosen set (Noroozi & Favaro's criterion),
       then to the earlier pool position.  Each candidate's minimum and total are updated with
       its distance to the newly chosen permutation only, so a round costs O(pool x P).
    4. ``n`` = the whole pool (``P!``) skips the rounds: the set is every permutation, in the
       shuffled pool's order (PIRL's |T| = 9! point of Fig. 7).

    The greedy set is not optimal (at n = 1000 its minimum distance is 5; a random set of that
    size has minimum distance 0) but it is the standard construction.

    Returns Long ``[n, P]``; row i is a permutation of ``0..P-1`` (the cell shown at position k is
    ``row[k]``).  Rows are unique; chosen candidates have distance 0 to themselves, so they are
    never picked twice.
    """
    P = grid * grid
    total = math.factorial(P)
    if grid < 2:
        raise ValueError(f"grid={grid}: need at least 2 x 2 cells")
    if not 1 <= n <= total:
        raise ValueError(f"n={n}: a {grid}x{grid} grid has {total} permutations; ask for "
                         f"1..{total}")
    rng = np.random.default_rng(seed)
    if total <= _POOL_LIMIT:
        pool = np.array(list(itertools.permutations(range(P))), dtype=np.int8)
        pool = pool[rng.permutation(len(pool))]
    else:
        pool = np.argsort(rng.random((_POOL_LIMIT, P)), axis=1).astype(np.int8)
        pool = np.unique(pool, axis=0)
        pool = pool[rng.permutation(len(pool))]
        if n > len(pool):
            raise ValueError(f"n={n}: larger than the sampled pool of {len(pool)} permutations")
    if n == len(pool):
        # Every permutation: the greedy rounds would pick the whole pool (rows are unique), at a
        # cost of O(P!^2) for the order alone; the shuffled pool is the same set.
        return torch.from_numpy(pool.astype(np.int64))
    # matches[k, v] = 1 where a candidate shows item v at position k ([P, P, K] uint8): the
    # number of positions where a candidate agrees with permutation q is then the sum of the P
    # rows matches[k, q[k]], which is far faster than comparing [K, P] arrays row by row.
    matches = (pool.T[:, None, :] == np.arange(P, dtype=np.int8)[None, :, None]).astype(np.uint8)
    positions = np.arange(P)

    def distances(q: np.ndarray) -> np.ndarray:
        return P - matches[positions, q].sum(0, dtype=np.int32)

    chosen = [0]
    min_d = distances(pool[0])
    sum_d = min_d.copy()
    # Lexicographic key (min distance, total distance) in one integer: total < n * P + 1.
    weight = np.int32(n * P + 1)
    for _ in range(1, n):
        j = int(np.argmax(min_d * weight + sum_d))
        chosen.append(j)
        d = distances(pool[j])
        np.minimum(min_d, d, out=min_d)
        sum_d += d
    return torch.from_numpy(pool[chosen].astype(np.int64))
