"""Projection heads f and g of PIRL (PIRL.md, "Network").  All heads are dropped for transfer.

D = embedding dim (``model.embed_dim``, 128), C = trunk_dim (512 / 2048), P = patches (9).
The heads return *unnormalised* embeddings; the model L2-normalises them (so a caller can read the
raw projection when it needs it, e.g. for a norm diagnostic).
"""

from __future__ import annotations

from torch import Tensor, nn


class ImageHead(nn.Module):
    """f: one Linear C -> D on the pooled trunk feature of the untransformed image.

    forward: ``[B, C]`` -> ``[B, D]``.
    """

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, embed_dim)

    def forward(self, v: Tensor) -> Tensor:
        return self.fc(v)


class JigsawHead(nn.Module):
    """g for the jigsaw pretext: per-patch shared Linear, concatenate in the given order, Linear.

    Each of the P patch features goes through *one shared* Linear C -> D (``patch_fc``); the P
    outputs are concatenated in the order the patches arrive (the shuffled order of the jigsaw view,
    so the concatenation depends on it) into P*D, then Linear P*D -> D (``fuse``).  With the paper's
    numbers: 9 x (2048 -> 128) -> 1152 -> 128.

    forward: ``[B, P, C]`` -> ``[B, D]``.
    """

    def __init__(self, in_dim: int, embed_dim: int, num_patches: int = 9) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.patch_fc = nn.Linear(in_dim, embed_dim)
        self.fuse = nn.Linear(num_patches * embed_dim, embed_dim)

    def forward(self, v: Tensor) -> Tensor:
        if v.dim() != 3 or v.shape[1] != self.num_patches:
            raise ValueError(f"JigsawHead expects [B, {self.num_patches}, C] patch features, "
                             f"got {tuple(v.shape)}")
        b = v.shape[0]
        per_patch = self.patch_fc(v)  # [B, P, D]; Linear acts on the last dim = shared weights
        # reshape concatenates patch k's D values at positions k*D..(k+1)*D-1, i.e. in given order
        return self.fuse(per_patch.reshape(b, -1))


class RotationHead(ImageHead):
    """g for the rotation pretext: one Linear C -> D on the rotated image's pooled feature.

    The same layer shape as f (its own weights); a separate class so the model reads as the paper.
    forward: ``[B, C]`` -> ``[B, D]``.
    """


class JigsawClassifier(nn.Module):
    """The covariant Jigsaw baseline's classifier over a fixed permutation set.

    The P patch features are concatenated in the order the patches arrive ([B, P*C]), then
    Linear(P*C -> hidden) - ReLU - Linear(hidden -> num_permutations).  Why this shape: the task
    needs the classifier to see *which feature sits in which slot*, which only the concatenation
    keeps (a sum or mean would be order-blind); one hidden layer of 1024 follows the Noroozi &
    Favaro / Goyal et al. jigsaw heads (fc7-like layer before the permutation classifier) while
    staying small next to the trunk; it is dropped for transfer like every head.

    forward: ``[B, P, C]`` -> logits ``[B, num_permutations]``.
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
