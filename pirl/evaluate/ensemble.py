"""Several frozen trunks evaluated as one representation (PIRL-ens: ``--concat``).

The paper's PIRL-ens row concatenates the features of separately trained trunks.  Here a
:class:`TrunkEnsemble` stands in for a single trunk wherever a frozen-feature protocol takes one:
:func:`pirl.evaluate.features.extract_features` sees it, extracts (and caches) each member's
pooled features exactly as for a lone trunk, and concatenates them per stage along the feature
dimension.  The member caches are therefore shared with single-trunk evaluations of the same
weights, and :func:`~pirl.evaluate.features.trunk_fingerprint` of the ensemble covers every
member (the linear probe's frozen-trunk check then checks all of them).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Protocol, TypeVar

import torch
from torch import Tensor, nn


class _Rows(Protocol):
    """What :func:`concat_features` needs of :class:`pirl.evaluate.features.Features` (named
    structurally, so this module does not import the one that imports it)."""

    feats: Tensor
    indices: Tensor


R = TypeVar("R", bound=_Rows)


class TrunkEnsemble(nn.Module):
    """A list of trunks whose pooled features are concatenated, in order, per stage.

    Not callable as a network: the protocols only ever take its members' stage features.
    """

    def __init__(self, trunks: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(trunks) < 1:
            raise ValueError("an ensemble needs at least one trunk")
        self.members = nn.ModuleList(trunks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("TrunkEnsemble has no forward: extract its stage features instead")


def members(trunk: nn.Module) -> list[nn.Module]:
    """The trunks whose features make up ``trunk``'s: its members, or ``[trunk]`` itself."""
    return list(trunk.members) if isinstance(trunk, TrunkEnsemble) else [trunk]


def concat_features(parts: Sequence[dict[str, R]]) -> dict[str, R]:
    """Per stage, the members' features side by side: feats ``[N, F_1 + F_2 + ...]``.

    Every member saw the same images, so rows must line up (same dataset indices); an image
    unreadable for one member is unreadable for all, but the check makes that an error rather
    than a silent misalignment.
    """
    out: dict[str, R] = {}
    for stage, first in parts[0].items():
        for p in parts[1:]:
            if not torch.equal(p[stage].indices, first.indices):
                raise RuntimeError(f"ensemble: the members' {stage} features cover different "
                                   "images; cannot concatenate them")
        feats = torch.cat([p[stage].feats for p in parts], dim=1)
        joined = copy.copy(first)  # labels, indices and names are the members' shared ones
        joined.feats = feats
        out[stage] = joined
    return out
