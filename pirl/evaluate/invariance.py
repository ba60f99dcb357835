"""Invariance of representations to the jigsaw transformation (PIRL Fig. 4).

For every image I of a split:

* **trunk distance** (any method): ``|| u(phi(I)) - u(mean_k phi(patch_k)) ||`` where phi is the
  trunk's pooled res5 feature, I is the centre-crop evaluation view, patch_1..P are the P patches
  of one jigsaw view I^t (docs/method.md, "Views": random crop, grid, per-patch offsets and
  photometric augmentation) and u(v) = v / ||v||.  Taking the *mean* patch feature makes the measure
  independent of the patch order and of any head, so PIRL, NPID, Jigsaw, Rotation, supervised and
  random trunks are all measured alike.
* **head distance** (PIRL checkpoints only): ``|| f(v_I) - g(v_I^t) ||`` with both embeddings
  unit-normalised, exactly the two quantities the PIRL loss pulls together; v_I^t is the
  checkpoint's own pretext view (jigsaw patches, rotated image, or patches of a rotated crop) built
  with the evaluation's view geometry.

Both distances lie in [0, 2] (0 = identical directions, sqrt(2) = orthogonal).  Every image's
random jigsaw view is seeded by (seed, image index), so all checkpoints see *the same* patches.
The histogram PNG overlays the checkpoints (left panel: trunk distance; right panel, when a PIRL
checkpoint is among them: head distance).  In the paper's Fig. 4, PIRL's distribution sits well
left of Jigsaw's (docs/method.md, "Evaluation protocols").
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from pirl.config import Config, ViewConfig
from pirl.console import Progress
from pirl.data.jigsaw import JigsawView
from pirl.data.source import ImageSource
from pirl.data.views import build_eval_transform, normalize
from pirl.evaluate.features import EvalSettings, SeededItems
from pirl.evaluate.loading import EvalModel
from pirl.methods import build_train_transform

HIST_BINS = np.linspace(0.0, 2.0, 81)  # unit vectors are at most 2 apart


class InvarianceView:
    """PIL -> {"image": uint8 [3,S,S] centre crop, "patches": uint8 [P,3,p,p] jigsaw view, and
    for a PIRL model "t_<key>": its own pretext view tensors}.

    The draws happen in a fixed order (eval view: none; jigsaw view; pretext view), so under the
    same seed every checkpoint gets the same jigsaw patches.
    """

    def __init__(self, view_cfg: ViewConfig, pretext_cfg: Config | None) -> None:
        self.eval = build_eval_transform(view_cfg)
        self.jigsaw = JigsawView(view_cfg)
        self.pretext = build_train_transform(pretext_cfg) if pretext_cfg is not None else None

    def __call__(self, img: Image.Image) -> dict[str, Tensor]:
        out = {"image": self.eval(img), "patches": self.jigsaw(img)[0]}
        if self.pretext is not None:
            for key, value in self.pretext(img).items():
                if key != "image":  # f(v_I) reads the centre crop, not an augmented image
                    out["t_" + key] = value
        return out


def _pretext_config(model: EvalModel, view_cfg: ViewConfig) -> Config | None:
    """The checkpoint's config with the evaluation's view geometry (same patches for every
    checkpoint), or None when the model has no heads to compare."""
    if model.full is None or model.config is None:
        return None
    cfg = copy.deepcopy(model.config)
    if view_cfg.grid != cfg.views.grid:
        raise ValueError(f"{model.path}: trained with a {cfg.views.grid}x{cfg.views.grid} jigsaw "
                         f"grid but the evaluation view uses {view_cfg.grid}x{view_cfg.grid}; "
                         "its head g needs the training grid")
    cfg.views = copy.deepcopy(view_cfg)
    return cfg


def invariance_distances(model: EvalModel, source: ImageSource, view_cfg: ViewConfig,
                         settings: EvalSettings, seed: int = 0) -> dict[str, Tensor]:
    """Per-image distances: {"trunk": [N]} and, for a PIRL model, {"heads": [N]} (float32)."""
    pretext_cfg = _pretext_config(model, view_cfg)
    dataset = SeededItems(source, InvarianceView(view_cfg, pretext_cfg), seed=seed)
    device = settings.device
    trunk = model.trunk.eval().to(device)
    full = model.full.eval().to(device) if model.full is not None and pretext_cfg else None
    trunk_d: list[Tensor] = []
    head_d: list[Tensor] = []
    with torch.inference_mode():
        for batch in Progress(settings.loader(dataset), desc=f"invariance {model.name}",
                              unit="batch", disable=settings.quiet):
            if "index" not in batch:  # every image of this batch was unreadable
                continue
            image = normalize(batch["image"].to(device, non_blocking=True))  # [B,3,S,S]
            patches = normalize(batch["patches"].to(device, non_blocking=True))  # [B,P,3,p,p]
            b, p = patches.shape[:2]
            r_img = F.normalize(trunk(image).float(), dim=1)  # [B, C]
            r_patch = trunk(patches.flatten(0, 1)).float().view(b, p, -1).mean(1)  # [B, C]
            trunk_d.append((r_img - F.normalize(r_patch, dim=1)).norm(dim=1).cpu())
            if full is not None:
                inputs = {"image": image}
                for key, value in batch.items():
                    if key.startswith("t_") and value.dtype == torch.uint8:
                        inputs[key[2:]] = normalize(value.to(device, non_blocking=True))
                z = full(inputs)  # z_img, z_t: [B, D], unit norm
                head_d.append((z["z_img"].float() - z["z_t"].float()).norm(dim=1).cpu())
    out = {"trunk": torch.cat(trunk_d)}
    if head_d:
        out["heads"] = torch.cat(head_d)
    return out


def _summary(d: Tensor) -> dict[str, Any]:
    q = torch.quantile(d.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    hist, _ = np.histogram(d.numpy(), bins=HIST_BINS)
    return {"mean": float(d.mean()), "std": float(d.std()) if len(d) > 1 else 0.0,
            "p10": q[0], "median": q[1], "p90": q[2], "n": len(d),
            "histogram": hist.tolist()}


def plot_invariance(per_model: dict[str, dict[str, Tensor]], out_png: str | Path,
                    title: str = "") -> Path:
    """Overlaid distance histograms (PIRL Fig. 4 form); one panel per distance kind present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("trunk", "heads") if any(k in d for d in per_model.values())]
    titles = {"trunk": "res5: ||u(phi(I)) - u(mean phi(patches of I^t))||",
              "heads": "PIRL heads: ||f(v_I) - g(v_I^t)||"}
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for name, dists in per_model.items():
            if kind in dists:
                d = dists[kind].numpy()
                ax.hist(d, bins=HIST_BINS, alpha=0.45, density=True,
                        label=f"{name} (mean {d.mean():.3f})")
        ax.set_xlabel("l2 distance between unit-norm representations of I and I^t")
        ax.set_ylabel("density")
        ax.set_title(titles[kind], fontsize=10)
        ax.set_xlim(0, 2)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run_invariance(models: Sequence[EvalModel], source: ImageSource, view_cfg: ViewConfig,
                   settings: EvalSettings, out_png: str | Path | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """The invariance protocol over ``source`` for each model; optionally writes the PNG.

    Returns {"protocol": "invariance", "models": {name: {"path", "trunk": summary,
    "heads": summary or None}}, "png": path or None}; a summary has mean, std, p10, median, p90,
    n and the histogram counts over :data:`HIST_BINS`.
    """
    if not models:
        raise ValueError("invariance: give at least one checkpoint")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"invariance: checkpoint names must differ, got {names}")
    per_model: dict[str, dict[str, Tensor]] = {}
    results: dict[str, Any] = {}
    for m in models:
        d = invariance_distances(m, source, view_cfg, settings, seed)
        per_model[m.name] = d
        results[m.name] = {"path": m.path, "trunk": _summary(d["trunk"]),
                           "heads": _summary(d["heads"]) if "heads" in d else None}
    png = None
    if out_png is not None:
        png = str(plot_invariance(per_model, out_png, title=f"{len(source)} images"))
    return {"protocol": "invariance", "models": results, "seed": seed,
            "bins": HIST_BINS.tolist(), "png": png}
