"""Supervised pre-training: the reference the paper's transfer results are measured against.

Views: PIRL's image view v_I alone (the same crop, flip and colour jitter), so the trunks of the
two methods see the same pixels and differ only in what they are asked to predict.  Network:
phi and one Linear C -> K over the K classes of the training data.  Loss: K-way cross-entropy
against the label the data gives each image (``label``).

K is ``objective.num_classes``: unless set, :func:`pirl.methods.fit_to_dataset` takes it from the
training data when the run starts (:func:`labelled_classes`), and an unlabelled source stops the
run there, before any step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pirl.config import Config, ConfigError
from pirl.data.source import ImageSource
from pirl.data.views import SampleViews
from pirl.methods.covariant import CovariantObjective
from pirl.methods.keys import need
from pirl.trunk import build_trunk, trunk_dim


def views(cfg: Config) -> SampleViews:
    """The image view v_I; the label comes with every sample of a labelled source."""
    return SampleViews(image=True)


class SupervisedModel(nn.Module):
    """phi + Linear(C -> K): forward(batch) -> {"logits": [B,K]} from ``batch["image"]``.

    One linear layer, as the Rotation baseline's head: the trunk has to make the classes
    linearly separable, which is what the linear and kNN protocols then measure.
    """

    def __init__(self, arch: str, small_stem: bool, num_classes: int, width: int = 1) -> None:
        super().__init__()
        self.trunk = build_trunk(arch, small_stem, width)
        self.classifier = nn.Linear(trunk_dim(arch, width), num_classes)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        image = need(batch, "image", "supervised", shape="[B,3,S,S]")
        return {"logits": self.classifier(self.trunk(image))}  # [B,C] -> [B,K]


def build_model(cfg: Config) -> SupervisedModel:
    """The supervised network for ``cfg``; ``objective.num_classes`` must be known by now."""
    k = cfg.objective.num_classes
    if k < 1:
        raise ConfigError(f"objective.num_classes={k}: the supervised model needs the number of "
                          "classes (training sets it from the data)")
    return SupervisedModel(cfg.model.arch, cfg.model.small_stem, k, cfg.model.width)


def build_objective(cfg: Config, dataset_size: int,
                    device: torch.device | str = "cpu") -> CovariantObjective:
    """K-way cross-entropy on ``batch["label"]`` (no bank: ``dataset_size``, ``device`` unused);
    its log terms are ``loss``, ``loss_ce`` and ``acc`` (top-1 on the batch)."""
    return CovariantObjective(cfg.objective.method, "label")


def labelled_classes(source: ImageSource, where: str) -> int:
    """The number of classes of ``source`` after checking that every image has a label in
    ``[0, len(classes))``; :class:`ConfigError` (one line naming ``where``) otherwise."""
    targets = source.targets
    missing = sum(1 for t in targets if t < 0)
    if not source.classes or missing == len(targets):
        raise ConfigError(f"{where}: supervised pre-training needs labelled images and this data "
                          "has none (no <class>/ folders); give an ImageFolder folder or .tar "
                          "(ROOT/<class>/<image>)")
    if missing:
        raise ConfigError(f"{where}: {missing} of {len(targets)} images have no label; "
                          "supervised pre-training needs every image labelled")
    k = len(source.classes)
    if max(targets) >= k:
        raise ConfigError(f"{where}: a label ({max(targets)}) is outside the {k} classes")
    return k
