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
and a checkpoint's one generator state resumes every rank.  The exchange has a fixed size: each
rank pads its batch to the per-rank batch size ``optim.batch_size / world`` by repeating its last
sample (a batch is shorter when unreadable images were skipped), so no rank has to ask the others
how many rows they hold, and the step never waits for the device.  A repeated (index, f(v_I))
writes the same bank row as the original; its negatives are drawn and dropped.

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
from pirl.distributed import all_gather_cat, is_distributed
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
        self.global_batch = int(cfg.optim.batch_size)
        # nce-fixed-z: estimated on the first batch, then fixed; a 0-dim device tensor, so the
        # step never reads it back (the `log_z` property does, for logs and checkpoints).
        self._log_z: Tensor | None = None
        # Same seed on every rank: identical replicas without a broadcast.
        self.bank = MemoryBank(self.dataset_size, cfg.model.embed_dim, o.bank_dtype,
                               seed=cfg.train.seed).to(self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.train.seed * 1_000_003 + 1)
        # Under data parallelism, this step's indices gathered from every rank: (the batch's own
        # index tensor, every rank's padded indices in rank order [W*T]).  nce_terms() needs them
        # for the negatives and update_bank() for the update; one collective serves both.
        self._step_indices: tuple[Tensor, Tensor] | None = None

    @property
    def log_z(self) -> float | None:
        """nce-fixed-z's log Z once estimated (reads the device), else None."""
        return None if self._log_z is None else float(self._log_z)

    def nce_terms(self, queries: list[Tensor], batch: dict[str, Tensor]) -> list[Tensor]:
        """``L(m_I, q)`` per sample, ``[B]``, for each query ``q`` ``[B,D]`` (unit norm) of
        ``queries``, scored against the positives m_I = bank[batch["index"]] and shared negatives.

        The *last* query must be f(v_I): ``nce-fixed-z`` estimates its normaliser Z once, from
        that query's scores on the first batch (as VISSL does; one Z serves every term).
        """
        idx = need(batch, "index", f"objective {self.method!r}").to(self.device).long()
        q = torch.stack([z.float() for z in queries], dim=1)  # [B,Q,D]
        pos, neg = self._scores(q, idx, batch["index"])  # [B,Q], [B,Q,N]
        if self.loss_name == "nce-fixed-z" and self._log_z is None:
            self._log_z = self._agree(L.estimate_log_z_from_logits(pos[:, -1], neg[:, -1],
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
        everyone = self._gathered_indices(idx, batch_index)
        neg = self.bank.negative_indices(everyone, self.num_negatives, self.mode, self.generator)
        if self.mode != "per-sample":
            return neg
        lo = torch.distributed.get_rank() * self._rank_rows()
        return neg[lo:lo + idx.shape[0]]

    def _rank_rows(self) -> int:
        """T, the rows every rank contributes to a gather: the per-rank batch size."""
        return max(1, self.global_batch // torch.distributed.get_world_size())

    def _padded(self, t: Tensor) -> Tensor:
        """This rank's ``t`` ``[b,...]`` -> ``[T,...]``, its last row repeated (see the module
        docstring); b comes from the shape, so nothing is read from the device."""
        b, rows = t.shape[0], self._rank_rows()
        if not 0 < b <= rows:
            raise ValueError(f"memory bank exchange: this rank's batch has {b} samples; expected "
                             f"1 to optim.batch_size / world = {rows}")
        return t if b == rows else torch.cat([t, t[-1:].expand(rows - b, *t.shape[1:])])

    def _gathered_indices(self, idx: Tensor, batch_index: Tensor) -> Tensor:
        """Every rank's padded ``idx`` in rank order, Long ``[W*T]``; gathered once per step
        (``batch_index``, the batch's own tensor, tells whether it is still the same step)."""
        cached = self._step_indices
        if cached is None or cached[0] is not batch_index:
            cached = self._step_indices = (batch_index, all_gather_cat(self._padded(idx)))
        return cached[1]

    def _per_sample(self, pos: Tensor, neg: Tensor) -> Tensor:
        """pos ``[B]``, neg ``[B,N]`` -> the loss of each sample ``[B]``."""
        if self.loss_name == "nce":
            return L.nce_from_logits(pos, neg)
        if self.loss_name == "infonce":
            return L.infonce_from_logits(pos, neg)
        assert self._log_z is not None
        return L.nce_fixed_z_from_logits(pos, neg, self._log_z, self.dataset_size)

    def _agree(self, log_z: Tensor) -> Tensor:
        """The mean of Z over ranks (VISSL averages the per-rank batch means), in log space;
        0-dim float64 in and out, on the device."""
        if not is_distributed():
            return log_z
        t = all_gather_cat(log_z.reshape(1))
        return torch.logsumexp(t, dim=0) - math.log(t.numel())

    @torch.no_grad()
    def update_bank(self, z_img: Tensor, batch: dict[str, Tensor]) -> None:
        """Write this step's f(v_I) ``[B,D]`` into the bank: ``m_I <- normalize(momentum m_I +
        (1 - momentum) f(v_I))``.  (index, f(v_I)) are gathered from every rank in rank order,
        so every replica applies the same update."""
        z = z_img.detach().float()
        idx = need(batch, "index", f"objective {self.method!r}").to(z.device).long()
        if not is_distributed():
            self.bank.update(idx, z, self.momentum)
            return
        everyone = self._gathered_indices(idx, batch["index"])
        self._step_indices = None  # the next step gathers its own
        self.bank.update(everyone, all_gather_cat(self._padded(z)), self.momentum)

    def state_dict(self) -> dict[str, Any]:
        """Bank rows, the fixed-Z state and the sampling generator (a plain dict).

        The rows are copied straight to host memory, where the checkpoint is written from: a
        device-side clone would need a second bank on the GPU (25 GB at 100M float16 rows)."""
        rows = self.bank.rows.detach().to("cpu", copy=True)
        return {"method": self.method, "bank": {"rows": rows},
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
        self._log_z = (None if sd.get("log_z") is None
                       else torch.tensor(float(sd["log_z"]), dtype=torch.float64,
                                         device=self.device))
        if sd.get("generator") is not None:
            try:
                self.generator.set_state(sd["generator"].cpu())
            except (RuntimeError, TypeError) as e:  # e.g. a CPU checkpoint resumed on a GPU
                warnings.warn(f"objective state: negative-sampling generator state not restored "
                              f"({e}); continuing with a fresh seed", stacklevel=2)
