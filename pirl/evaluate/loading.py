"""What a protocol needs from a checkpoint: the trunk, and for PIRL checkpoints the heads too.

``load_eval_model`` accepts everything :func:`pirl.export.load_backbone` accepts ("random", pirl
checkpoints of any method, ``trunk.pt`` / torchvision state dicts, Detectron2 and VISSL files).
A pirl checkpoint also yields its training config (so the CLI can default the evaluation view to
the training image size) and, when its method has both heads (PIRL), the whole model with f and g,
loaded strictly from the checkpoint's ``"model"`` state dict (the invariance protocol measures
||f(v_I) - g(v_I^t)||).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from pirl.config import Config, ConfigError, from_dict
from pirl.export import CheckpointError, load_backbone, safe_load
from pirl.methods import get_method


@dataclass
class EvalModel:
    """A checkpoint as the protocols see it.

    trunk: torchvision ResNet, fc = Identity, eval mode (float [B,3,S,S] -> [B, trunk_dim]).
    full: the PIRL model (``.trunk`` is ``trunk``; forward(batch) -> {"z_img", "z_t"}) or None.
    config: the training config recorded in a pirl checkpoint, else None.
    """

    name: str
    path: str
    trunk: nn.Module
    full: nn.Module | None = None
    config: Config | None = None


def load_eval_model(path: str, arch: str | None = None, small_stem: bool | None = None,
                    name: str | None = None) -> EvalModel:
    """Load ``path`` ("random" with ``arch``, or a checkpoint file) for evaluation."""
    label = name or ("random-" + str(arch) if path == "random" else Path(path).name)
    if path == "random":
        return EvalModel(label, path, load_backbone("random", arch, small_stem))
    obj: Any = safe_load(path)
    if isinstance(obj, Mapping) and obj.get("format") == "pirl" and "config" in obj:
        try:
            cfg = from_dict(obj["config"])
        except ConfigError as e:
            raise CheckpointError(f"{path}: its recorded config does not load ({e})") from None
        method = get_method(cfg)
        if method.has_f_and_g:
            model = method.build_model(cfg)
            try:
                model.load_state_dict(obj["model"], strict=True)
            except (RuntimeError, KeyError, TypeError) as e:
                detail = " ".join(str(e).split())[:600]
                raise CheckpointError(f"{path}: 'model' does not fit a {cfg.model.arch} "
                                      f"{method.name} model with pretext {cfg.objective.pretext} "
                                      f"({detail})") from None
            model.eval()
            for given, have, key in ((arch, cfg.model.arch, "arch"),
                                     (small_stem, cfg.model.small_stem, "small_stem")):
                if given is not None and given != have:
                    raise CheckpointError(f"{path}: asked for {key}={given!r} but the checkpoint "
                                          f"holds {key}={have!r}")
            trunk = model.trunk
            assert isinstance(trunk, nn.Module)
            return EvalModel(label, path, trunk, model, cfg)
        del obj
        return EvalModel(label, path, load_backbone(path, arch, small_stem), None, cfg)
    del obj
    return EvalModel(label, path, load_backbone(path, arch, small_stem))


def unique_labels(paths: Sequence[str]) -> list[str]:
    """Short display names for checkpoints: the file name, or as many parent folders as needed
    to tell them apart (runs/a/checkpoint.pt and runs/b/checkpoint.pt -> a/checkpoint.pt, ...)."""
    for depth in range(1, 8):
        names = ["/".join(Path(p).parts[-depth:]) if p != "random" else p for p in paths]
        if len(set(names)) == len(names):
            return names
    return [f"{i}:{p}" for i, p in enumerate(paths)]
