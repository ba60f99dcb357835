"""The training objective of each method: PIRL, NPID and the covariant Jigsaw / Rotation baselines.

:class:`Objective` turns the model's outputs (``pirl.models.pirl``) into a scalar loss, and owns the
memory bank of the memory-bank methods:

==========  ===================  ==============================================================
method      reads                loss
==========  ===================  ==============================================================
pirl        z_img, z_t           lam * L(z_t vs m_I) + (1 - lam) * L(z_img vs m_I)  (Eq. 5)
npid        z_img                L(z_img vs m_I)  (lam = 0)
jigsaw      logits, perm_label   cross-entropy over the permutation set
rotation    logits, rotation     4-way cross-entropy
==========  ===================  ==============================================================

L is ``objective.loss`` (``nce`` | ``nce-fixed-z`` | ``infonce``, see :mod:`pirl.losses`), scored
against the bank *before* this step's update, with ``min(objective.num_negatives, |D| - 1)``
negatives drawn per sample or once per batch (``objective.negatives``).  Both PIRL terms use the
same negatives (one draw serves both queries, and in ``per-sample`` mode one gather scores both).

Call order per step: ``loss(out, batch)`` -> backward -> optimizer step -> ``after_step(out,
batch)``, which writes the untransformed images' embeddings into the bank, gathered from every
rank so that all replicas stay identical.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pirl import losses as L
from pirl.config import Config
from pirl.distributed import all_gather_cat, all_gather_ragged, is_distributed
from pirl.kernels.bank_scores import gather_scores, shared_scores
from pirl.memory_bank import MemoryBank

BANK_METHODS = ("pirl", "npid")


def _need(d: dict[str, Tensor], key: str, what: str, method: str) -> Tensor:
    if key not in d:
        raise KeyError(f"objective {method!r} needs {what}[{key!r}]; it has keys {sorted(d)}")
    return d[key]


class Objective:
    """The loss of ``cfg.objective.method`` (see the module docstring) and its state.

    cfg: the run config; dataset_size: |D| (the number of memory-bank rows); device: where the
    bank lives (the model's device); permutations: the jigsaw baseline's permutation set
    ``[P, grid^2]`` (kept for reference; the label is ``batch["perm_label"]``).
    """

    def __init__(self, cfg: Config, dataset_size: int, device: torch.device | str = "cpu",
                 permutations: Tensor | None = None) -> None:
        o = cfg.objective
        self.method, self.loss_name, self.mode = o.method, o.loss, o.negatives
        self.tau, self.lam, self.momentum = float(o.tau), float(o.lam), float(o.bank_momentum)
        self.dataset_size = int(dataset_size)
        self.device = torch.device(device)
        self.permutations = permutations
        self.bank: MemoryBank | None = None
        self.generator: torch.Generator | None = None
        self.log_z: float | None = None  # nce-fixed-z: estimated on the first batch, then fixed
        self.num_negatives = 0
        # Under data parallelism, this step's indices gathered from every rank: (the batch's own
        # index tensor, all indices in rank order, per-rank sizes).  loss() needs them for the
        # negatives and after_step() for the bank update; one collective serves both.
        self._step_indices: tuple[Tensor, Tensor, list[int]] | None = None
        if self.method in BANK_METHODS:
            if self.loss_name not in ("nce", "nce-fixed-z", "infonce"):
                raise ValueError(f"objective.loss={self.loss_name!r}: choose one of nce, "
                                 "nce-fixed-z, infonce")
            self.num_negatives = min(int(o.num_negatives), self.dataset_size - 1)
            # Same seed on every rank: identical replicas without a broadcast.
            self.bank = MemoryBank(self.dataset_size, cfg.model.embed_dim, o.bank_dtype,
                                   seed=cfg.train.seed).to(self.device)
            # The same seed on every rank, and every rank makes the same draws (those of the
            # whole global batch, see _negative_indices): the generator state stays identical
            # across ranks, so the one state a checkpoint saves resumes every rank exactly.
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(cfg.train.seed * 1_000_003 + 1)
        elif self.method not in ("jigsaw", "rotation"):
            raise ValueError(f"objective.method={self.method!r}: choose one of pirl, npid, "
                             "jigsaw, rotation")

    # ------------------------------------------------------------------ loss

    def loss(self, out: dict[str, Tensor], batch: dict[str, Tensor]
             ) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss and its terms (plain floats, for logging).

        pirl: terms loss, loss_t, loss_img; npid: loss, loss_img; jigsaw / rotation: loss,
        loss_ce, acc (top-1 of the classifier on this batch).
        """
        if self.method in ("jigsaw", "rotation"):
            key = "perm_label" if self.method == "jigsaw" else "rotation"
            logits = _need(out, "logits", "the model output", self.method)
            target = _need(batch, key, "the batch", self.method).to(logits.device).long()
            ce = F.cross_entropy(logits.float(), target)
            acc = float((logits.argmax(dim=1) == target).float().mean())
            return ce, {"loss": float(ce.detach()), "loss_ce": float(ce.detach()), "acc": acc}

        z_img = _need(out, "z_img", "the model output", self.method)
        queries = [z_img]
        if self.method == "pirl":
            queries.insert(0, _need(out, "z_t", "the model output", self.method))
        idx = _need(batch, "index", "the batch", self.method).to(self.device).long()
        pos, neg = self._logits(torch.stack([q.float() for q in queries], dim=1), idx,
                                batch["index"])
        if self.loss_name == "nce-fixed-z" and self.log_z is None:
            # The image term's scores of the first batch, as in VISSL (one Z for both terms).
            self.log_z = self._agree(L.estimate_log_z_from_logits(pos[:, -1], neg[:, -1],
                                                                  self.dataset_size))
        per_term = [self._per_sample(pos[:, k], neg[:, k]) for k in range(len(queries))]
        if self.method == "pirl":
            term_t, term_img = per_term
            total = L.pirl_objective(term_t, term_img, self.lam)
            return total, {"loss": float(total.detach()), "loss_t": float(term_t.detach().mean()),
                           "loss_img": float(term_img.detach().mean())}
        total = L.pirl_objective(None, per_term[0], 0.0)
        return total, {"loss": float(total.detach()), "loss_img": float(total.detach())}

    def _logits(self, q: Tensor, idx: Tensor, batch_index: Tensor) -> tuple[Tensor, Tensor]:
        """q ``[B,Q,D]`` (unit norm) -> (pos ``[B,Q]``, neg ``[B,Q,N]``), divided by tau."""
        assert self.bank is not None
        p = self.bank.positives(idx)  # [B,D]
        pos = (q * p.unsqueeze(1)).sum(dim=2) / self.tau
        neg_idx = self._negative_indices(idx, batch_index)
        qt = q / self.tau  # scaling the [B,Q,D] query, not the [B,Q,N] scores: two passes fewer
        if self.mode == "per-sample":
            return pos, gather_scores(qt, self.bank.rows, neg_idx)
        return pos, shared_scores(qt, self.bank.rows, neg_idx)

    def _negative_indices(self, idx: Tensor, batch_index: Tensor) -> Tensor:
        """Negatives of this rank's samples ``idx`` Long ``[b]``: ``[b,N]`` (per-sample) or
        ``[N]`` (shared).

        Under data parallelism every rank draws for the *global* batch (indices gathered in rank
        order) and keeps its own rows, so the negatives are exactly those of a single-process run
        with the same global batch, shared negatives exclude every row of the global batch, and
        the generators of all ranks stay in step.  The cost is drawing W x [b,N] integers, the
        same as one process would; nothing [.,N,D] is gathered.
        """
        assert self.bank is not None
        if not is_distributed():
            return self.bank.negative_indices(idx, self.num_negatives, self.mode, self.generator)
        everyone, sizes = self._gathered_indices(idx, batch_index)
        neg = self.bank.negative_indices(everyone, self.num_negatives, self.mode, self.generator)
        if self.mode != "per-sample":
            return neg
        lo = sum(sizes[:torch.distributed.get_rank()])
        return neg[lo:lo + idx.shape[0]]

    def _gathered_indices(self, idx: Tensor, batch_index: Tensor) -> tuple[Tensor, list[int]]:
        """Every rank's ``idx`` in rank order and the per-rank sizes; gathered once per step
        (``batch_index``, the batch's own tensor, tells whether it is still the same step)."""
        cached = self._step_indices
        if cached is None or cached[0] is not batch_index:
            everyone, sizes = all_gather_ragged(idx)
            cached = self._step_indices = (batch_index, everyone, sizes)
        return cached[1], cached[2]

    def _per_sample(self, pos: Tensor, neg: Tensor) -> Tensor:
        if self.loss_name == "nce":
            return L.nce_from_logits(pos, neg)
        if self.loss_name == "infonce":
            return L.infonce_from_logits(pos, neg)
        assert self.log_z is not None
        return L.nce_fixed_z_from_logits(pos, neg, self.log_z, self.dataset_size)

    def _agree(self, log_z: float) -> float:
        """The mean of Z over ranks (VISSL averages the per-rank batch means), in log space."""
        if not is_distributed():
            return log_z
        t = all_gather_cat(torch.tensor([log_z], dtype=torch.float64, device=self.device))
        return float(torch.logsumexp(t, dim=0) - math.log(t.numel()))

    # ------------------------------------------------------------------ bank update

    @torch.no_grad()
    def after_step(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> None:
        """Write this step's untransformed-image embeddings into the bank (memory-bank methods;
        a no-op otherwise).  (index, z_img) are gathered from every rank in rank order, so every
        replica applies the same update."""
        if self.bank is None:
            return
        z = _need(out, "z_img", "the model output", self.method).detach().float()
        idx = _need(batch, "index", "the batch", self.method).to(z.device).long()
        everyone, sizes = self._gathered_indices(idx, batch["index"])
        self._step_indices = None  # the next step gathers its own
        self.bank.update(everyone, all_gather_ragged(z, sizes)[0], self.momentum)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Bank rows, the fixed-Z state and the sampling generator (a plain dict)."""
        sd: dict[str, Any] = {"method": self.method}
        if self.bank is not None:
            assert self.generator is not None
            sd["bank"] = {"rows": self.bank.rows.detach().clone()}
            sd["log_z"] = self.log_z
            sd["generator"] = self.generator.get_state()
            sd["num_negatives"] = self.num_negatives
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a bank whose row count differs from |D| is an error."""
        method = sd.get("method", self.method)
        if method != self.method:
            raise ValueError(f"objective state: saved for method {method!r}, this run is "
                             f"{self.method!r}")
        if self.bank is None:
            return
        if "bank" not in sd or "rows" not in sd["bank"]:
            raise KeyError("objective state: key 'bank' (memory bank rows) is missing")
        rows = sd["bank"]["rows"]
        if rows.shape[0] != self.dataset_size:
            raise ValueError(f"objective state: memory bank rows {rows.shape[0]} != |D| = "
                             f"{self.dataset_size}; the checkpoint comes from a dataset of a "
                             "different size")
        self.bank.load_state_dict(sd["bank"])
        self.log_z = None if sd.get("log_z") is None else float(sd["log_z"])
        if sd.get("generator") is not None:
            assert self.generator is not None
            try:
                self.generator.set_state(sd["generator"].cpu())
            except (RuntimeError, TypeError) as e:  # e.g. a CPU checkpoint resumed on a GPU
                warnings.warn(f"objective state: negative-sampling generator state not restored "
                              f"({e}); continuing with a fresh seed", stacklevel=2)
