"""Whole models: the trunk plus the heads of each method (PIRL, NPID, Jigsaw, Rotation).

Every model has ``.trunk`` (a torchvision ResNet with ``fc = Identity``, the product that is kept)
and takes a batch dict of *already normalised* float tensors (``pirl.data.views.normalize`` runs on
the device).  The outputs are what ``pirl.methods.Objective.loss`` consumes:

==========  =========================================  ===========================================
method      reads                                      returns
==========  =========================================  ===========================================
pirl        image [B,3,S,S] and, by pretext,           z_img [B,D], z_t [B,D] (both unit L2 norm)
            patches [B,P,3,p,p] (jigsaw,
            jigsaw+rotation) or rotated [B,3,S,S]
npid        image [B,3,S,S]                            z_img [B,D] (unit L2 norm)
jigsaw      patches [B,P,3,p,p]                        logits [B, num_permutations]
rotation    rotated [B,3,S,S]                          logits [B, 4]
==========  =========================================  ===========================================

Batch statistics: the image and the patches have different sizes, so they go through the trunk as
two separate calls, and BatchNorm (train mode) normalises each call with its own batch statistics:
the image batch over B images, the patch batch over B*P patches.  This is what the paper does
("both views go through the same trunk with ordinary BatchNorm"; no SyncBN, no shuffle-BN).  Both
calls happen inside one ``forward`` so that DistributedDataParallel, which only tracks the wrapped
forward, synchronises the gradients of both passes.

Running statistics (``model.bn_stats``): evaluation feeds whole images through the trunk in eval
mode, normalised by BatchNorm's running statistics.  If the patch call updates them too (``all``),
they end up a roughly even mix of image and patch statistics, which at small sizes (9-px patches
against 32-px images) are far apart.  In ``python benchmarks/quality.py`` the same trained weights
score kNN top-1 37.53 % on Imagenette val with ``image`` and 32.82 % with ``all`` (rows ``pirl``
and ``pirl-bn-all``).  The default ``image`` therefore lets only the image call update them;
training itself is unchanged, since train-mode BatchNorm normalises each call with its own batch
statistics either way.  Rotated images come from the image distribution, so the rotation pretext
updates them in both modes.  The Jigsaw baseline sees nothing but patches, so its statistics are
the patches'.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn.functional as F
from torch import Tensor, nn

from pirl.config import Config
from pirl.models.heads import ImageHead, JigsawClassifier, JigsawHead, RotationHead
from pirl.models.trunk import build_trunk, trunk_dim


def _need(batch: dict[str, Tensor], key: str, who: str, shape: str) -> Tensor:
    """``batch[key]`` or a clear error saying which model needed which key."""
    if key not in batch:
        raise KeyError(f"{who} needs batch[{key!r}] {shape}; the batch has keys {sorted(batch)}")
    return batch[key]


def _patch_features(trunk: nn.Module, patches: Tensor) -> Tensor:
    """Patches ``[B, P, 3, p, p]`` -> pooled trunk features ``[B, P, C]`` (one trunk call)."""
    if patches.dim() != 5:
        raise ValueError(f"patches must be [B, P, 3, p, p], got {tuple(patches.shape)}")
    b, p = patches.shape[:2]
    feats = trunk(patches.flatten(0, 1))  # [B*P, C]; patch k of image i sits at row i*P + k
    return feats.reshape(b, p, -1)


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, BatchNorm layers of ``module`` still normalise with batch statistics in
    train mode but leave their running statistics unchanged (momentum 0 keeps the old value:
    ``running = (1 - 0) * running + 0 * batch``)."""
    saved = []
    if enabled:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None:
                saved.append((m, m.momentum))
                m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


def _unit(z: Tensor) -> Tensor:
    """L2-normalise rows in float32 (under bf16 autocast the heads' output is bf16; the memory bank
    and the losses work in float32, and a 128-d norm in bf16 loses ~3 significant digits)."""
    return F.normalize(z.float(), dim=1)


