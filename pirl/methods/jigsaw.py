"""The covariant Jigsaw baseline (Noroozi & Favaro 2016, as in Goyal et al.'s benchmark).

Views: the jigsaw patches ordered by a permutation drawn from a fixed set of
``objective.num_permutations`` permutations far apart in Hamming distance; the label is its index
(``perm_label``).  Network: each patch through phi, the features concatenated in patch order, a
classifier over the permutation set.  Loss: cross-entropy (predicting the transformation, where
PIRL asks for invariance to it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pirl.config import Config
from pirl.data.views import SampleViews
from pirl.methods.covariant import CovariantObjective
from pirl.methods.keys import need
from pirl.trunk import build_trunk, patch_features, trunk_dim


def views(cfg: Config) -> SampleViews:
    """The patches in the order of a permutation of the set, and its index ``perm_label``."""
    return SampleViews(patches="permutation")


class JigsawClassifier(nn.Module):
    """Classifier over the permutation set: ``[B,P,C]`` -> logits ``[B, num_permutations]``.

    The P patch features are concatenated in the order the patches arrive ([B, P*C]), then
    Linear(P*C -> hidden) - ReLU - Linear(hidden -> num_permutations).  The task needs the
    classifier to see *which feature sits in which slot*, which only the concatenation keeps (a
    sum or mean would be order-blind); one hidden layer of 1024 follows the Noroozi & Favaro /
    Goyal et al. jigsaw heads (an fc7-like layer before the permutation classifier) while staying
    small next to the trunk; it is dropped for transfer like every head.
    """

    def __init__(self, in_dim: int, num_permutations: int, num_patches: int = 9,
                 hidden: int = 1024) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.mlp = nn.Sequential(
            nn.Linear(num_patches * in_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_permutations),
        )

    def forward(self, v: Tensor) -> Tensor:
        if v.dim() != 3 or v.shape[1] != self.num_patches:
            raise ValueError(f"JigsawClassifier expects [B, {self.num_patches}, C] patch "
                             f"features, got {tuple(v.shape)}")
        return self.mlp(v.reshape(v.shape[0], -1))


class JigsawModel(nn.Module):
    """phi per patch + :class:`JigsawClassifier`: forward(batch) -> {"logits": [B, n]} from
    ``batch["patches"]`` ``[B,P,3,p,p]``."""

    def __init__(self, arch: str, small_stem: bool, num_permutations: int,
                 num_patches: int, width: int = 1) -> None:
        super().__init__()
        self.trunk = build_trunk(arch, small_stem, width)
        self.classifier = JigsawClassifier(trunk_dim(arch, width), num_permutations, num_patches)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        patches = need(batch, "patches", "jigsaw", shape="[B,P,3,p,p]")
        return {"logits": self.classifier(patch_features(self.trunk, patches))}  # [B,P,C] -> [B,n]


def build_model(cfg: Config) -> JigsawModel:
    """The Jigsaw baseline's network for ``cfg`` (``objective.num_permutations`` classes)."""
    n = cfg.objective.num_permutations
    if n < 2:
        raise ValueError(f"jigsaw baseline: num_permutations={n}: need at least 2")
    return JigsawModel(cfg.model.arch, cfg.model.small_stem, n, cfg.views.grid**2,
                       cfg.model.width)


def build_objective(cfg: Config, dataset_size: int,
                    device: torch.device | str = "cpu") -> CovariantObjective:
    """Cross-entropy over the permutation set (no bank: ``dataset_size`` and ``device`` unused)."""
    return CovariantObjective(cfg.objective.method, "perm_label")
