"""The views the network sees (docs/method.md, "Views") and the train / eval transforms.

* Image view I: random resized crop to ``image_size`` (area ``image_scale_min``..1, aspect
  3/4..4/3), horizontal flip, colour jitter (with probability ``jitter_prob``), random grayscale.
* Jigsaw view I^t: :class:`pirl.data.jigsaw.JigsawView` (re-exported here).
* Rotation view: an independently augmented image view rotated by 0 / 90 / 180 / 270 degrees.
* Jigsaw+Rotation: the jigsaw crop is rotated first, then cut into patches.

Every view returns uint8 tensors (4x less traffic between DataLoader workers and the trainer than
float); :func:`normalize` turns them into ImageNet-normalised floats on whatever device they end on.
Each transform converts a decoded PIL image to a uint8 tensor once and does all crops, resizes and
colour operations on tensors; see :mod:`pirl.data.augment` for the batched colour jitter and its
(small, documented) differences from torchvision's ``ColorJitter``.  ``pirl show-views`` draws
them (:func:`pirl.plots.show_views`).

Training defers the colour to the batch: ``TrainTransform(defer_colour=True)`` (in the DataLoader
workers, seeded per sample) returns the geometric crops and the photometric parameters it drew, and
:class:`ColourCollate` (the DataLoader's ``collate_fn``, also run in the workers) colours every view
of the batch in one :func:`pirl.kernels.colour.photometric_jobs` call.  The pixels are bit for bit
those of the per-sample path (``defer_colour=False``) for the same draws and the same colour
backend (``views.colour_backend``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import default_collate, get_worker_info

from pirl.config import ViewConfig
from pirl.data.augment import (
    ImageLike,
    Photometric,
    apply_photometric,
    resize,
    resized_crop,
    sample_crop_box,
    sample_photometric,
    to_uint8_tensor,
)
from pirl.data.jigsaw import JigsawParams, JigsawView, maximal_hamming_permutations
from pirl.kernels.colour import photometric_jobs, resolve_colour_backend
from pirl.kernels.colour_job import ColourJob

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "normalize", "ImageView", "ImageParams", "JigsawView",
    "JigsawParams", "RotationView", "maximal_hamming_permutations", "SampleViews",
    "build_eval_transform", "TrainTransform", "EvalTransform", "COLOUR_KEY",
    "DeferredColour", "ColourCollate", "colour_batch",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(x: Tensor) -> Tensor:
    """uint8 ``[...,3,H,W]`` (0..255) -> float32 ``(x / 255 - mean) / std`` with ImageNet's
    per-channel mean and std, on ``x``'s device (call it after the transfer to the GPU)."""
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {x.dtype}")
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"normalize expects [...,3,H,W], got {list(x.shape)}")
    # (x/255 - m)/s = x * (1/(255 s)) - m/s: one multiply-add per element.
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    return x.float().mul_(1.0 / (255.0 * std)).sub_(mean / std)


@dataclass
class ImageParams:
    """What was drawn for one image view: the crop ``(top, left, h, w)`` in the input image and
    the photometric parameters (None when photometric augmentation is off)."""

    crop_box: tuple[int, int, int, int]
    photometric: Photometric | None


class ImageView:
    """The image view I: ``__call__(img) -> uint8 [3,S,S]`` with S = ``cfg.image_size``.

    ``photometric=False`` keeps only the random resized crop (for tests and inspection);
    ``generator`` optionally replaces torch's global generator.
    """

    def __init__(self, cfg: ViewConfig, photometric: bool = True,
                 generator: torch.Generator | None = None) -> None:
        self.cfg = cfg
        self.photometric = photometric
        self.generator = generator

    def __call__(self, img: ImageLike, return_params: bool = False
                 ) -> Tensor | tuple[Tensor, ImageParams]:
        view, params = self.draw(img)
        if params.photometric is not None:
            view = apply_photometric(view[None], params.photometric,
                                     self.cfg.colour_backend)[0]
        else:
            view = view.contiguous()
        if return_params:
            return view, params
        return view

    def draw(self, img: ImageLike) -> tuple[Tensor, ImageParams]:
        """Everything random, nothing coloured yet: the crop (as :meth:`crop`) and, when
        photometric, the parameters of its colour augmentation."""
        view, params = self.crop(img)
        if self.photometric:
            params.photometric = sample_photometric(1, self.cfg, self.generator)
        return view, params

    def crop(self, img: ImageLike) -> tuple[Tensor, ImageParams]:
        """The geometric part alone: the random resized crop ``[3,S,S]`` uint8 (possibly
        channels-last strided) and its parameters (``photometric=None``)."""
        cfg = self.cfg
        x = to_uint8_tensor(img)
        box = sample_crop_box(x.shape[1], x.shape[2], (cfg.image_scale_min, 1.0), self.generator)
        return resized_crop(x, box, cfg.image_size), ImageParams(box, None)