class PIRLModel(nn.Module):
    """phi + f + g.  forward(batch) -> {"z_img": [B,D], "z_t": [B,D]}, both unit norm.

    pretext ``jigsaw`` and ``jigsaw+rotation`` read ``batch["patches"]`` (for jigsaw+rotation the
    data pipeline cuts the patches from the rotated image, so the model is the same); ``rotation``
    reads ``batch["rotated"]``.
    """

    def __init__(self, arch: str, small_stem: bool, embed_dim: int, pretext: str,
                 num_patches: int, bn_stats: str = "image") -> None:
        super().__init__()
        c = trunk_dim(arch)
        self.pretext = pretext
        self.bn_stats = bn_stats
        self.trunk = build_trunk(arch, small_stem)
        self.f = ImageHead(c, embed_dim)
        self.g: nn.Module
        if pretext in ("jigsaw", "jigsaw+rotation"):
            self.g = JigsawHead(c, embed_dim, num_patches)
        elif pretext == "rotation":
            self.g = RotationHead(c, embed_dim)
        else:
            raise ValueError(f"objective.pretext={pretext!r}: choose jigsaw, rotation or "
                             "jigsaw+rotation")

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        image = _need(batch, "image", "pirl", "[B,3,S,S]")
        z_img = _unit(self.f(self.trunk(image)))  # trunk call 1: B images
        if self.pretext == "rotation":
            rotated = _need(batch, "rotated", "pirl (pretext rotation)", "[B,3,S,S]")
            z_t = _unit(self.g(self.trunk(rotated)))  # trunk call 2: B rotated images
        else:
            patches = _need(batch, "patches", f"pirl (pretext {self.pretext})", "[B,P,3,p,p]")
            with frozen_bn_stats(self.trunk, enabled=self.bn_stats == "image"):
                feats = _patch_features(self.trunk, patches)  # trunk call 2: B*P patches
            z_t = _unit(self.g(feats))
        return {"z_img": z_img, "z_t": z_t}


class NPIDModel(nn.Module):
    """phi + f (NPID: lambda = 0).  forward(batch) -> {"z_img": [B,D]} unit norm."""

    def __init__(self, arch: str, small_stem: bool, embed_dim: int) -> None:
        super().__init__()
        self.trunk = build_trunk(arch, small_stem)
        self.f = ImageHead(trunk_dim(arch), embed_dim)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        image = _need(batch, "image", "npid", "[B,3,S,S]")
        return {"z_img": _unit(self.f(self.trunk(image)))}


class JigsawModel(nn.Module):
    """Covariant Jigsaw baseline: phi per patch + :class:`JigsawClassifier`.

    forward(batch) -> {"logits": [B, num_permutations]} from ``batch["patches"]`` [B,P,3,p,p],
    the patches ordered by the permutation whose index is the label.
    """

    def __init__(self, arch: str, small_stem: bool, num_permutations: int,
                 num_patches: int) -> None:
        super().__init__()
        self.trunk = build_trunk(arch, small_stem)
        self.classifier = JigsawClassifier(trunk_dim(arch), num_permutations, num_patches)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        patches = _need(batch, "patches", "jigsaw", "[B,P,3,p,p]")
        return {"logits": self.classifier(_patch_features(self.trunk, patches))}


class RotationModel(nn.Module):
    """Covariant Rotation baseline: phi + Linear(C -> 4).

    A single linear classifier on the pooled res5 feature, as in Goyal et al.'s ResNet-50 rotation
    baseline that PIRL compares against: a deeper head would learn part of the task itself and take
    capacity from the trunk, which is what gets evaluated.

    forward(batch) -> {"logits": [B, 4]} from ``batch["rotated"]`` [B,3,S,S].
    """

    def __init__(self, arch: str, small_stem: bool) -> None:
        super().__init__()
        self.trunk = build_trunk(arch, small_stem)
        self.classifier = nn.Linear(trunk_dim(arch), 4)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        rotated = _need(batch, "rotated", "rotation", "[B,3,S,S]")
        return {"logits": self.classifier(self.trunk(rotated))}


def build_model(cfg: Config, num_permutations: int | None = None) -> nn.Module:
    """The model for ``cfg.objective.method``, randomly initialised.

    ``num_permutations`` (jigsaw baseline only) is the size of the permutation set actually in use;
    it defaults to ``cfg.objective.num_permutations``.
    """
    m, o = cfg.model, cfg.objective
    num_patches = cfg.views.grid**2
    if o.method == "pirl":
        return PIRLModel(m.arch, m.small_stem, m.embed_dim, o.pretext, num_patches, m.bn_stats)
    if o.method == "npid":
        return NPIDModel(m.arch, m.small_stem, m.embed_dim)
    if o.method == "jigsaw":
        n = o.num_permutations if num_permutations is None else num_permutations
        if n < 2:
            raise ValueError(f"jigsaw baseline: num_permutations={n}: need at least 2")
        return JigsawModel(m.arch, m.small_stem, n, num_patches)
    if o.method == "rotation":
        return RotationModel(m.arch, m.small_stem)
    raise ValueError(f"objective.method={o.method!r}: choose pirl, npid, jigsaw or rotation")
