"""Trunk formats in and out: torchvision, Detectron2, pirl checkpoints, VISSL checkpoints.

Exporting
---------
``export_trunk(model_or_state, format, out)`` writes the trunk phi only (heads are dropped for
transfer, docs/method.md) in one of :data:`EXPORT_FORMATS`:

``torchvision``
    A plain state dict that loads into ``torchvision.models.resnetXX()`` with
    ``load_state_dict(sd, strict=False)`` reporting only ``fc.weight`` / ``fc.bias`` missing (the
    trunk has no classifier).  This is also the layout of a run's ``trunk.pt``.  A small-stem
    trunk (``model.small_stem=true``) has ``conv1.weight`` of shape [64, 3, 3, 3] instead of
    [64, 3, 7, 7]: it loads into torchvision only after replacing ``conv1`` by a 3x3 stride-1 conv
    and ``maxpool`` by Identity; :func:`load_backbone` detects this from the kernel size and does
    it.

``detectron2``
    ``{"model": state dict, "__author__": "pirl", "matching_heuristics": True}`` saved with
    ``torch.save``, the shape of Detectron2's own converted torchvision checkpoints (its
    ``tools/convert-torchvision-to-d2.py`` writes the same three keys).  Key mapping, torchvision ->
    Detectron2 ``ResNet`` backbone (i = 1..4 is torchvision's layer index, j the block index, k the
    conv index inside a block: 1-2 for ResNet-18/34 BasicBlock, 1-3 for ResNet-50 Bottleneck):

    =====================================  ===========================================
    torchvision                            Detectron2
    =====================================  ===========================================
    conv1.weight                           stem.conv1.weight
    bn1.{weight,bias,running_mean,var}     stem.conv1.norm.{weight,bias,running_mean,var}
    layer{i}.{j}.conv{k}.weight            res{i+1}.{j}.conv{k}.weight
    layer{i}.{j}.bn{k}.*                   res{i+1}.{j}.conv{k}.norm.*
    layer{i}.{j}.downsample.0.weight       res{i+1}.{j}.shortcut.weight
    layer{i}.{j}.downsample.1.*            res{i+1}.{j}.shortcut.norm.*
    *.num_batches_tracked                  (dropped: Detectron2's FrozenBatchNorm2d has none)
    fc.*                                   (absent: heads are not exported)
    =====================================  ===========================================

    ("var" abbreviates ``running_var``.)  Use it in Detectron2 with ``MODEL.WEIGHTS: trunk.pth``
    (any name but ``*.pkl``: Detectron2 reads ``.pkl`` files with plain pickle, this file is a
    ``torch.save`` zip), ``MODEL.RESNETS.DEPTH: 50`` (18/34 also need
    ``MODEL.RESNETS.RES2_OUT_CHANNELS: 64``), ``MODEL.RESNETS.STRIDE_IN_1X1: False`` (torchvision
    puts the stride in the 3x3 conv), ``INPUT.FORMAT: "RGB"``, ``MODEL.PIXEL_MEAN: [123.675,
    116.280, 103.530]``, ``MODEL.PIXEL_STD: [58.395, 57.120, 57.375]`` (the ImageNet normalisation
    the trunk was trained with).  A small-stem trunk is refused: Detectron2's ``BasicStem`` is
    always a 7x7 stride-2 conv plus max-pool.  A wide trunk (``model.width`` w) keeps the same key
    names; Detectron2 builds it with ``MODEL.RESNETS.STEM_OUT_CHANNELS: 64w``,
    ``RES2_OUT_CHANNELS: 256w`` and ``WIDTH_PER_GROUP: 64w`` (ResNet-50).

    A wide trunk exported as ``torchvision`` has the key names of ``torchvision.models.resnetXX``
    but w times the channels, so it does not load into torchvision's constructor;
    :func:`load_backbone` rebuilds it at the right width.

Importing
---------
``load_backbone(path, arch=None, small_stem=None)`` returns a torchvision ResNet with
``fc = Identity`` in eval mode from ``"random"`` (needs ``arch``), a pirl training checkpoint
(``{"format": "pirl", "config": ..., "model": {"trunk.*": ...}}``), a ``trunk.pt`` / torchvision
state dict (with or without ``fc.*``), a file written by the ``detectron2`` export (or any state
dict in that key layout, optionally under ``backbone.`` / ``backbone.bottom_up.``), or a VISSL
checkpoint (trunk at ``classy_state_dict -> base_model -> model -> trunk``, keys
``_feature_blocks.conv1.weight``, ``_feature_blocks.bn1.*``, ``_feature_blocks.layer1.0.*`` ...:
VISSL's ResNeXt trunk wraps torchvision's modules in an ``nn.ModuleDict`` called
``_feature_blocks``, so stripping the prefix gives torchvision names).  Architecture and stem are
read from the pirl config or inferred from the weights' shapes; a value passed in must agree.

Every file is read with ``torch.load(path, map_location="cpu", weights_only=True)``: a file whose
unpickling would need arbitrary code (a class, a function call) is refused, never executed.  Loads
are strict: any missing or unexpected trunk key is an error listing the keys (only ``fc.*`` is
ignored, and missing ``num_batches_tracked`` counters - absent from Detectron2 files - start at 0).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import ResNet

from pirl.checkpoint import CheckpointError, safe_load  # one loader and error class for all
from pirl.layouts import (
    _looks_detectron2,
    _strip_prefix,
    detectron2_to_torchvision,
    infer_arch,
    infer_trunk,
    torchvision_to_detectron2,
)
from pirl.trunk import build_trunk

__all__ = ["EXPORT_FORMATS", "CheckpointError", "detectron2_to_torchvision", "export_trunk",
           "infer_arch", "load_backbone", "safe_load", "torchvision_to_detectron2",
           "trunk_state_dict"]

EXPORT_FORMATS: tuple[str, ...] = ("torchvision", "detectron2")

# --------------------------------------------------------------------------------------------
# Resolving anything to a torchvision-layout trunk state dict


def _tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _resolve(obj: Any, origin: str) -> tuple[dict[str, Tensor], dict[str, Any], str]:
    """Anything we accept -> (torchvision trunk state dict without fc.*, recorded, kind).

    ``recorded``: the ``arch`` / ``small_stem`` / ``width`` a pirl checkpoint's config states
    (empty for other sources: those are inferred from shapes).  ``kind`` names the detected
    format for messages.
    """
    recorded: dict[str, Any] = {}
    if isinstance(obj, nn.Module):
        trunk = getattr(obj, "trunk", obj)
        if not isinstance(trunk, ResNet):
            raise CheckpointError(f"{origin}: module {type(obj).__name__} has no ResNet `.trunk`")
        sd: dict[str, Tensor] = dict(trunk.state_dict())
        kind = "module"
    elif isinstance(obj, Mapping) and obj.get("format") == "pirl":
        try:
            model_cfg = obj["config"]["model"]
            recorded = {"arch": str(model_cfg["arch"]),
                        "small_stem": bool(model_cfg["small_stem"]),
                        "width": int(model_cfg.get("width", 1))}  # older files: width 1
            state = obj["model"]
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{origin}: pirl checkpoint without {e} (expected config.model."
                                  "arch, config.model.small_stem and model)") from None
        sd = _strip_prefix(state, "trunk.")
        kind = "pirl checkpoint"
        if not sd:
            raise CheckpointError(f"{origin}: pirl checkpoint has no 'trunk.*' keys in 'model'")
    elif isinstance(obj, Mapping) and "classy_state_dict" in obj:
        try:
            trunk_sd = obj["classy_state_dict"]["base_model"]["model"]["trunk"]
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{origin}: VISSL checkpoint without {e} (expected "
                                  "classy_state_dict -> base_model -> model -> trunk)") from None
        sd = _strip_prefix(trunk_sd, "_feature_blocks.")
        kind = "VISSL checkpoint"
        if not sd or len(sd) != len(trunk_sd):
            odd = [k for k in trunk_sd if not k.startswith("_feature_blocks.")][:5]
            raise CheckpointError(f"{origin}: VISSL trunk keys must start with '_feature_blocks.'"
                                  f" (found {odd or 'none'})")
    elif isinstance(obj, Mapping) and "model" in obj and _tensor_dict(obj["model"]):
        # Detectron2-style wrapper {"model": ..., "__author__": ...}: layout decided by the keys.
        return _resolve(dict(obj["model"]), origin)
    elif _tensor_dict(obj):
        sd = dict(obj)
        for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
            if all(k.startswith(prefix) for k in sd):
                sd = _strip_prefix(sd, prefix)
        if any(k.startswith("trunk.") for k in sd):  # a whole pirl model's state dict
            sd = _strip_prefix(sd, "trunk.")
        for prefix in ("backbone.bottom_up.", "backbone."):  # Detectron2 models
            if any(k.startswith(prefix + "stem.") for k in sd):
                sd = _strip_prefix(sd, prefix)
        if _looks_detectron2(sd):
            sd = detectron2_to_torchvision(sd)
            kind = "Detectron2 state dict"
        else:
            kind = "torchvision state dict"
    else:
        top = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{origin}: unrecognised checkpoint layout (top level: {top}); "
                              "expected a pirl checkpoint, a torchvision/Detectron2 state dict or "
                              "a VISSL checkpoint")
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    return sd, recorded, kind


def trunk_state_dict(model_or_state: Any) -> dict[str, Tensor]:
    """The trunk of a model / checkpoint / state dict / file path, torchvision layout, no fc.*."""
    if isinstance(model_or_state, (str, os.PathLike)):
        sd, _, _ = _resolve(safe_load(model_or_state), str(model_or_state))
    else:
        sd, _, _ = _resolve(model_or_state, "input")
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def _check_complete(sd: dict[str, Tensor], arch: str, small_stem: bool, width: int,
                    origin: str) -> dict[str, Tensor]:
    """``sd`` with exactly the trunk's keys and shapes, or an error listing what differs.

    Missing ``num_batches_tracked`` counters (Detectron2 files have none; they only matter for
    BatchNorm with momentum=None) are filled with 0.  The reference is built on the meta device:
    key names and shapes without allocating weights.
    """
    with torch.device("meta"):
        expected = build_trunk(arch, small_stem, width).state_dict()
    sd = dict(sd)
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{origin}: does not match {arch}: missing keys {missing[:8]}"
                              f"{'...' if len(missing) > 8 else ''}, unexpected keys "
                              f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    bad = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
           for k, v in sd.items() if v.shape != expected[k].shape]
    if bad:
        raise CheckpointError(f"{origin}: shapes do not match {arch}: {bad[:4]}")
    return sd


# --------------------------------------------------------------------------------------------
# Public API


def export_trunk(model_or_state: Any, format: str, out: str | os.PathLike[str]) -> Path:
    """Write the trunk of ``model_or_state`` to ``out`` in ``format`` (one of EXPORT_FORMATS).

    ``model_or_state``: a pirl model (anything with a ResNet ``.trunk``), a bare trunk, a model
    state dict, a pirl checkpoint dict, or a path to any file :func:`load_backbone` reads.
    Returns the path written.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export format {format!r}: choose one of {list(EXPORT_FORMATS)}")
    if isinstance(model_or_state, (str, os.PathLike)):
        origin = str(model_or_state)
        sd, _, _ = _resolve(safe_load(model_or_state), origin)
    else:
        origin = "input"
        sd, _, _ = _resolve(model_or_state, origin)
    arch, small, width = infer_trunk(sd, origin)
    sd = _check_complete(sd, arch, small, width, origin)  # complete trunks or nothing
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    out_path = Path(out)
    payload: dict[str, Any]
    if format == "torchvision":
        payload = sd
    else:
        if small:
            raise CheckpointError(f"{origin}: small-stem trunk (3x3 conv1) cannot be exported to "
                                  "Detectron2, whose stem is always a 7x7 stride-2 conv plus "
                                  "max-pool")
        if out_path.suffix == ".pkl":
            raise CheckpointError(f"{out_path}: use a name not ending in .pkl (e.g. .pth): "
                                  "Detectron2 reads .pkl files with plain pickle, this file is a "
                                  "torch.save zip")
        payload = {"model": torchvision_to_detectron2(sd), "__author__": "pirl",
                   "matching_heuristics": True}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out_path)  # atomic: a crash never leaves a half-written export behind
    return out_path


