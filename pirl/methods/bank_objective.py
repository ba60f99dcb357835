"""What PIRL and NPID share: the memory bank, the negatives drawn from it, the NCE terms scored
against it, and its update after each step (docs/method.md, "Memory bank" and "Loss").

``objective.loss`` picks L (``nce`` | ``nce-fixed-z`` | ``infonce``, the pure functions of
:mod:`pirl.losses`); every query of a step is scored against the bank *before* this step's
update, with ``min(objective.num_negatives, |D| - 1)`` negatives drawn per sample or once per
batch (``objective.negatives``).  The queries of one sample (PIRL: g(v_I^t) and f(v_I)) share
their negatives: one draw, and in ``per-sample`` mode one gather, serves them all.

Under data parallelism every rank holds an identical replica of the bank.  Every rank draws the
negatives of the *global* batch from identically seeded generators and keeps its own rows, and
the bank update applies every rank's (index, f(v_I)) in rank order, so the replicas never drift
and a checkpoint's one generator state resumes every rank.

Call order per step: ``loss(out, batch)`` -> backward -> optimizer step -> ``after_step(out,
batch)`` (the method's, which calls ``update_bank``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from pirl import losses as L
from pirl.config import LOSSES, Config
from pirl.distributed import all_gather_cat, all_gather_ragged, is_distributed
from pirl.kernels.bank_scores import gather_scores, shared_scores
from pirl.memory_bank import MemoryBank
from pirl.methods.keys import need


class BankObjective:
    """The memory-bank half of an objective; PIRL and NPID each add ``loss``, which combines the
    per-sample terms of :meth:`nce_terms`, and ``after_step``, which calls :meth:`update_bank`.

    cfg: the run config; dataset_size: |D| (the number of bank rows); device: where the bank
    lives (the model's device).
    """

    bank: MemoryBank

    def __init__(self, cfg: Config, dataset_size: int,
                 device: torch.device | str = "cpu") -> None:
        o = cfg.objective
        if o.loss not in LOSSES:
            raise ValueError(f"objective.loss={o.loss!r}: choose one of {list(LOSSES)}")
        self.method, self.loss_name, self.mode = o.method, o.loss, o.negatives
        self.tau, self.momentum = float(o.tau), float(o.bank_momentum)
        self.dataset_size = int(dataset_size)
        self.device = torch.device(device)
        self.num_negatives = min(int(o.num_negatives), self.dataset_size - 1)
        self.log_z: float | None = None  # nce-fixed-z: estimated on the first batch, then fixed
        # Same seed on every rank: identical replicas without a broadcast.
        self.bank = MemoryBank(self.dataset_size, cfg.model.embed_dim, o.bank_dtype,
                               seed=cfg.train.seed).to(self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.train.seed * 1_000_003 + 1)
        # Under data parallelism, this step's indices gathered from every rank: (the batch's own
        # index tensor, all indices in rank order, per-rank sizes).  nce_terms() needs them for
        # the negatives and update_bank() for the update; one collective serves both.
        self._step_indices: tuple[Tensor, Tensor, list[int]] | None = None

    def nce_terms(self, queries: list[Tensor], batch: dict[str, Tensor]) -> list[Tensor]:
        """``L(m_I, q)`` per sample, ``[B]``, for each query ``q`` ``[B,D]`` (unit norm) of
        ``queries``, scored against the positives m_I = bank[batch["index"]] and shared negatives.

        The *last* query must be f(v_I): ``nce-fixed-z`` estimates its normaliser Z once, from
        that query's scores on the first batch (as VISSL does; one Z serves every term).
        """
        idx = need(batch, "index", f"objective {self.method!r}").to(self.device).long()
        q = torch.stack([z.float() for z in queries], dim=1)  # [B,Q,D]
        pos, neg = self._scores(q, idx, batch["index"])  # [B,Q], [B,Q,N]
        if self.loss_name == "nce-fixed-z" and self.log_z is None:
            self.log_z = self._agree(L.estimate_log_z_from_logits(pos[:, -1], neg[:, -1],
                                                                  self.dataset_size))
        return [self._per_sample(pos[:, k], neg[:, k]) for k in range(len(queries))]

    def _scores(self, q: Tensor, idx: Tensor, batch_index: Tensor) -> tuple[Tensor, Tensor]:
        """q ``[B,Q,D]`` -> (pos ``[B,Q]``, neg ``[B,Q,N]``), both divided by tau."""
        p = self.bank.positives(idx)  # [B,D]
        pos = (q * p.unsqueeze(1)).sum(dim=2) / self.tau
        neg_idx = self._negative_indices(idx, batch_index)  # [B,N] or [N]
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
        """pos ``[B]``, neg ``[B,N]`` -> the loss of each sample ``[B]``."""
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

    @torch.no_grad()
    def update_bank(self, z_img: Tensor, batch: dict[str, Tensor]) -> None:
        """Write this step's f(v_I) ``[B,D]`` into the bank: ``m_I <- normalize(momentum m_I +
        (1 - momentum) f(v_I))``.  (index, f(v_I)) are gathered from every rank in rank order,
        so every replica applies the same update."""
        z = z_img.detach().float()
        idx = need(batch, "index", f"objective {self.method!r}").to(z.device).long()
        everyone, sizes = self._gathered_indices(idx, batch["index"])
        self._step_indices = None  # the next step gathers its own
        self.bank.update(everyone, all_gather_ragged(z, sizes)[0], self.momentum)

    def state_dict(self) -> dict[str, Any]:
        """Bank rows, the fixed-Z state and the sampling generator (a plain dict)."""
        return {"method": self.method, "bank": {"rows": self.bank.rows.detach().clone()},
                "log_z": self.log_z, "generator": self.generator.get_state(),
                "num_negatives": self.num_negatives}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a bank whose row count differs from |D| is an error."""
        method = sd.get("method", self.method)
        if method != self.method:
            raise ValueError(f"objective state: saved for method {method!r}, this run is "
                             f"{self.method!r}")
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
            try:
                self.generator.set_state(sd["generator"].cpu())
            except (RuntimeError, TypeError) as e:  # e.g. a CPU checkpoint resumed on a GPU
                warnings.warn(f"objective state: negative-sampling generator state not restored "
                              f"({e}); continuing with a fresh seed", stacklevel=2)
