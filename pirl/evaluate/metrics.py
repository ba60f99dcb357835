"""Scores shared by the protocols: top-k accuracy and markdown tables."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Percentage of rows whose true label is among the k highest scores.

    scores: [M, C] (higher = more likely); labels: Long [M].  Returns {"top1": .., "top5": ..} in
    percent.  k is capped at C, so top-5 on a 3-class problem is 100 by definition (and says so
    rather than failing).
    """
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"topk_accuracy: scores {tuple(scores.shape)} and labels "
                         f"{tuple(labels.shape)} do not match ([M, C] and [M])")
    if scores.shape[0] == 0:
        raise ValueError("topk_accuracy: no samples to score")
    out: dict[str, float] = {}
    kmax = min(max(ks), scores.shape[1])
    # [M, kmax] indices of the best classes, best first
    top = scores.topk(kmax, dim=1).indices
    hit = top == labels.to(top.device).unsqueeze(1)
    for k in ks:
        out[f"top{k}"] = 100.0 * hit[:, : min(k, kmax)].any(dim=1).float().mean().item()
    return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table; floats printed with 2 decimals."""

    def cell(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded for a protocol's own randomness (shuffles, inits)."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g