class RotationView:
    """A standard-augmented image view rotated by ``90 * r`` degrees counter-clockwise
    (``torch.rot90``), r uniform in 0..3: ``__call__(img) -> (uint8 [3,S,S], r)``.

    The crop is rotated before its colour augmentation (colour acts on each pixel and commutes
    with the rotation), so that the rotated crop can wait for a batched colour call."""

    def __init__(self, cfg: ViewConfig, photometric: bool = True,
                 generator: torch.Generator | None = None) -> None:
        self.image_view = ImageView(cfg, photometric, generator)
        self.generator = generator
        self.backend = cfg.colour_backend

    def __call__(self, img: ImageLike) -> tuple[Tensor, int]:
        view, photometric, r = self.draw(img)
        if photometric is not None:
            return apply_photometric(view[None], photometric, self.backend)[0], r
        return view.contiguous(), r

    def draw(self, img: ImageLike) -> tuple[Tensor, Photometric | None, int]:
        """Everything random, nothing coloured yet: the rotated crop uint8 ``[3,S,S]`` (any
        strides), its photometric parameters (None when off) and r."""
        view, params = self.image_view.draw(img)
        r = int(torch.randint(4, (1,), generator=self.generator))
        return torch.rot90(view, r, dims=(1, 2)), params.photometric, r


# The key under which TrainTransform(defer_colour=True) leaves the colour still to be done.
COLOUR_KEY = "deferred_colour"


@dataclass
class DeferredColour:
    """The colour augmentation one training sample still needs: one ``(keys, parameters)`` pair
    per job.  A job's items are those of its keys' tensors in order (an ``[n,3,H,W]`` tensor is
    n items, a ``[3,H,W]`` one a single item) and share the parameters' jitter order."""

    jobs: list[tuple[tuple[str, ...], Photometric]]


def _items(x: Tensor) -> Tensor:
    """A view as ``[n,3,H,W]`` items (a single ``[3,H,W]`` view is one item)."""
    return x if x.dim() == 4 else x.unsqueeze(0)


PatchOrder = Literal["shuffled", "permutation"]


@dataclass(frozen=True)
class SampleViews:
    """Which views one training sample holds.  Each method declares its own
    (``pirl.methods``); :class:`TrainTransform` draws them.

    * ``image``: key ``image`` [3,S,S], the image view I.
    * ``patches``: key ``patches`` [P,3,p,p], the jigsaw view.  ``"shuffled"`` (PIRL's I^t): in a
      random order, coloured in one job with the image view; ``"permutation"`` (the Jigsaw
      baseline): ordered by a permutation drawn from a fixed set, whose index is ``perm_label``.
    * ``rotate_patches``: rotate the jigsaw crop before cutting it (Jigsaw+Rotation).
    * ``rotated``: key ``rotated`` [3,S,S], an independently augmented image view rotated by
      90 r degrees; ``rotation_label`` adds r as ``rotation``.
    """

    image: bool = False
    patches: PatchOrder | None = None
    rotate_patches: bool = False
    rotated: bool = False
    rotation_label: bool = False


