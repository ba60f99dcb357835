"""The covariant Rotation baseline (Gidaris et al. 2018, as in Goyal et al.'s benchmark).

Views: an augmented image view rotated by 0 / 90 / 180 / 270 degrees, and r (``rotation``).
Network: phi and one Linear C -> 4.  Loss: 4-way cross-entropy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pirl.config import Config
from pirl.data.views import SampleViews
from pirl.methods.covariant import CovariantObjective
from pirl.methods.keys import need
from pirl.trunk import build_trunk, trunk_dim


def views(cfg: Config) -> SampleViews:
    """The rotated image view and its label r."""
    return SampleViews(rotated=True, rotation_label=True)


class RotationModel(nn.Module):
    """phi + Linear(C -> 4): forward(batch) -> {"logits": [B,4]} from ``batch["rotated"]``.

    A single linear classifier on the pooled res5 feature, as in Goyal et al.'s ResNet-50 rotation
    baseline that PIRL compares against: a deeper head would learn part of the task itself and
    take capacity from the trunk, which is what gets evaluated.
    """

    def __init__(self, arch: str, small_stem: bool, width: int = 1) -> None:
        super().__init__()
        self.trunk = build_trunk(arch, small_stem, width)
        self.classifier = nn.Linear(trunk_dim(arch, width), 4)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        rotated = need(batch, "rotated", "rotation", shape="[B,3,S,S]")
        return {"logits": self.classifier(self.trunk(rotated))}  # [B,C] -> [B,4]


def build_model(cfg: Config) -> RotationModel:
    """The Rotation baseline's network for ``cfg``."""
    return RotationModel(cfg.model.arch, cfg.model.small_stem, cfg.model.width)


def build_objective(cfg: Config, dataset_size: int,
                    device: torch.device | str = "cpu") -> CovariantObjective:
    """4-way cross-entropy (no bank: ``dataset_size`` and ``device`` unused)."""
    return CovariantObjective(cfg.objective.method, "rotation")