def load_backbone(path: str | os.PathLike[str], arch: str | None = None,
                  small_stem: bool | None = None, width: int | None = None) -> ResNet:
    """A torchvision ResNet (``fc = Identity``, eval mode, CPU) from ``path``.

    ``path`` is ``"random"`` (a randomly initialised trunk: ``arch`` required, ``small_stem``
    defaults to False, ``width`` to 1) or a file in any format listed in the module docstring.
    ``arch`` / ``small_stem`` / ``width`` given for a file must agree with what the file records
    or its shapes imply (a wide trunk is recognised from its shapes: nothing needs to be passed).
    forward of the result: float ``[B, 3, S, S]`` (ImageNet-normalised) -> ``[B, trunk_dim]``.
    """
    if str(path) == "random":
        if arch is None:
            raise ValueError("load_backbone('random') needs arch (resnet18, resnet34 or resnet50)")
        return build_trunk(arch, bool(small_stem), width or 1).eval()
    origin = str(path)
    sd, recorded, kind = _resolve(safe_load(path), origin)
    inf_arch, inf_small, inf_width = infer_trunk(sd, f"{origin} ({kind})")
    inferred: dict[str, Any] = {"arch": inf_arch, "small_stem": inf_small, "width": inf_width}
    given = {"arch": arch, "small_stem": small_stem, "width": width}
    for name, value in inferred.items():
        if name in recorded and recorded[name] != value:
            raise CheckpointError(f"{origin}: config says {name}={recorded[name]!r} but the "
                                  f"weights are {name}={value!r}")
        if given[name] is not None and given[name] != value:
            raise CheckpointError(f"{origin}: asked for {name}={given[name]!r} but the {kind} "
                                  f"holds {name}={value!r}")
    sd = _check_complete(sd, inf_arch, inf_small, inf_width, f"{origin} ({kind})")
    trunk = build_trunk(inf_arch, inf_small, inf_width)
    try:
        trunk.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # shape mismatches
        detail = " ".join(str(e).split())
        raise CheckpointError(f"{origin} ({kind}): {detail[:600]}") from None
    return trunk.eval()
