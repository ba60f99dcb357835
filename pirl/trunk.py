"""The trunk phi: a torchvision ResNet whose classifier is removed.

The trunk maps a normalised float image batch ``[B, 3, S, S]`` to the average-pooled res5 feature
``[B, trunk_dim(arch)]`` (512 for ResNet-18/34, 2048 for ResNet-50), exactly torchvision's
``ResNet.forward`` with ``fc = nn.Identity()``.  Keeping torchvision's module layout means the
trunk's state dict *is* a torchvision state dict (minus ``fc.*``): exporting needs no renaming.

``small_stem`` swaps the ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool, a 4x reduction
before res2) for a 3x3 stride-1 conv and no max-pool.  On 32-64 px images the ImageNet stem leaves
res5 with a 1x1 (or smaller) map; the small stem keeps 8x more resolution there.  Module names are
unchanged (``conv1``, ``maxpool`` = Identity), so the key set stays torchvision's; only the shape
of ``conv1.weight`` differs ([64, 3, 3, 3] instead of [64, 3, 7, 7]).
"""

from __future__ import annotations

from collections.abc import Iterable

import torchvision.models
from torch import Tensor, nn
from torchvision.models import ResNet

from pirl.config import ARCHS

# The architectures built from bottleneck blocks, whose stages are 4x wider (res5: 2048 channels
# against 512); every other name of ARCHS is built from basic blocks.
_BOTTLENECK = frozenset({"resnet50"})

# Names of the feature stages an evaluation may read, shallow to deep (Goyal et al.'s benchmark
# names, as PIRL's linear-probe tables use).  conv1 = stem output (after conv1+bn+relu+maxpool),
# res2..res5 = outputs of torchvision's layer1..layer4.
STAGES: tuple[str, ...] = ("conv1", "res2", "res3", "res4", "res5")

_STAGE_LAYER = {"res2": "layer1", "res3": "layer2", "res4": "layer3", "res5": "layer4"}


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"model.arch={arch!r}: choose one of {list(ARCHS)}")


def trunk_dim(arch: str) -> int:
    """Width of the pooled trunk output for ``arch`` (512 or 2048)."""
    _check_arch(arch)
    return 512 * (4 if arch in _BOTTLENECK else 1)


def apply_small_stem(net: ResNet) -> ResNet:
    """Replace the stem in place by a 3x3 stride-1 conv (64 ch, no bias) and no max-pool."""
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    # Same init as torchvision uses for its own convs, so both stems start alike.
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()  # type: ignore[assignment]
    return net


def build_trunk(arch: str, small_stem: bool = False) -> ResNet:
    """A randomly initialised torchvision ResNet with ``fc = nn.Identity()``.

    forward: float ``[B, 3, S, S]`` (normalised) -> ``[B, trunk_dim(arch)]``.
    """
    _check_arch(arch)
    net: ResNet = getattr(torchvision.models, arch)(weights=None)  # ARCHS are torchvision's names
    net.fc = nn.Identity()  # type: ignore[assignment]
    if small_stem:
        apply_small_stem(net)
    return net


def stage_features(trunk: ResNet, x: Tensor, stages: Iterable[str]) -> dict[str, Tensor]:
    """Unpooled feature maps of the requested stages.

    x: normalised float ``[B, 3, S, S]``.  Returns ``{stage: [B, C, h, w]}`` for each requested
    stage (C = 64 for conv1; 64/128/256/512 for res2..res5 of ResNet-18/34, x4 for res2..res5 of
    ResNet-50).  The network runs only as far as the deepest requested stage, so reading conv1 costs
    a stem pass, not a full forward.  The caller chooses train/eval mode and grad context.
    """
    wanted = list(dict.fromkeys(stages))
    for s in wanted:
        if s not in STAGES:
            raise ValueError(f"unknown stage {s!r}: choose from {list(STAGES)}")
    if not wanted:
        return {}
    deepest = max(STAGES.index(s) for s in wanted)
    out: dict[str, Tensor] = {}
    h = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))
    if "conv1" in wanted:
        out["conv1"] = h
    for stage in STAGES[1 : deepest + 1]:
        h = getattr(trunk, _STAGE_LAYER[stage])(h)
        if stage in wanted:
            out[stage] = h
    return out


def stage_dim(arch: str, stage: str) -> int:
    """Channel count C of ``stage`` for ``arch`` (useful to size a probe before any forward)."""
    _check_arch(arch)
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: choose from {list(STAGES)}")
    if stage == "conv1":
        return 64
    base = {"res2": 64, "res3": 128, "res4": 256, "res5": 512}[stage]
    return base * (4 if arch in _BOTTLENECK else 1)


def patch_features(trunk: nn.Module, patches: Tensor) -> Tensor:
    """Patches ``[B, P, 3, p, p]`` -> pooled trunk features ``[B, P, C]``, in one trunk call
    (BatchNorm in train mode normalises over all B*P patches together)."""
    if patches.dim() != 5:
        raise ValueError(f"patches must be [B, P, 3, p, p], got {tuple(patches.shape)}")
    b, p = patches.shape[:2]
    feats = trunk(patches.flatten(0, 1))  # [B*P, C]; patch k of image i sits at row i*P + k
    return feats.reshape(b, p, -1)
