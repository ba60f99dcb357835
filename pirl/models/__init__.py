"""Trunk (torchvision ResNet) and the PIRL / baseline heads."""

from pirl.models.heads import ImageHead, JigsawClassifier, JigsawHead, RotationHead
from pirl.models.pirl import JigsawModel, NPIDModel, PIRLModel, RotationModel, build_model
from pirl.models.trunk import STAGES, build_trunk, stage_dim, stage_features, trunk_dim

__all__ = [
    "STAGES",
    "ImageHead",
    "JigsawClassifier",
    "JigsawHead",
    "JigsawModel",
    "NPIDModel",
    "PIRLModel",
    "RotationHead",
    "RotationModel",
    "build_model",
    "build_trunk",
    "stage_dim",
    "stage_features",
    "trunk_dim",
]
