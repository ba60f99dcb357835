"""Faster R-CNN on a pirl trunk: the C4 design of the paper (default) or an FPN.

**C4** (Detectron2's ``Res5ROIHeads``, the design of PIRL's detection tables): the trunk up to
res4 (torchvision's ``layer3``) is the backbone, one feature map of stride 16 and
``stage_dim(arch, "res4")`` channels (1024 for ResNet-50, 256 for ResNet-18/34); the RPN runs
on it with 15 anchors per position (sizes 32-512, ratios 0.5/1/2); each proposal is pooled to
14x14 by RoIAlign (``aligned=True``, Detectron2's ROIAlignV2); res5 (``layer4``, first block
stride 2) turns that into 7x7, average-pooled to the box head's output (2048 / 512 wide), which a
linear classifier (C + 1 classes) and a box regressor read.  res5 therefore keeps the weights
the trunk learned, in the box head.

**FPN** (``design="fpn"``): torchvision's ``BackboneWithFPN`` on res2..res5 (256-channel pyramid
plus a max-pooled level), the default 7x7 multi-scale RoIAlign and two-FC box head, which start
from scratch.

In both, every ``BatchNorm2d`` of the trunk becomes a ``FrozenBatchNorm2d`` holding the
checkpoint's running statistics and affine parameters, so neither the statistics nor the affine
parameters change while fine-tuning ("BN fixed"), and the trunk's convolutions are fine-tuned
from ``freeze_at`` on: 0 (default) trains every layer, as the paper's setup states; 1 freezes the
stem; 2 the stem and res2 (Detectron2's default ``FREEZE_AT``); up to 5.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torchvision.models import ResNet
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from pirl.data.views import IMAGENET_MEAN, IMAGENET_STD

DESIGNS = ("c4", "fpn")
# Stages in freezing order: freeze_at=k freezes the first k of them.
_STAGE_MODULES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` inside ``module`` (in place) by a ``FrozenBatchNorm2d`` with
    the same running mean/var, weight, bias and eps; returns ``module`` (or its replacement when
    ``module`` itself is a BatchNorm2d).  Frozen BN has buffers only: no optimizer can move it and
    train mode does not update its statistics."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.running_mean is not None and module.running_var is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = freeze_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


@torch.no_grad()
def recalibrate_batchnorm(trunk: nn.Module, images: Iterable[Tensor],
                          transform: GeneralizedRCNNTransform) -> int:
    """Re-estimate the running mean and variance of every ``BatchNorm2d`` of ``trunk`` (in
    place) on ``images`` at the detector's input size; weights, affine parameters and eps stay.

    Each image (uint8 ``[3,H,W]``, or float in [0,1]) is resized and normalised by ``transform``
    (the detector's ``GeneralizedRCNNTransform``, eval mode: the test size) and passed alone, with
    every BatchNorm in train mode and ``momentum=None``: the new statistics are the average over
    the images of each image's own batch statistics (the per-channel mean and unbiased variance
    over H x W), as precise-BN estimation does.  Used when the checkpoint's statistics come from
    inputs unlike the detector's (a trunk pretrained on 32-px views, fine-tuned at 160-800 px)
    and would otherwise be frozen into the detector.  ``trunk`` ends in eval mode; returns the
    number of images used.
    """
    bns = [m for m in trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    trunk.eval()
    transform.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the images
        m.train()
    n = 0
    device = next(trunk.parameters()).device
    for image in images:
        x = image.to(device)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        batch = transform([x])[0].tensors
        trunk(batch)
        n += 1
    for m, momentum in zip(bns, saved, strict=True):
        m.momentum = momentum
        m.eval()
    return n


def freeze_stages(trunk: ResNet, freeze_at: int) -> None:
    """Stop gradients into the first ``freeze_at`` stages (stem, res2, ..., res5) of ``trunk``."""
    if not 0 <= freeze_at <= len(_STAGE_MODULES):
        raise ValueError(f"freeze_at={freeze_at}: must be 0..{len(_STAGE_MODULES)}")
    for names in _STAGE_MODULES[:freeze_at]:
        for name in names:
            for p in getattr(trunk, name).parameters():
                p.requires_grad_(False)


def res4_stride(trunk: ResNet) -> int:
    """Input pixels per res4 cell: 16 with the ImageNet stem, 4 with the small (stride-1,
    no max-pool) stem.  layer2 and layer3 each halve the map in torchvision's ResNets."""
    conv = trunk.conv1
    stride = conv.stride[0] if isinstance(conv, nn.Conv2d) else 1
    pool = trunk.maxpool
    if isinstance(pool, nn.MaxPool2d):
        stride *= pool.stride if isinstance(pool.stride, int) else pool.stride[0]
    return stride * 4


def _out_channels(layer: nn.Module) -> int:
    """Channels a ResNet stage outputs (its last block's last BN width)."""
    last = list(layer.children())[-1]
    bn = last.bn3 if hasattr(last, "bn3") else last.bn2  # Bottleneck / BasicBlock
    weight = bn.weight if isinstance(bn, nn.Module) else None
    if not isinstance(weight, Tensor):
        raise TypeError(f"cannot read the output width of {type(last).__name__}")
    return int(weight.shape[0])


