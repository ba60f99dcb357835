"""Trunk state-dict layouts: torchvision <-> Detectron2 key names (the table in
:mod:`pirl.export`), and what a torchvision-layout state dict's keys and shapes say about the
trunk (architecture, stem, width)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from pirl.checkpoint import CheckpointError
from pirl.config import WIDTHS

# arch -> (blocks per stage, bottleneck?)  The three archs pirl trains (at any of WIDTHS).
_ARCH_LAYOUT: dict[str, tuple[tuple[int, int, int, int], bool]] = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
}


# --------------------------------------------------------------------------------------------
# Key layouts


def _strip_prefix(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def torchvision_to_detectron2(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision ResNet trunk state dict to Detectron2's backbone layout (table above).

    ``num_batches_tracked`` and ``fc.*`` are dropped; any other key that does not fit the table is
    an error (it would be silently ignored by Detectron2's name matching).
    """
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked") or key.startswith("fc."):
            continue
        out[_tv_key_to_d2(key)] = value
    return out


_TV_STEM = re.compile(r"^(conv1|bn1)\.(.+)$")
_TV_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(.+)$")


def _tv_key_to_d2(key: str) -> str:
    m = _TV_STEM.match(key)
    if m:
        module, rest = m.groups()
        return f"stem.conv1.{rest}" if module == "conv1" else f"stem.conv1.norm.{rest}"
    m = _TV_BLOCK.match(key)
    if not m:
        raise CheckpointError(f"key {key!r} is not part of a torchvision ResNet trunk")
    layer, block, module, rest = m.groups()
    stage = f"res{int(layer) + 1}.{block}"
    if module.startswith("conv"):
        return f"{stage}.{module}.{rest}"
    if module.startswith("bn"):
        return f"{stage}.conv{module[2:]}.norm.{rest}"
    if module == "downsample.0":
        return f"{stage}.shortcut.{rest}"
    return f"{stage}.shortcut.norm.{rest}"  # downsample.1


_D2_STEM = re.compile(r"^stem\.conv1\.(norm\.)?(.+)$")
_D2_BLOCK = re.compile(r"^res([2-5])\.(\d+)\.(conv\d|shortcut)\.(norm\.)?(.+)$")


def detectron2_to_torchvision(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`torchvision_to_detectron2` (``num_batches_tracked`` is not restored)."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = _D2_STEM.match(key)
        if m:
            norm, rest = m.groups()
            out[f"bn1.{rest}" if norm else f"conv1.{rest}"] = value
            continue
        m = _D2_BLOCK.match(key)
        if not m:
            raise CheckpointError(f"key {key!r} is not part of a Detectron2 ResNet backbone")
        stage, block, module, norm, rest = m.groups()
        prefix = f"layer{int(stage) - 1}.{block}"
        if module == "shortcut":
            out[f"{prefix}.downsample.{1 if norm else 0}.{rest}"] = value
        elif norm:
            out[f"{prefix}.bn{module[4:]}.{rest}"] = value
        else:
            out[f"{prefix}.{module}.{rest}"] = value
    return out


def _looks_detectron2(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith("stem.conv1.") for k in sd)


# --------------------------------------------------------------------------------------------
# Architecture inference


def infer_trunk(sd: Mapping[str, Tensor], origin: str = "state dict") -> tuple[str, bool, int]:
    """(arch, small_stem, width) of a torchvision-layout trunk state dict, from keys and shapes.

    Block counts per stage and the block type (a ``conv3`` means Bottleneck) tell resnet18 /
    resnet34 / resnet50 apart; the width is conv1's channels / 64 (1, 2 or 4), and res2's first
    conv must agree (torchvision's ``wide_resnet50_2``, which widens only the inner convs, and
    grouped ResNeXts are refused); the stem is small when ``conv1.weight`` has a 3x3 kernel (7x7 =
    ImageNet stem).
    """
    if "conv1.weight" not in sd:
        raise CheckpointError(f"{origin}: no 'conv1.weight': not a ResNet trunk "
                              f"(first keys: {list(sd)[:5]})")
    counts = []
    for layer in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in sd if k.startswith(f"layer{layer}.")}
        counts.append(len(blocks))
    bottleneck = "layer1.0.conv3.weight" in sd
    found = tuple(counts)
    arch = next((a for a, (c, b) in _ARCH_LAYOUT.items() if c == found and b == bottleneck), None)
    if arch is None:
        kind = "Bottleneck" if bottleneck else "BasicBlock"
        raise CheckpointError(f"{origin}: blocks per stage {found} with {kind} blocks match none "
                              f"of {sorted(_ARCH_LAYOUT)}")
    stem = int(sd["conv1.weight"].shape[0])
    width = stem // 64
    if stem % 64 or width not in WIDTHS:
        raise CheckpointError(f"{origin}: conv1 has {stem} channels; pirl builds 64 x width with "
                              f"width in {list(WIDTHS)}")
    res2 = sd["layer1.0.conv1.weight"].shape[0] if "layer1.0.conv1.weight" in sd else -1
    if res2 != 64 * width:
        raise CheckpointError(f"{origin}: res2 width {res2} does not match conv1's {stem} "
                              f"channels (a {arch} of width {width} has {64 * width}); "
                              "torchvision's wide_resnet / grouped ResNeXt variants are not "
                              "supported")
    kernel = tuple(sd["conv1.weight"].shape[-2:])
    if kernel not in ((3, 3), (7, 7)):
        raise CheckpointError(f"{origin}: conv1 kernel {kernel} is neither the small stem (3x3) "
                              "nor the ImageNet stem (7x7)")
    return arch, kernel == (3, 3), width


def infer_arch(sd: Mapping[str, Tensor], origin: str = "state dict") -> tuple[str, bool]:
    """(arch, small_stem) of :func:`infer_trunk` (any width)."""
    arch, small, _ = infer_trunk(sd, origin)
    return arch, small
