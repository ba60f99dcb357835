"""Cached or streaming linear probe: which one a run uses, and why.

The cached probe (:mod:`pirl.evaluate.linear`) holds pooled float32 features of every requested
stage in memory; the streaming probe (:mod:`pirl.evaluate.linear_stream`) holds none.  ``pirl
eval linear`` streams when asked (``--stream``) or when the cached features would exceed a
memory budget (``--memory-budget`` GB; default half of the machine's RAM), and says which mode
it chose and why.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import nn


def physical_memory_bytes() -> int:
    """Installed RAM in bytes (0 where sysconf cannot tell: then nothing is over budget)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def cached_feature_bytes(num_train: int, num_val: int, copies: int, dims: dict[str, int],
                         disk_cache: bool) -> int:
    """Feature memory of the cached probe: float32 features of every stage for the val split and
    for the training copies held at once (every copy without a disk cache; with one, a single
    copy, since each epoch reloads its own)."""
    held = 1 if disk_cache else copies
    return (num_train * held + num_val) * sum(dims.values()) * 4


def choose_mode(stream: bool, budget_gb: float | None, need_bytes: int) -> tuple[str, str]:
    """("stream" | "cached", reason): ``stream`` forces streaming; otherwise stream exactly when
    ``need_bytes`` exceeds the budget (``budget_gb`` GiB, default half the RAM)."""
    if stream:
        return "stream", "--stream given"
    if budget_gb is not None:
        if budget_gb <= 0:
            raise ValueError(f"--memory-budget={budget_gb:g}: must be a positive number of GB")
        budget, what = int(budget_gb * 2**30), f"--memory-budget {budget_gb:g} GB"
    else:
        budget, what = physical_memory_bytes() // 2, "half of the RAM"
    need = f"cached features need ~{need_bytes / 2**30:.2f} GB"
    if budget and need_bytes > budget:
        return "stream", f"{need} > {what} ({budget / 2**30:.2f} GB)"
    return "cached", f"{need} <= {what} ({budget / 2**30:.2f} GB)"


def decide(trunk: nn.Module, stages: Sequence[str], image_size: int, num_train: int,
           num_val: int, copies: int, disk_cache: bool, stream: bool,
           budget_gb: float | None) -> tuple[str, str]:
    """The mode for a probe of ``stages`` of ``trunk`` (or ensemble) at ``image_size``:
    (mode, reason).  Costs one dummy forward when the budget has to be checked."""
    if stream:
        return choose_mode(True, budget_gb, 0)
    from pirl.evaluate.linear_stream import stage_dims

    dims = stage_dims(trunk, stages, image_size)
    need = cached_feature_bytes(num_train, num_val, copies, dims, disk_cache)
    return choose_mode(False, budget_gb, need)
