"""The fine-tuning schedules and learning-rate rules of PIRL's detection experiments.

The paper's schedules are stated for a global batch of 16 images (2 per GPU x 8 GPUs):

=============  ===========  ===============  ==========================================
schedule       iterations   lr x0.1 at       data
=============  ===========  ===============  ==========================================
``voc07+12``   25,000       17,000           VOC07 trainval + VOC12 trainval (16.5K)
``voc07``      12,500       9,500            VOC07 trainval (5K)
``short``      200          150              small sets on a CPU (not in the paper)
=============  ===========  ===============  ==========================================

Learning-rate rules (the starting point depends on how the trunk was trained):

* ``supervised`` (supervised, Jigsaw and Rotation trunks): lr 0.02, 100-iteration warm-up;
* ``contrastive`` (PIRL and NPID++ trunks): lr 0.003, 1,000-iteration warm-up.

Both warm up linearly from 1/3 of the lr (Detectron's warm-up factor 1/3).  For another global
batch B the paper schedules follow the linear scaling rule, as Detectron2's automatic scaling
does: lr x B/16, and iterations, lr steps and warm-up x 16/B, so the same number of images is
seen at the same lr per image.  ``short`` keeps its 200 iterations whatever the batch (it is a
smoke schedule: its warm-up is the rule's scaled by 200 / 12,500) and scales only the lr.
``iters`` overrides the number of iterations, with the lr step and the warm-up moved in
proportion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pirl.methods import REGISTRY, get_method

REFERENCE_BATCH = 16
SCHEDULES: dict[str, tuple[int, int]] = {"voc07+12": (25_000, 17_000), "voc07": (12_500, 9_500),
                                         "short": (200, 150)}
LR_RULES: dict[str, tuple[float, int]] = {"supervised": (0.02, 100), "contrastive": (0.003, 1000)}
WARMUP_FACTOR = 1.0 / 3.0


@dataclass(frozen=True)
class Schedule:
    """A resolved schedule: everything the training loop needs, recorded in the JSON."""

    name: str
    lr_rule: str
    global_batch: int
    iterations: int
    steps: tuple[int, ...]
    base_lr: float
    warmup_iters: int
    warmup_factor: float = WARMUP_FACTOR
    gamma: float = 0.1

    def lr_at(self, iteration: int) -> float:
        """Learning rate of iteration ``iteration`` (0-based): linear warm-up from
        ``warmup_factor x base_lr``, then x ``gamma`` at each step."""
        lr = self.base_lr * self.gamma ** sum(iteration >= s for s in self.steps)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            lr *= self.warmup_factor * (1.0 - alpha) + alpha
        return lr

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["steps"] = list(self.steps)
        return d


def rule_for_method(method: str | None) -> str:
    """The lr rule the paper uses for a trunk trained with ``method`` (its registry entry's
    ``transfer_lr_rule``).  A trunk of unknown origin (None: a torchvision or Detectron2 file, a
    bare trunk.pt) starts from the supervised rule, as the paper's Jigsaw does."""
    if method is None or method not in REGISTRY:
        return "supervised"
    return get_method(method).transfer_lr_rule


def resolve_schedule(name: str, lr_rule: str, global_batch: int,
                     iters: int | None = None) -> Schedule:
    """The schedule ``name`` under ``lr_rule`` for ``global_batch`` images per iteration."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    if lr_rule not in LR_RULES:
        raise ValueError(f"lr rule {lr_rule!r}: choose one of {', '.join(LR_RULES)}")
    if global_batch < 1:
        raise ValueError(f"global batch {global_batch}: must be >= 1")
    if iters is not None and iters < 1:
        raise ValueError(f"--iters {iters}: must be >= 1")
    total, step = SCHEDULES[name]
    lr, warmup = LR_RULES[lr_rule]
    lr *= global_batch / REFERENCE_BATCH
    if name == "short":
        warmup_f = warmup * total / SCHEDULES["voc07"][0]
    else:
        scale = REFERENCE_BATCH / global_batch
        total, step, warmup_f = round(total * scale), round(step * scale), warmup * scale
    if iters is not None:
        step, warmup_f, total = round(step * iters / total), warmup_f * iters / total, iters
    return Schedule(name=name, lr_rule=lr_rule, global_batch=global_batch, iterations=total,
                    steps=(step,) if 0 < step < total else (), base_lr=lr,
                    warmup_iters=min(max(1, round(warmup_f)), total))
