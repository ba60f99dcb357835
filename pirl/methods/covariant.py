"""What the covariant baselines (Jigsaw, Rotation) share: their objective, cross-entropy of the
classifier's logits against the label of the transformation the data pipeline applied.  No
memory bank and no state.  Supervised pre-training uses it too, with the image's class as the
label."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from pirl.methods.keys import need


class CovariantObjective:
    """Cross-entropy on ``out["logits"]`` ``[B,K]`` against ``batch[label_key]`` Long ``[B]``.

    ``loss(out, batch)`` -> (scalar, detached terms ``loss``, ``loss_ce``, ``acc`` = top-1 of the
    classifier on this batch); ``after_step`` has nothing to do.
    """

    bank = None

    def __init__(self, method: str, label_key: str) -> None:
        self.method, self.label_key = method, label_key

    def loss(self, out: dict[str, Tensor], batch: dict[str, Tensor]
             ) -> tuple[Tensor, dict[str, Tensor]]:
        who = f"objective {self.method!r}"
        logits = need(out, "logits", who, "the model output")
        target = need(batch, self.label_key, who).to(logits.device).long()
        ce = F.cross_entropy(logits.float(), target)
        acc = (logits.detach().argmax(dim=1) == target).float().mean()
        return ce, {"loss": ce.detach(), "loss_ce": ce.detach(), "acc": acc}

    def after_step(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> None:
        """No bank to update."""

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Checks only that the state was saved for this method."""
        method = sd.get("method", self.method)
        if method != self.method:
            raise ValueError(f"objective state: saved for method {method!r}, this run is "
                             f"{self.method!r}")