class C4Backbone(nn.Module):
    """The trunk up to res4: normalised float [B,3,H,W] -> [B, C4, H/16, W/16].  Submodules
    keep torchvision's names (conv1, bn1, layer1..layer3), so its keys are the trunk's."""

    def __init__(self, trunk: ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = (trunk.conv1, trunk.bn1, trunk.relu,
                                                         trunk.maxpool)
        self.layer1, self.layer2, self.layer3 = trunk.layer1, trunk.layer2, trunk.layer3
        self.out_channels = _out_channels(trunk.layer3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


class C4Pooler(MultiScaleRoIAlign):
    """RoIAlign of the proposals on the res4 map: -> [N, C4, size, size] (N = all proposals of
    the batch, image by image).  A MultiScaleRoIAlign only because torchvision's FasterRCNN
    accepts no other pooler type; its one level has a known stride, so no scale is inferred."""

    def __init__(self, stride: int, output_size: int = 14) -> None:
        super().__init__(featmap_names=["0"], output_size=output_size, sampling_ratio=0)
        self.stride, self.pooled = stride, output_size

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor],  # type: ignore[override]
                image_shapes: list[tuple[int, int]]) -> Tensor:
        res4 = x["0"]
        # aligned=True samples at pixel centres (half-pixel shift), as Detectron2's ROIAlignV2;
        # sampling_ratio=0 adapts the number of samples per bin to the box size.
        return roi_align(res4, [b.to(res4.dtype) for b in boxes], self.pooled,
                         spatial_scale=1.0 / self.stride, sampling_ratio=0, aligned=True)


class Res5Head(nn.Module):
    """The trunk's res5 applied to each pooled region, then averaged:
    [N, C4, 14, 14] -> [N, C5] (C5 = 2048 for ResNet-50, 512 for ResNet-18/34)."""

    def __init__(self, layer4: nn.Module) -> None:
        super().__init__()
        self.layer4 = layer4
        self.out_channels = _out_channels(layer4)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer4(x).mean(dim=(2, 3))


def build_detector(trunk: ResNet, num_classes: int, design: str = "c4", freeze_at: int = 0,
                   min_size: int | tuple[int, ...] = 800, max_size: int = 1333,
                   roi_batch: int = 512, test_proposals: int = 1000) -> FasterRCNN:
    """A Faster R-CNN for ``num_classes`` object classes (+ background) on a *copy* of ``trunk``.

    forward in train mode: (list of float [3,H,W] in [0,1], list of {"boxes", "labels"}) -> dict
    of the four losses; in eval mode: list of images -> list of {"boxes" [D,4], "labels" [D],
    "scores" [D]} in input pixels.  ``min_size`` may be a tuple: each training image is resized
    to a random one of them (multi-scale training); evaluation uses the last one (torchvision's
    rule), so list the test size last.  ``roi_batch`` proposals per training image are sampled
    for the box head and ``test_proposals`` per test image are scored (Detectron2: 512 and 1000);
    in the C4 design each of them runs through res5, so on a CPU these two set the cost.
    """
    if design not in DESIGNS:
        raise ValueError(f"design={design!r}: choose one of {DESIGNS}")
    if num_classes < 1:
        raise ValueError("the detector needs at least one object class")
    net = copy.deepcopy(trunk)
    freeze_batchnorm(net)
    freeze_stages(net, freeze_at)
    sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
    common = dict(min_size=sizes, max_size=max_size, image_mean=list(IMAGENET_MEAN),
                  image_std=list(IMAGENET_STD), box_detections_per_img=100,
                  box_score_thresh=0.05)
    if design == "c4":
        backbone = C4Backbone(net)
        head = Res5Head(net.layer4)
        anchors = AnchorGenerator(sizes=((32, 64, 128, 256, 512),),
                                  aspect_ratios=((0.5, 1.0, 2.0),))
        model = FasterRCNN(
            backbone, num_classes=None, rpn_anchor_generator=anchors,
            rpn_head=RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0]),
            box_roi_pool=C4Pooler(res4_stride(net)), box_head=head,
            box_predictor=FastRCNNPredictor(head.out_channels, num_classes + 1),
            # One feature level: Detectron2's C4 numbers for proposals kept before/after NMS.
            rpn_pre_nms_top_n_train=12000, rpn_pre_nms_top_n_test=6000,
            rpn_post_nms_top_n_train=2000, rpn_post_nms_top_n_test=test_proposals,
            box_batch_size_per_image=roi_batch, **common)
    else:
        widths = [_out_channels(getattr(net, f"layer{i}")) for i in range(1, 5)]
        fpn = BackboneWithFPN(net, return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
                              in_channels_list=widths, out_channels=256,
                              extra_blocks=LastLevelMaxPool())
        model = FasterRCNN(fpn, num_classes=num_classes + 1, box_batch_size_per_image=roi_batch,
                           rpn_post_nms_top_n_test=test_proposals, **common)
    return model


def trunk_of(model: FasterRCNN) -> OrderedDict[str, Tensor]:
    """The detector's trunk weights under torchvision ResNet names (for checks and export):
    C4 = backbone + box head's layer4; FPN = the backbone's body."""
    out: OrderedDict[str, Tensor] = OrderedDict()
    backbone = model.backbone
    body = backbone.body if isinstance(backbone, BackboneWithFPN) else backbone
    for k, v in body.state_dict().items():
        out[k] = v
    head = model.roi_heads.box_head
    if isinstance(head, Res5Head):
        for k, v in head.state_dict().items():
            out[k] = v
    return out