class TrainTransform:
    """PIL image -> dict of uint8 views (and labels) for one training sample, as ``views`` asks.

    The random numbers are drawn in a fixed order, the same for every composition: the image
    view alone (crop, colour) when it is not coloured with shuffled patches; then the jigsaw view
    (permutation: cut, the cells' colour, the permutation; shuffled: the image crop, the cut, then
    the colour of the image and the patches in one draw); then the rotated view (crop, colour, r).

    With ``defer_colour=True`` the views are the geometric crops only (uint8, any strides) and
    the sample also holds ``COLOUR_KEY``: a :class:`DeferredColour` with the photometric
    parameters drawn for them; :class:`ColourCollate` applies them to the whole batch.  The
    random numbers are drawn in the same order either way, so a seeded sample gets the same
    pixels in both modes.

    ``permutations`` Long ``[n, P]`` is the permutation set of ``patches="permutation"``; with
    ``patches="shuffled"`` it is optional: the orders are drawn from it instead of all P!.
    Picklable (DataLoader workers); randomness from torch's global generator unless one is given.
    """

    def __init__(self, cfg: ViewConfig, views: SampleViews, permutations: Tensor | None = None,
                 generator: torch.Generator | None = None, defer_colour: bool = False) -> None:
        if not (views.image or views.patches or views.rotated):
            raise ValueError(f"{views}: a training sample needs at least one view")
        if views.rotate_patches and views.patches is None:
            raise ValueError(f"{views}: rotate_patches without patches")
        if views.rotation_label and not views.rotated:
            raise ValueError(f"{views}: rotation_label without the rotated view")
        self.views = cfg
        self.sample = views
        self.generator = generator
        self.defer_colour = defer_colour
        self.image_view = ImageView(cfg, generator=generator)
        self.jigsaw_view: JigsawView | None = None
        self.rotation_view: RotationView | None = None
        self.permutations: Tensor | None = None
        if views.patches is not None:
            # "permutation": row-major cells; the order comes from the permutation set instead.
            shuffled = views.patches == "shuffled"
            self.jigsaw_view = JigsawView(cfg, shuffle=shuffled, rotate=views.rotate_patches,
                                          generator=generator,
                                          orders=permutations if shuffled else None)
        if views.patches == "permutation":
            if permutations is None:
                raise ValueError("patches='permutation' needs the permutation set")
            if permutations.dim() != 2 or permutations.shape[1] != cfg.grid * cfg.grid:
                raise ValueError(f"permutations: expected [n, {cfg.grid * cfg.grid}], got "
                                 f"{list(permutations.shape)}")
            self.permutations = permutations.long()
        if views.rotated:
            self.rotation_view = RotationView(cfg, generator=generator)

    def __call__(self, img: ImageLike) -> dict[str, Any]:
        out, jobs = self.draw(img)
        if self.defer_colour:
            return {**out, COLOUR_KEY: DeferredColour(jobs)}
        for keys, photometric in jobs:
            coloured = apply_photometric([_items(out[k]) for k in keys], photometric,
                                         self.views.colour_backend)
            for k, c in zip(keys, coloured, strict=True):
                out[k] = c.view(out[k].shape)
        return out

    def draw(self, img: ImageLike
             ) -> tuple[dict[str, Tensor], list[tuple[tuple[str, ...], Photometric]]]:
        """Everything random for one sample, nothing coloured yet: the sample's keys with the
        geometric crops (uint8, any strides) and the colour jobs ``(keys, parameters)``."""
        want = self.sample
        x = to_uint8_tensor(img)  # decode-to-tensor once, shared by every view of the sample
        out: dict[str, Tensor] = {}
        jobs: list[tuple[tuple[str, ...], Photometric]] = []
        if want.image and want.patches != "shuffled":
            view, params = self.image_view.draw(x)
            assert params.photometric is not None
            out["image"] = view
            jobs.append((("image",), params.photometric))
        if want.patches == "permutation":
            assert self.jigsaw_view is not None and self.permutations is not None
            cells, jig = self.jigsaw_view.draw(x)
            assert jig.photometric is not None
            label = int(torch.randint(len(self.permutations), (1,), generator=self.generator))
            perm = self.permutations[label]
            out["patches"] = cells[perm]  # k-th patch = cell perm[k], with that cell's colour
            out["perm_label"] = torch.tensor(label, dtype=torch.long)
            jobs.append((("patches",), jig.photometric.index(perm)))
        elif want.patches == "shuffled":
            assert self.jigsaw_view is not None
            # Crops first; the image view and its P patches, each with its own parameters,
            # then share one batched colour call.
            keys: tuple[str, ...] = ("patches",)
            if want.image:
                out["image"], _ = self.image_view.crop(x)
                keys = ("image", "patches")
            patches, _ = self.jigsaw_view.cut(x)
            out["patches"] = patches
            count = len(patches) + (1 if want.image else 0)
            jobs.append((keys, sample_photometric(count, self.views, self.generator)))
        if self.rotation_view is not None:
            rotated, photometric, r = self.rotation_view.draw(x)
            assert photometric is not None
            out["rotated"] = rotated
            jobs.append((("rotated",), photometric))
            if want.rotation_label:
                out["rotation"] = torch.tensor(r, dtype=torch.long)
        return out, jobs


def _batch_tensor(like: Tensor, batch: int) -> Tensor:
    """An uninitialised ``[batch, *like.shape]`` tensor of ``like``'s dtype; in a DataLoader
    worker in shared memory, as ``default_collate`` does, so that sending the batch to the main
    process does not copy it once more."""
    if get_worker_info() is not None:
        storage = like._typed_storage()._new_shared(batch * like.numel(), device=like.device)
        return like.new(storage).resize_(batch, *like.shape)
    return torch.empty((batch, *like.shape), dtype=like.dtype, device=like.device)


