"""PIRL: Pretext-Invariant Representation Learning (Misra & van der Maaten, CVPR 2020, Sec. 2).

The representation of a transformed image I^t must match that of the image I, contrasted against
other images held in a memory bank (docs/method.md explains each choice):

* views: the image view v_I and the transformed view v_I^t: jigsaw patches, a rotated image, or
  patches cut from a rotated crop (``objective.pretext``), drawn by :mod:`pirl.data.views`;
* network: one trunk phi; head f on phi(v_I); head g on phi(v_I^t) (for jigsaw: each patch
  through phi and one shared Linear, concatenated in patch order, then a Linear);
* loss (Eq. 5): ``lam * L_NCE(m_I, g(v_I^t)) + (1 - lam) * L_NCE(m_I, f(v_I))``, both terms
  scored against the bank before this step's update, with the same negatives;
* bank update after the optimizer step: ``m_I <- normalize(0.5 m_I + 0.5 f(v_I))``
  (:class:`pirl.methods.bank_objective.BankObjective`).

Shapes: B images, D = ``model.embed_dim`` (128), C = trunk width (512 / 2048), P = patches (9).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pirl import losses as L
from pirl.config import PRETEXTS, Config
from pirl.data.views import SampleViews
from pirl.methods.bank_objective import BankObjective
from pirl.methods.keys import need
from pirl.trunk import build_trunk, patch_features, trunk_dim


def views(cfg: Config) -> SampleViews:
    """v_I and v_I^t; for jigsaw+rotation the crop is rotated first, then cut into patches."""
    pretext = cfg.objective.pretext
    if pretext == "rotation":
        return SampleViews(image=True, rotated=True)
    return SampleViews(image=True, patches="shuffled",
                       rotate_patches=pretext == "jigsaw+rotation")


def _mlp(in_dim: int, embed_dim: int, relu_out: bool = False) -> nn.Sequential:
    """The authors' later release's MLP head: Linear C -> C, ReLU, Linear C -> D (and a ReLU after
    it where the release has one: on each jigsaw patch, before the concatenation)."""
    layers: list[nn.Module] = [nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True),
                               nn.Linear(in_dim, embed_dim)]
    return nn.Sequential(*layers, *([nn.ReLU(inplace=True)] if relu_out else []))


class ImageHead(nn.Module):
    """f: one Linear C -> D on the pooled trunk feature of the image (``mlp``: C -> C, ReLU,
    -> D).  ``[B,C]`` -> ``[B,D]``."""

    def __init__(self, in_dim: int, embed_dim: int, mlp: bool = False) -> None:
        super().__init__()
        self.fc: nn.Module = _mlp(in_dim, embed_dim) if mlp else nn.Linear(in_dim, embed_dim)

    def forward(self, v: Tensor) -> Tensor:
        return self.fc(v)


class RotationHead(ImageHead):
    """g for the rotation pretext: the shape of f, its own weights.  ``[B,C]`` -> ``[B,D]``."""


class JigsawHead(nn.Module):
    """g for the jigsaw pretexts: ``[B,P,C]`` -> ``[B,D]``.

    Each patch feature through *one shared* Linear C -> D (``patch_fc``), the P outputs
    concatenated in the order the patches arrive (the shuffled order, so the result depends on
    it), then Linear P*D -> D (``fuse``).  At the paper's numbers: 9 x (2048 -> 128) -> 1152 -> 128.
    ``mlp``: the per-patch Linear becomes C -> C, ReLU, -> D, ReLU, as in the authors' release.
    """

    def __init__(self, in_dim: int, embed_dim: int, num_patches: int = 9,
                 mlp: bool = False) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.patch_fc: nn.Module = (_mlp(in_dim, embed_dim, relu_out=True) if mlp
                                    else nn.Linear(in_dim, embed_dim))
        self.fuse = nn.Linear(num_patches * embed_dim, embed_dim)

    def forward(self, v: Tensor) -> Tensor:
        if v.dim() != 3 or v.shape[1] != self.num_patches:
            raise ValueError(f"JigsawHead expects [B, {self.num_patches}, C] patch features, "
                             f"got {tuple(v.shape)}")
        per_patch = self.patch_fc(v)  # [B,P,D]: a Linear acts on the last dim, shared weights
        return self.fuse(per_patch.reshape(v.shape[0], -1))  # [B,P*D]: patch k at k*D..(k+1)*D


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, BatchNorm layers still normalise with batch statistics in train mode but
    leave their running statistics alone (momentum 0: ``running = 1 * running + 0 * batch``)."""
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


