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

``width`` w multiplies the channels of every stage, conv1 included, as PIRL-c2x does (ResNet-50
w2: 128 channels out of conv1, 4096 out of res5, ~94M trunk parameters): each block keeps
torchvision's layout and names, with w times the channels.  This is not torchvision's
``wide_resnet50_2``, which widens only the inner 3x3 convs of the bottlenecks; it is the layout
of VISSL's ``WIDTH_MULTIPLIER``, so the authors' wide checkpoints load.
"""

from __future__ import annotations

from collections.abc import Iterable

import torchvision.models
from torch import Tensor, nn
from torchvision.models import ResNet
from torchvision.models.resnet import BasicBlock, Bottleneck

from pirl.config import ARCHS, WIDTHS

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


def _check_width(width: int) -> None:
    if width not in WIDTHS:
        raise ValueError(f"model.width={width!r}: choose one of {list(WIDTHS)}")


def trunk_dim(arch: str, width: int = 1) -> int:
    """Width of the pooled trunk output for ``arch`` (512 or 2048, times ``width``)."""
    _check_arch(arch)
    _check_width(width)
    return 512 * (4 if arch in _BOTTLENECK else 1) * width


def apply_small_stem(net: ResNet) -> ResNet:
    """Replace the stem in place by a 3x3 stride-1 conv (as many channels, no bias) and no
    max-pool."""
    net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1,
                          bias=False)
    # Same init as torchvision uses for its own convs, so both stems start alike.
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()  # type: ignore[assignment]
    return net


class _ScaledResNet(ResNet):
    """torchvision's ResNet with every stage ``width`` times as wide (module names unchanged)."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int],
                 width: int) -> None:
        nn.Module.__init__(self)  # ResNet.__init__ hard-codes 64 channels; build the same modules
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = 64 * width, 1, 1, 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64 * width, layers[0])
        self.layer2 = self._make_layer(block, 128 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()  # type: ignore[assignment]
        for m in self.modules():  # torchvision's own initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


_LAYERS = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3], "resnet50": [3, 4, 6, 3]}


def build_trunk(arch: str, small_stem: bool = False, width: int = 1) -> ResNet:
    """A randomly initialised torchvision ResNet with ``fc = nn.Identity()``, every stage
    ``width`` times as wide (1: torchvision's own model).

    forward: float ``[B, 3, S, S]`` (normalised) -> ``[B, trunk_dim(arch, width)]``.
    """
    _check_arch(arch)
    _check_width(width)
    net: ResNet
    if width == 1:
        net = getattr(torchvision.models, arch)(weights=None)  # ARCHS are torchvision's names
        net.fc = nn.Identity()  # type: ignore[assignment]
    else:
        net = _ScaledResNet(Bottleneck if arch in _BOTTLENECK else BasicBlock, _LAYERS[arch],
                            width)
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


def stage_dim(arch: str, stage: str, width: int = 1) -> int:
    """Channel count C of ``stage`` for ``arch`` and ``width`` (to size a probe before any
    forward)."""
    _check_arch(arch)
    _check_width(width)
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: choose from {list(STAGES)}")
    if stage == "conv1":
        return 64 * width
    base = {"res2": 64, "res3": 128, "res4": 256, "res5": 512}[stage]
    return base * (4 if arch in _BOTTLENECK else 1) * width


def patch_features(trunk: nn.Module, patches: Tensor) -> Tensor:
    """Patches ``[B, P, 3, p, p]`` -> pooled trunk features ``[B, P, C]``, in one trunk call
    (BatchNorm in train mode normalises over all B*P patches together)."""
    if patches.dim() != 5:
        raise ValueError(f"patches must be [B, P, 3, p, p], got {tuple(patches.shape)}")
    b, p = patches.shape[:2]
    feats = trunk(patches.flatten(0, 1))  # [B*P, C]; patch k of image i sits at row i*P + k
    return feats.reshape(b, p, -1)