def colour_batch(samples: Sequence[dict[str, Any]], backend: str = "auto") -> dict[str, Tensor]:
    """Apply the deferred colour of ``samples`` (from ``TrainTransform(defer_colour=True)``, all
    of one transform) in one :func:`pirl.kernels.colour.photometric_jobs` call with ``backend``
    (one of :data:`pirl.config.COLOUR_BACKENDS`).

    Returns ``{key: uint8 [B, *shape]}`` for every coloured key, contiguous, sample i at index i:
    bit for bit what ``defer_colour=False`` gives each sample.  The results are written straight
    into the batch tensors (no stacking copy)."""
    if not samples:
        raise ValueError("colour_batch: no samples")
    structure = [keys for keys, _ in samples[0][COLOUR_KEY].jobs]
    outs = {k: _batch_tensor(samples[0][k], len(samples)) for keys in structure for k in keys}
    jobs: list[ColourJob] = []
    for i, sample in enumerate(samples):
        deferred = sample[COLOUR_KEY]
        if [keys for keys, _ in deferred.jobs] != structure:
            raise ValueError(f"sample {i} has colour jobs {[k for k, _ in deferred.jobs]}, "
                             f"sample 0 {structure}: one transform per batch")
        for keys, photometric in deferred.jobs:
            jobs.append(ColourJob([_items(sample[k]) for k in keys],
                                  [_items(outs[k][i]) for k in keys], photometric))
    photometric_jobs(jobs, backend)
    return outs


class ColourCollate:
    """DataLoader ``collate_fn`` for ``TrainTransform(defer_colour=True)`` samples: the colour
    of every view of the batch in one call (:func:`colour_batch`), everything else (indices,
    labels, ``skipped`` counts, ...) by ``inner`` (default: torch's ``default_collate``;
    :func:`pirl.data.datasets.collate_views` to drop unreadable ``None`` items).  Samples without
    deferred colour go to ``inner`` unchanged.  Picklable; runs in the DataLoader workers.

    ``backend`` (``views.colour_backend``) is resolved here, in the process that builds the
    DataLoader; resolving imports the numba kernel (compiled or loaded from disk) there, so that
    forked workers inherit it; ``self.backend`` is the resolved name ("numba" or "torch")."""

    def __init__(self, inner: Callable[[list[Any]], Any] = default_collate,
                 backend: str = "auto") -> None:
        self.inner = inner
        self.backend = resolve_colour_backend(backend)

    def __call__(self, batch: list[dict[str, Any] | None]) -> Any:
        deferred = [b for b in batch if b is not None and COLOUR_KEY in b]
        if not deferred:
            return self.inner(batch)
        if len(deferred) != sum(b is not None for b in batch):
            raise ValueError("a batch mixes samples with and without deferred colour")
        coloured = colour_batch(deferred, self.backend)
        rest = [None if b is None else
                {k: v for k, v in b.items() if k != COLOUR_KEY and k not in coloured}
                for b in batch]
        out = self.inner(rest)
        out.update(coloured)
        return out


class EvalTransform:
    """Resize the shorter side to ``eval_resize`` (bilinear, antialiased), centre-crop
    ``image_size``: PIL -> uint8 ``[3,S,S]``.  Deterministic."""

    def __init__(self, cfg: ViewConfig) -> None:
        if cfg.eval_resize < cfg.image_size:
            raise ValueError(f"views.eval_resize={cfg.eval_resize} is below "
                             f"views.image_size={cfg.image_size}")
        self.resize_to = cfg.eval_resize
        self.size = cfg.image_size

    def __call__(self, img: ImageLike) -> Tensor:
        x = to_uint8_tensor(img)
        h, w = x.shape[1], x.shape[2]
        # Same rounding as torchvision's Resize(int): the longer side is truncated.
        if h <= w:
            new = (self.resize_to, int(self.resize_to * w / h))
        else:
            new = (int(self.resize_to * h / w), self.resize_to)
        x = resize(x, new)
        top = int(round((new[0] - self.size) / 2.0))
        left = int(round((new[1] - self.size) / 2.0))
        return x[:, top:top + self.size, left:left + self.size].contiguous()


def build_eval_transform(cfg: ViewConfig) -> Callable[[ImageLike], Tensor]:
    """The evaluation transform (see :class:`EvalTransform`)."""
    return EvalTransform(cfg)