def unit(z: Tensor) -> Tensor:
    """L2-normalise rows in float32: under bf16 autocast the heads' output is bf16, and the bank
    and the losses work in float32 (a 128-d norm in bf16 loses ~3 significant digits)."""
    return F.normalize(z.float(), dim=1)


class PIRLModel(nn.Module):
    """phi + f + g: forward(batch) -> {"z_img": f(v_I), "z_t": g(v_I^t)}, ``[B,D]`` unit norm.

    Both views go through the trunk inside this one forward, so DistributedDataParallel
    synchronises the gradients of both passes.  They are two trunk calls (different sizes), and
    train-mode BatchNorm normalises each with its own batch statistics, as the paper does.  With
    ``bn_stats="image"`` only the image call updates the running statistics that evaluation uses:
    patch statistics (9 px patches against 32 px images) are far from the images' (rows ``pirl``
    and ``pirl-bn-all`` of ``benchmarks/quality.py`` measure the difference).  Rotated images are
    images, so the rotation pretext updates them either way.
    """

    def __init__(self, arch: str, small_stem: bool, embed_dim: int, pretext: str,
                 num_patches: int, bn_stats: str = "image", width: int = 1,
                 mlp: bool = False) -> None:
        super().__init__()
        if pretext not in PRETEXTS:
            raise ValueError(f"objective.pretext={pretext!r}: choose one of {list(PRETEXTS)}")
        c = trunk_dim(arch, width)
        self.pretext, self.bn_stats = pretext, bn_stats
        self.trunk = build_trunk(arch, small_stem, width)
        self.f = ImageHead(c, embed_dim, mlp)
        self.g: nn.Module = (RotationHead(c, embed_dim, mlp) if pretext == "rotation" else
                             JigsawHead(c, embed_dim, num_patches, mlp))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        image = need(batch, "image", "pirl", shape="[B,3,S,S]")
        z_img = unit(self.f(self.trunk(image)))  # trunk call 1: B images -> [B,D]
        if self.pretext == "rotation":
            rotated = need(batch, "rotated", "pirl (pretext rotation)", shape="[B,3,S,S]")
            return {"z_img": z_img, "z_t": unit(self.g(self.trunk(rotated)))}  # call 2: B images
        patches = need(batch, "patches", f"pirl (pretext {self.pretext})", shape="[B,P,3,p,p]")
        with frozen_bn_stats(self.trunk, enabled=self.bn_stats == "image"):
            feats = patch_features(self.trunk, patches)  # trunk call 2: B*P patches -> [B,P,C]
        return {"z_img": z_img, "z_t": unit(self.g(feats))}


def build_model(cfg: Config) -> PIRLModel:
    """PIRL's network for ``cfg``, randomly initialised."""
    m = cfg.model
    return PIRLModel(m.arch, m.small_stem, m.embed_dim, cfg.objective.pretext,
                     cfg.views.grid**2, m.bn_stats, m.width, m.head == "mlp")


class PIRLObjective(BankObjective):
    """Eq. 5 against the memory bank: ``loss(out, batch)`` -> (scalar, detached terms
    ``loss``, ``loss_t``, ``loss_img``); then ``after_step`` writes f(v_I) into the bank."""

    def __init__(self, cfg: Config, dataset_size: int,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(cfg, dataset_size, device)
        self.lam = float(cfg.objective.lam)

    def loss(self, out: dict[str, Tensor], batch: dict[str, Tensor]
             ) -> tuple[Tensor, dict[str, Tensor]]:
        z_img = need(out, "z_img", "objective 'pirl'", "the model output")  # f(v_I) [B,D]
        z_t = need(out, "z_t", "objective 'pirl'", "the model output")  # g(v_I^t) [B,D]
        # L_NCE(m_I, g(v_I^t)) and L_NCE(m_I, f(v_I)): [B] each, the same negatives for both
        term_t, term_img = self.nce_terms([z_t, z_img], batch)
        total = L.pirl_objective(term_t, term_img, self.lam)  # Eq. 5, mean over the batch
        return total, {"loss": total.detach(), "loss_t": term_t.detach().mean(),
                       "loss_img": term_img.detach().mean()}

    def after_step(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> None:
        """The bank learns from the image view alone: ``m_I <- normalize(mu m_I + (1 - mu)
        f(v_I))``, mu = ``objective.bank_momentum`` (0.5)."""
        self.update_bank(need(out, "z_img", "objective 'pirl'", "the model output"), batch)
