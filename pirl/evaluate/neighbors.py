"""Nearest training neighbours of val queries, drawn as a PNG grid.

Each row: a val query (centre crop, its class name) followed by its k most cosine-similar training
images under the frozen ``stage`` features (res5 by default), each titled with its class and
similarity and framed green when its class matches the query's, red otherwise.  The result also
reports precision@k over the *whole* val split (the fraction of the k neighbours sharing the
query's class), a single number that summarises what the grid shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pirl.config import ViewConfig
from pirl.data.source import ImageSource
from pirl.data.views import build_eval_transform
from pirl.evaluate.features import (
    EvalSettings,
    check_labelled_splits,
    eval_view,
    extract_features,
)


def top_neighbors(train_feats: Tensor, query_feats: Tensor, k: int,
                  chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Cosine top-k: train [N, F], queries [M, F] -> (similarities [M, k], train rows Long [M, k]),
    most similar first."""
    bank = F.normalize(train_feats.float(), dim=1)
    k = min(k, bank.shape[0])
    sims, rows = [], []
    for s in range(0, query_feats.shape[0], chunk_size):
        q = F.normalize(query_feats[s:s + chunk_size].float(), dim=1)
        top = (q @ bank.T).topk(k, dim=1)
        sims.append(top.values)
        rows.append(top.indices)
    return torch.cat(sims), torch.cat(rows)


def plot_neighbors(train: ImageSource, val: ImageSource, view_cfg: ViewConfig,
                   queries: list[dict[str, Any]], out_png: str | Path) -> Path:
    """Draw the grid described in the module docstring from :func:`run_neighbors`' query list."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    show = build_eval_transform(view_cfg)
    k = max(len(q["neighbors"]) for q in queries)
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.6 * (k + 1), 1.75 * len(queries)),
                             squeeze=False)

    def draw(ax: Any, source: ImageSource, index: int, title: str, colour: str | None) -> None:
        img = show(source.load(index)).permute(1, 2, 0).numpy()  # [S, S, 3] uint8
        ax.imshow(img)
        ax.set_title(title, fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(colour is not None)
            if colour is not None:
                spine.set_edgecolor(colour)
                spine.set_linewidth(2.5)

    for r, q in enumerate(queries):
        draw(axes[r][0], val, q["index"], f"query: {q['class']}", None)
        for c in range(k):
            ax = axes[r][c + 1]
            if c >= len(q["neighbors"]):
                ax.axis("off")
                continue
            n = q["neighbors"][c]
            draw(ax, train, n["index"], f"{n['class']} ({n['similarity']:.2f})",
                 "green" if n["label"] == q["label"] else "red")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run_neighbors(trunk: nn.Module, train: ImageSource, val: ImageSource, view_cfg: ViewConfig,
                  settings: EvalSettings, out_png: str | Path | None = None,
                  num_queries: int = 8, k: int = 5, seed: int = 0,
                  stage: str = "res5") -> dict[str, Any]:
    """Find each val image's top-k training neighbours; draw ``num_queries`` of them (chosen by a
    seeded permutation of the val split) to ``out_png``.  Returns queries, neighbours and
    precision@k over all of val."""
    check_labelled_splits(train, val)
    if k < 1 or num_queries < 1:
        raise ValueError(f"neighbors: k ({k}) and num_queries ({num_queries}) must be >= 1")
    view = eval_view(view_cfg)
    tr = extract_features(trunk, train, [stage], view, settings, desc="train")[stage]
    va = extract_features(trunk, val, [stage], view, settings, desc="val")[stage]
    sims, rows = top_neighbors(tr.feats.to(settings.device), va.feats.to(settings.device), k)
    sims, rows = sims.cpu(), rows.cpu()
    same = tr.labels[rows] == va.labels.unsqueeze(1)  # [M, k]
    precision = 100.0 * same.float().mean().item()

    rng = np.random.default_rng(seed)
    picks = sorted(rng.permutation(len(va.labels))[:num_queries].tolist())
    queries = []
    for m in picks:
        label = int(va.labels[m])
        neighbors = [{"index": int(tr.indices[j]), "label": int(tr.labels[j]),
                      "class": train.classes[int(tr.labels[j])] if tr.labels[j] >= 0 else "?",
                      "name": train.describe(int(tr.indices[j])), "similarity": float(s)}
                     for s, j in zip(sims[m].tolist(), rows[m].tolist(), strict=True)]
        queries.append({"index": int(va.indices[m]), "label": label,
                        "class": val.classes[label] if label >= 0 else "?",
                        "name": val.describe(int(va.indices[m])), "neighbors": neighbors})
    png = str(plot_neighbors(train, val, view_cfg, queries, out_png)) if out_png else None
    return {"protocol": "neighbors", "stage": stage, "k": int(rows.shape[1]),
            f"precision_at_{k}": precision, "precision_at_k": precision,
            "num_train": len(tr.labels), "num_val": len(va.labels), "queries": queries,
            "png": png}
