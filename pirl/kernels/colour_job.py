"""What every colour engine takes: a :class:`ColourJob` (views, where their result goes, and their
parameters), the check of a batch of jobs, and the luma weights both engines use.

The engines read the parameters through :class:`ColourParams` only, the part of
:class:`pirl.data.augment.Photometric` they need, so that they do not depend on the data package
that calls them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from pirl.presets import PHOTO_OP_NAMES

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale uses for tensors.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


class ColourParams(Protocol):
    """Per-item photometric parameters of B items (:class:`pirl.data.augment.Photometric`).

    ``factors`` float ``[B,4]``: (brightness, contrast, saturation, hue shift in turns);
    ``grayscale``, ``flip`` bool ``[B]``; ``jitter_order``: the operations (0 brightness,
    1 contrast, 2 saturation, 3 hue) in the order they are applied to every item; ``ops``: the
    optional operations after the jitter (:class:`OpParams`), None when off.
    """

    @property
    def factors(self) -> Tensor: ...

    @property
    def grayscale(self) -> Tensor: ...

    @property
    def flip(self) -> Tensor: ...

    @property
    def jitter_order(self) -> tuple[int, ...]: ...

    @property
    def ops(self) -> OpParams | None: ...

    def __len__(self) -> int: ...


@dataclass
class ColourJob:
    """One unit of the batched colour augmentation: views that share one jitter order (one
    sample's image view and its jigsaw patches, say), where their result goes, and their
    parameters.

    ``sources``: uint8 ``[n_l,3,H_l,W_l]`` tensors (planar or channels-last); ``outs``: uint8
    tensors of the same shapes that receive the result (overwritten; any strides, e.g. slices of
    a collated batch) that do not overlap the sources; ``params``: ``sum(n_l)`` parameter sets in
    order, one jitter order.
    """

    sources: Sequence[Tensor]
    outs: Sequence[Tensor]
    params: ColourParams


def check_order(order: Sequence[int]) -> None:
    """Raise ValueError unless every operation of ``order`` is one of 0..3."""
    if any(op not in (0, 1, 2, 3) for op in order):
        raise ValueError(f"unknown colour operation in {tuple(order)} (expected 0..3)")


def check_jobs(jobs: Sequence[ColourJob]) -> list[tuple[tuple[int, int, int], ...]]:
    """Check every job's views, outputs and parameters; returns each job's ``(B, H, W)`` per
    source."""
    shapes: list[tuple[tuple[int, int, int], ...]] = []
    for job in jobs:
        n = 0
        if len(job.sources) != len(job.outs):
            raise ValueError(f"{len(job.sources)} sources but {len(job.outs)} outputs")
        for v, o in zip(job.sources, job.outs, strict=True):
            if v.dim() != 4 or v.shape[1] != 3 or v.dtype != torch.uint8:
                raise ValueError(f"expected uint8 [B,3,H,W] views, got {v.dtype} "
                                 f"{list(v.shape)}")
            if o.shape != v.shape or o.dtype != torch.uint8:
                raise ValueError(f"output {o.dtype} {list(o.shape)} for a view "
                                 f"{list(v.shape)}")
            n += v.shape[0]
        if len(job.params) != n:
            raise ValueError(f"{len(job.params)} photometric parameter sets for {n} views")
        check_order(job.params.jitter_order)
        ops = job.params.ops
        if ops is not None and (len(ops) != n or not set(ops.names) <= set(PHOTO_OP_NAMES)):
            raise ValueError(f"photometric operations {ops.names} for {len(ops)} of {n} views "
                             f"(expected names of {PHOTO_OP_NAMES}, one parameter set per view)")
        shapes.append(tuple((v.shape[0], v.shape[2], v.shape[3]) for v in job.sources))
    return shapes


@dataclass
class OpParams:
    """Per-item parameters of the optional photometric operations of B items
    (:mod:`pirl.kernels.colour_ops`).

    ``names``: the operations (of :data:`pirl.presets.PHOTO_OP_NAMES`) in the order they are
    applied, shared by the items; ``apply`` bool ``[B]``: whether an item gets all of them (one
    coin per item, as torchvision's ``RandomApply`` over the list); ``bits`` Long ``[B]``:
    posterize's kept bits; ``sharpness`` float64 ``[B]``: the sharpness factor; ``threshold``
    Long ``[B]``: solarize's threshold (256 changes nothing).
    """

    names: tuple[str, ...]
    apply: Tensor
    bits: Tensor
    sharpness: Tensor
    threshold: Tensor

    def __len__(self) -> int:
        return int(self.apply.shape[0])

    def index(self, idx: Tensor | slice) -> OpParams:
        """The parameters of items ``idx`` (Long [K] or a slice), same operations."""
        return OpParams(self.names, self.apply[idx], self.bits[idx], self.sharpness[idx],
                        self.threshold[idx])
