"""A PNG of test images with their ground-truth boxes and the detector's confident predictions.

Ground truth is drawn green (difficult objects dashed), predictions with score above the
threshold orange with "class score".  Drawn on matplotlib's Agg canvas directly (no pyplot), so
it works headless and leaves the caller's backend alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

GT_COLOUR = "#1a9850"
PRED_COLOUR = "#f46d43"


def draw_detections(images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]],
                    detections: Sequence[dict[str, Tensor] | None], classes: Sequence[str],
                    out: Path, score_threshold: float = 0.5, title: str = "",
                    columns: int = 3) -> Path:
    """Write a grid of ``images`` (uint8 [3,H,W]) with ``targets`` (boxes, labels 1..C,
    difficult) and the ``detections`` (boxes, labels, scores; None = not predicted) whose score
    exceeds ``score_threshold``.  Returns ``out``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    n = len(images)
    cols = max(1, min(columns, n))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows + 0.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, image, target, det in zip(axes.flat, images, targets, detections, strict=False):
        ax.imshow(image.permute(1, 2, 0).numpy())
        hard = target.get("difficult")
        for j, box in enumerate(target["boxes"].tolist()):
            dashed = hard is not None and bool(hard[j])
            x1, y1, x2, y2 = box
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.6,
                                   ec=GT_COLOUR, ls="--" if dashed else "-"))
        shown = 0
        if det is not None:
            for box, label, score in zip(det["boxes"].tolist(), det["labels"].tolist(),
                                         det["scores"].tolist(), strict=True):
                if score <= score_threshold:
                    continue
                shown += 1
                x1, y1, x2, y2 = box
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.6,
                                       ec=PRED_COLOUR))
                ax.text(x1, y1, f"{classes[label - 1]} {score:.2f}", fontsize=7,
                        color="white", va="bottom",
                        bbox={"facecolor": PRED_COLOUR, "alpha": 0.8, "pad": 1, "lw": 0})
        n_gt = len(target["labels"])
        ax.set_title(f"{n_gt} true, {shown} predicted > {score_threshold:g}", fontsize=9)
    handles = [Line2D([], [], color=GT_COLOUR, lw=2, label="ground truth (dashed: difficult)"),
               Line2D([], [], color=PRED_COLOUR, lw=2,
                      label=f"prediction, score > {score_threshold:g}")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
