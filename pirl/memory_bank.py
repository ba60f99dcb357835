"""The memory bank of PIRL.md ("Memory bank"), negative sampling, and fast scoring against it.

One L2-normalised row m_I per training image, initialised with random unit vectors from a seed (so
every rank of a data-parallel job builds the same bank without communicating).  After each step
``m_I <- normalize(momentum * m_I + (1 - momentum) * f(v_I))`` with the detached embedding of the
untransformed image; scoring always uses the bank *before* the step's update.

Scoring a batch against N bank rows per sample is the hot spot of the method (ImageNet: B = 256,
N = 32,000, D = 128, so the gathered negatives ``[B,N,D]`` are 4.2 GB in float32).
:func:`gather_scores` computes the ``[B,N]`` scores in chunks of the batch through a reused buffer
and never keeps ``[B,N,D]`` alive; its backward re-reads the rows (an ``embedding_bag`` weighted sum
for a float32 bank, a chunked re-gather otherwise).  :func:`gather_scores_reference` is the plain
"gather, then batched matrix product" version it is tested against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pirl.config import BANK_DTYPES, NEGATIVE_MODES

# The config's names are torch's dtype names.
_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in BANK_DTYPES}


def bank_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32" | "float16" | "bfloat16"`` (config ``objective.bank_dtype``) -> torch dtype."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ValueError(f"memory bank dtype {name}: choose one of {list(_DTYPES)}")
        return name
    if name not in _DTYPES:
        raise ValueError(f"objective.bank_dtype={name!r}: choose one of {list(_DTYPES)}")
    return _DTYPES[name]


class MemoryBank(nn.Module):
    """``|D|`` unit-norm rows of dimension D, stored in ``dtype`` (scores are always float32).

    A float16 / bfloat16 bank halves the memory and the gather traffic of the loss; rows are
    re-normalised in float32 on every update, so the rounding does not accumulate.
    """

    rows: Tensor

    def __init__(self, size: int, dim: int, dtype: torch.dtype | str = torch.float32,
                 seed: int = 0) -> None:
        super().__init__()
        if size < 2:
            raise ValueError(f"memory bank needs at least 2 rows (one per image); got size={size}")
        if dim < 1:
            raise ValueError(f"memory bank dim must be positive; got {dim}")
        self.size, self.dim, self.dtype = size, dim, bank_dtype(dtype)
        gen = torch.Generator().manual_seed(seed)
        init = F.normalize(torch.randn(size, dim, generator=gen), dim=1)  # uniform on the sphere
        self.register_buffer("rows", init.to(self.dtype))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.dtype}"

    def positives(self, idx: Tensor) -> Tensor:
        """Rows m_I of the given images: ``idx`` Long ``[B]`` -> float32 ``[B,D]``."""
        return self.rows.index_select(0, idx.to(self.rows.device)).float()

    def negative_indices(self, idx: Tensor, n: int, mode: str,
                         generator: torch.Generator | None = None) -> Tensor:
        """Draw N negatives, uniform over the bank excluding the positives.

        ``idx`` Long ``[B]``: the batch's own rows.  ``generator`` must live on the bank's device.

        * ``per-sample`` -> Long ``[B,N]``: row b never contains ``idx[b]``.  Each entry is uniform
          over the other ``|D| - 1`` rows: draw r in ``[0, |D|-1)`` and shift ``r >= idx[b]`` up by
          one (exact, and no rejection loop).  Drawn *with replacement*, as NPID / VISSL do
          (at the paper's 32,000 of 1.28M rows a repeat is rare); a row may equal another
          sample's positive, as in the paper.
        * ``shared`` -> Long ``[N]``: one draw for the whole batch, excluding every row of the
          batch, so no sample ever sees its own or a batch-mate's row as a negative.  Without
          replacement when N is more than 5% of the rows left (small datasets, where repeats
          would matter) and fits; otherwise with replacement, where the expected share of repeated
          rows, N / (2 x rows left), is below 2.5% and a ``randperm`` of 1.28M rows per step
          (~50 ms on CPU) is saved.
        """
        if idx.dim() != 1:
            raise ValueError(f"idx must be Long [B]; got shape {tuple(idx.shape)}")
        dev = self.rows.device
        idx = idx.to(dev)
        if n < 1:
            raise ValueError(f"number of negatives must be positive; got {n}")
        if mode == "per-sample":
            r = torch.randint(0, self.size - 1, (idx.shape[0], n), generator=generator,
                              device=dev)
            return r.add_(r >= idx.unsqueeze(1))  # in place: [B,N] is 65 MB at ImageNet scale
        if mode == "shared":
            excluded = torch.unique(idx)  # sorted
            free = self.size - excluded.numel()
            if free < 1:
                raise ValueError(f"shared negatives: the batch covers all {self.size} bank rows; "
                                 "nothing is left to draw from")
            if n <= free and 20 * n > free:
                r = torch.randperm(free, generator=generator, device=dev)[:n]
            else:
                r = torch.randint(0, free, (n,), generator=generator, device=dev)
            # r is the rank among the allowed rows; the k-th excluded row u_k has u_k - k allowed
            # rows below it, so the answer is r + #{k : u_k - k <= r}.
            offsets = excluded - torch.arange(excluded.numel(), device=dev)
            return r + torch.searchsorted(offsets, r, right=True)
        raise ValueError(f"objective.negatives={mode!r}: choose one of {list(NEGATIVE_MODES)}")

    @torch.no_grad()
    def update(self, idx: Tensor, z: Tensor, momentum: float) -> None:
        """``m_I <- normalize(momentum * m_I + (1 - momentum) * z_I)`` for ``idx`` Long ``[B]``,
        ``z`` ``[B,D]`` (detached embeddings of the untransformed images), in float32.

        An index that occurs more than once in ``idx`` (a padded last batch, or a sample repeated
        by the distributed sampler) is updated once, from the old row, with its *last* occurrence:
        every replica receives the same gathered order, so the result is the same everywhere.
        """
        if idx.dim() != 1 or z.dim() != 2 or z.shape[0] != idx.shape[0]:
            raise ValueError(f"update needs idx [B] and z [B,D]; got {tuple(idx.shape)} and "
                             f"{tuple(z.shape)}")
        if z.shape[1] != self.dim:
            raise ValueError(f"update: embedding dim {z.shape[1]} != memory bank dim {self.dim}")
        dev = self.rows.device
        idx, z = idx.to(dev), z.to(dev)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.size):
            raise IndexError(f"memory bank update: index out of range [0, {self.size}): "
                             f"min {int(idx.min())}, max {int(idx.max())}")
        keep = _last_occurrence(idx)
        idx, z = idx[keep], z[keep]
        old = self.rows.index_select(0, idx).float()
        new = F.normalize(momentum * old + (1.0 - momentum) * z.float(), dim=1)
        self.rows.index_copy_(0, idx, new.to(self.dtype))

    @torch.no_grad()
    def checksum(self) -> float:
        """A position-sensitive fingerprint of the rows (replicas on every rank must agree): the
        sum of the rows plus the row sums weighted by their row number."""
        s = self.rows.sum(dim=1, dtype=torch.float64)  # no float64 copy of the whole bank
        w = torch.arange(1, self.size + 1, device=s.device, dtype=torch.float64) / self.size
        return float(s.sum() + (s * w).sum())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        key = prefix + "rows"
        if key in state_dict:
            rows = state_dict[key]
            if rows.dim() != 2 or rows.shape[1] != self.dim:
                raise ValueError(f"memory bank state {key!r}: shape {tuple(rows.shape)}, expected "
                                 f"[{self.size}, {self.dim}]")
            if rows.shape[0] != self.size:
                raise ValueError(f"memory bank state {key!r}: bank rows {rows.shape[0]} != |D| = "
                                 f"{self.size} (the checkpoint was trained on a dataset of "
                                 f"{rows.shape[0]} images)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _last_occurrence(idx: Tensor) -> Tensor:
    """Positions of the last occurrence of each distinct value of ``idx`` [B] -> Long [U]."""
    order = torch.sort(idx, stable=True).indices
    s = idx[order]
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    return order[last]


# ----------------------------------------------------------------------------- scoring


def _chunk_rows(n: int, dim: int, device: torch.device, chunk_bytes: int | None) -> int:
    """How many samples' negatives to gather at once: a float32 buffer of about ``chunk_bytes``
    (CPU default 16 MiB: one ImageNet sample's 32,000 x 128 floats, which stays in cache between
    the gather and the product; GPU default 512 MiB, enough to saturate the device)."""
    if chunk_bytes is None:
        chunk_bytes = (512 if device.type == "cuda" else 16) * 2**20
    return max(1, chunk_bytes // max(1, n * dim * 4))


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Run the chunk loops with one intra-op thread on CPU.

    Each chunk's gather and product are small (~16 MiB), so a parallel region per op costs more in
    synchronisation than it gains; on a CPU shared with other jobs it is far worse, because every
    region waits for a descheduled worker.  Measured on the 2-core development machine (bank
    1.28M x 128, B 256, N 32,000, forward scores): 1.2 s with one thread, 3-4 s with two.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Largest [B*Q, |D|] float32 score matrix the automatic choice lets the dense path build.
_DENSE_BYTES = {"cpu": 256 * 2**20, "cuda": 2 * 2**30}


class _DenseScores(torch.autograd.Function):
    """scores[b, k, j] = query[b, k] . rows[idx[b, j]] via all-row scores (grad to ``query``)."""

    @staticmethod
    def forward(ctx: Any, query: Tensor, rows: Tensor, idx: Tensor  # type: ignore[override]
                ) -> Tensor:
        b, q, d = query.shape
        everything = (query.reshape(b * q, d) @ rows.float().t()).view(b, q, -1)  # [B,Q,|D|]
        ctx.save_for_backward(rows, idx)
        return everything.gather(2, idx.unsqueeze(1).expand(b, q, idx.shape[1]))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        rows, idx = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        b, q, n = grad.shape
        # grad_query[b,k] = sum_j grad[b,k,j] rows[idx[b,j]] = (grad spread over all rows) @ rows;
        # scatter_add sums repeated negatives, as the gather path does.
        spread = grad.new_zeros(b, q, rows.shape[0])
        spread.scatter_add_(2, idx.unsqueeze(1).expand(b, q, n), grad.contiguous())
        return (spread.view(b * q, -1) @ rows.float()).view(b, q, -1), None, None


class _GatherScores(torch.autograd.Function):
    """scores[b, k, j] = query[b, k] . rows[idx[b, j]]  (grad flows to ``query`` only)."""

    @staticmethod
    def forward(ctx: Any, query: Tensor, rows: Tensor, idx: Tensor,  # type: ignore[override]
                chunk_bytes: int | None) -> Tensor:
        b, q, d = query.shape
        n = idx.shape[1]
        c = _chunk_rows(n, d, query.device, chunk_bytes)
        out = torch.empty(b, q, n, dtype=query.dtype, device=query.device)
        buf = torch.empty(c * n, d, dtype=rows.dtype, device=rows.device)
        buf32 = buf if rows.dtype == query.dtype else torch.empty(c * n, d, dtype=query.dtype,
                                                                  device=rows.device)
        with _one_thread(query.device):
            for i in range(0, b, c):
                k = min(c, b - i)
                torch.index_select(rows, 0, idx[i:i + k].reshape(-1), out=buf[:k * n])
                if buf32 is not buf:
                    buf32[:k * n].copy_(buf[:k * n])  # float16/bfloat16 -> float32 for the product
                # [k,Q,D] x [k,D,N] -> [k,Q,N]
                torch.bmm(query[i:i + k], buf32[:k * n].view(k, n, d).transpose(1, 2),
                          out=out[i:i + k])
        ctx.save_for_backward(rows, idx)
        ctx.chunk_bytes = chunk_bytes
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        rows, idx = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        b, q, n = grad.shape
        d = rows.shape[1]
        if rows.dtype == torch.float32 and grad.dtype == torch.float32:
            # grad_query[b,k] = sum_j grad[b,k,j] * rows[idx[b,j]]: exactly a weighted
            # embedding_bag, which reads each row once without materialising anything.
            with _one_thread(grad.device):
                parts = [F.embedding_bag(idx, rows, per_sample_weights=grad[:, k].contiguous(),
                                         mode="sum") for k in range(q)]
            return torch.stack(parts, dim=1), None, None, None
        # half-precision bank: re-gather in chunks and accumulate in float32 (embedding_bag would
        # round the weights and the sums to the bank's 8-11 bit mantissa).
        c = _chunk_rows(n, d, grad.device, ctx.chunk_bytes)
        gq = torch.empty(b, q, d, dtype=grad.dtype, device=grad.device)
        buf = torch.empty(c * n, d, dtype=rows.dtype, device=rows.device)
        buf32 = torch.empty(c * n, d, dtype=grad.dtype, device=rows.device)
        with _one_thread(grad.device):
            for i in range(0, b, c):
                k = min(c, b - i)
                torch.index_select(rows, 0, idx[i:i + k].reshape(-1), out=buf[:k * n])
                buf32[:k * n].copy_(buf[:k * n])
                torch.bmm(grad[i:i + k], buf32[:k * n].view(k, n, d), out=gq[i:i + k])
        return gq, None, None, None


def gather_scores(query: Tensor, rows: Tensor, idx: Tensor,
                  chunk_bytes: int | None = None, dense: bool | None = None) -> Tensor:
    """Dot products of each sample's queries with its own bank rows, without ``[B,N,D]``.

    query: float32 ``[B,D]`` or ``[B,Q,D]`` (Q queries per sample share the same negatives, e.g.
    PIRL's z_t and z_img: one gather serves both); rows: the bank ``[|D|,D]`` (any float dtype,
    no gradient); idx: Long ``[B,N]``.  Returns float32 ``[B,N]`` or ``[B,Q,N]``; differentiable
    in ``query``.

    Two ways to the same numbers (to float rounding): gather each sample's N rows in chunks and
    multiply (reads B x N rows), or, ``dense``, score *every* bank row with one ``[B*Q,D] x
    [D,|D|]`` product and pick each sample's N columns (the backward scatters the gradient into
    ``[B*Q,|D|]`` and multiplies by the bank).  Dense wins when B x N exceeds |D| (small banks:
    the rows would be read many times over); ``dense=None`` picks it then, for a float32 bank,
    if the ``[B*Q,|D|]`` scores fit in ``_DENSE_BYTES``.
    """
    squeeze = query.dim() == 2
    q3 = query.unsqueeze(1) if squeeze else query
    if q3.dim() != 3 or idx.dim() != 2 or idx.shape[0] != q3.shape[0]:
        raise ValueError(f"gather_scores: query [B,D] or [B,Q,D] and idx [B,N] expected; got "
                         f"{tuple(query.shape)} and {tuple(idx.shape)}")
    q3 = q3.float().contiguous()
    if dense is None:
        b, q, n = q3.shape[0], q3.shape[1], idx.shape[1]
        limit = _DENSE_BYTES["cuda" if rows.device.type == "cuda" else "cpu"]
        dense = (rows.dtype == torch.float32 and b * n > rows.shape[0]
                 and b * q * rows.shape[0] * 4 <= limit)
    if dense:
        out = _DenseScores.apply(q3, rows.detach(), idx.to(rows.device))
        return out.squeeze(1) if squeeze else out
    out = _GatherScores.apply(q3, rows.detach(), idx.to(rows.device), chunk_bytes)
    return out.squeeze(1) if squeeze else out


def gather_scores_reference(query: Tensor, rows: Tensor, idx: Tensor) -> Tensor:
    """The straightforward version of :func:`gather_scores` (gather ``[B,N,D]``, then a batched
    matrix product; what NPID / VISSL do).  Same shapes; used by the tests and the benchmark."""
    squeeze = query.dim() == 2
    q3 = (query.unsqueeze(1) if squeeze else query).float()
    neg = rows.detach()[idx].float()  # [B,N,D]
    out = torch.bmm(q3, neg.transpose(1, 2))  # [B,Q,N]
    return out.squeeze(1) if squeeze else out


def shared_scores(query: Tensor, rows: Tensor, idx: Tensor) -> Tensor:
    """Scores against negatives shared by the batch: one ``[N,D]`` gather and one product.

    query ``[B,D]`` or ``[B,Q,D]``; idx Long ``[N]`` -> float32 ``[B,N]`` or ``[B,Q,N]``."""
    neg = rows.detach().index_select(0, idx.to(rows.device)).float()  # [N,D]
    return query.float() @ neg.t()
