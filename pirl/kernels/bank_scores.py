"""Scores of a batch against memory-bank rows: the fast versions and the plain reference.

Scoring a batch against N bank rows per sample is the hot spot of the method (ImageNet: B = 256,
N = 32,000, D = 128, so the gathered negatives ``[B,N,D]`` are 4.2 GB in float32).
:func:`gather_scores` computes the ``[B,N]`` scores in chunks of the batch through a reused buffer
and never keeps ``[B,N,D]`` alive; its backward re-reads the rows (an ``embedding_bag`` weighted sum
for a float32 bank, a chunked re-gather otherwise).  :func:`gather_scores_reference` is the plain
"gather, then batched matrix product" version it is tested against.  :func:`shared_scores` scores
negatives shared by the whole batch (one gather, one product).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


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
    region waits for a descheduled worker (docs/performance.md, "Measurements behind design
    choices", has the timing).
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
