"""Reading the dicts that flow through a training step: the batch (keys written by
:mod:`pirl.data.views`, plus ``index``) and the model's outputs (``z_img``, ``z_t``, ``logits``)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor


def need(d: Mapping[str, Tensor], key: str, who: str, where: str = "batch",
         shape: str = "") -> Tensor:
    """``d[key]``, or a KeyError naming who needed it, from where, its shape and the keys there.

    e.g. ``need(batch, "image", "npid", shape="[B,3,S,S]")`` or ``need(out, "z_t", "objective
    'pirl'", "the model output")``.
    """
    if key not in d:
        shape = f" {shape}" if shape else ""
        raise KeyError(f"{who} needs {where}[{key!r}]{shape}; it has keys {sorted(d)}")
    return d[key]
