"""The contrastive losses of docs/method.md ("Loss"), as pure functions.

Every loss exists at two levels:

* ``*_from_logits(pos [B], neg [B,N])``: from the temperature-scaled scores ``a_p = s(q,p)/tau``
  and ``a_j = s(q,n_j)/tau``.  :class:`pirl.methods.bank_objective.BankObjective` uses these,
  because it computes the scores against the memory bank with a fast gather
  (``pirl.kernels.bank_scores.gather_scores``) and never materialises the ``[B,N,D]`` negatives.
* ``nce / infonce / nce_fixed_z(query [B,D], positive [B,D], negatives [B,N,D] | [N,D], tau)``:
  the public API: scores as dot products of L2-normalised vectors (= cosine
  similarity), then the ``*_from_logits`` function.  ``negatives`` of shape ``[N,D]`` are shared by
  the whole batch (one matrix product); ``[B,N,D]`` gives each sample its own.

Each returns per-sample losses ``[B]`` (sum over the negatives, no mean over the batch);
:func:`pirl_objective` combines the two PIRL terms (Eq. 5) and averages over the batch.

Everything is computed in log space (``logsumexp`` / ``softplus``), never with raw ``exp``: at
tau = 0.01 a score of 1 becomes e^100, which overflows float32.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def scores(query: Tensor, positive: Tensor, negatives: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Temperature-scaled dot products (cosine similarities for unit vectors).

    query, positive: ``[B,D]``; negatives: ``[B,N,D]`` (per sample) or ``[N,D]`` (shared).
    Returns ``(pos [B], neg [B,N])`` = ``(q.p / tau, q.n_j / tau)``, in float32 at least.
    """
    if query.dim() != 2 or positive.shape != query.shape:
        raise ValueError(f"query and positive must both be [B,D]; got {tuple(query.shape)} and "
                         f"{tuple(positive.shape)}")
    dt = torch.promote_types(query.dtype, torch.float32)
    q, p, n = query.to(dt), positive.to(dt), negatives.to(dt)
    pos = (q * p).sum(dim=1) / tau
    if n.dim() == 2:  # shared [N,D]: one [B,D] x [D,N] product
        if n.shape[1] != q.shape[1]:
            raise ValueError(f"negatives [N,D] must have D={q.shape[1]}; got {tuple(n.shape)}")
        neg = q @ n.t() / tau
    elif n.dim() == 3:  # per sample [B,N,D]
        if n.shape[0] != q.shape[0] or n.shape[2] != q.shape[1]:
            raise ValueError(f"negatives [B,N,D] must match query {tuple(q.shape)}; got "
                             f"{tuple(n.shape)}")
        neg = torch.bmm(n, q.unsqueeze(2)).squeeze(2) / tau
    else:
        raise ValueError(f"negatives must be [N,D] or [B,N,D]; got {tuple(n.shape)}")
    return pos, neg


# ----------------------------------------------------------------------------- from logits


def nce_from_logits(pos: Tensor, neg: Tensor) -> Tensor:
    """The paper's Eqs. 3-4 from scaled scores ``pos [B]`` (a_p) and ``neg [B,N]`` (a_j) -> ``[B]``.

    With e = exp(a) and S = sum_j e_j (docs/method.md, computational form):
    ``loss = -log h_p - sum_j log(1 - h_j)``, h_p = e_p / (e_p + S), h_j = e_j / (e_j + S).
    In log space, with L = log S = logsumexp_j a_j:

    * ``-log h_p = log((e_p + S) / e_p) = log(1 + exp(L - a_p)) = softplus(L - a_p)``
    * ``-log(1 - h_j) = log((e_j + S) / S) = log(1 + exp(a_j - L)) = softplus(a_j - L)``

    Both softplus arguments are differences of log-quantities, so nothing overflows even when
    every a is ~100 (tau = 0.01).  Differentiable in both inputs (first order; the gradient is
    formed in the forward pass, see :class:`_NCELogits`).
    """
    return _NCELogits.apply(pos, neg)


class _NCELogits(torch.autograd.Function):
    """:func:`nce_from_logits` with its gradient formed during the forward pass.

    ``[B,N]`` is 8M elements at the paper's scale, and letting autograd differentiate the
    logsumexp / softplus chain walks over it about twice as often as the written-out form.  With
    x_j = a_j - L (<= 0), t_j = sigmoid(x_j), softmax_j = exp(x_j) and d = L - a_p:

    * dloss/da_p = -sigmoid(d)
    * dloss/dL = sigmoid(d) - sum_j t_j, and dL/da_j = softmax_j
    * dloss/da_j = t_j + (dloss/dL) softmax_j
    """

    @staticmethod
    def forward(ctx: Any, pos: Tensor, neg: Tensor) -> Tensor:  # type: ignore[override]
        if neg.dim() != 2 or pos.shape != neg.shape[:1]:
            raise ValueError(f"nce: pos must be [B] and neg [B,N]; got {tuple(pos.shape)} and "
                             f"{tuple(neg.shape)}")
        lse = torch.logsumexp(neg, dim=1)  # L = log S, [B]
        x = neg - lse.unsqueeze(1)  # a_j - L <= 0
        d = lse - pos
        loss = F.softplus(d) + F.softplus(x).sum(dim=1)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            t = torch.sigmoid(x)
            sig_d = torch.sigmoid(d)
            dl = sig_d - t.sum(dim=1)  # dloss/dL
            grad_neg = t.addcmul_(x.exp_(), dl.unsqueeze(1))  # t + dl * softmax, in place
            ctx.save_for_backward(grad_neg, sig_d)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        grad_neg, sig_d = ctx.saved_tensors
        return -sig_d * g, grad_neg * g.unsqueeze(1)


def infonce_from_logits(pos: Tensor, neg: Tensor) -> Tensor:
    """Softmax cross-entropy with the positive as the target class (PyContrast, MoCo, ...):
    ``loss = -log(e_p / (e_p + sum_j e_j)) = logsumexp([a_p, a_1..a_N]) - a_p`` -> ``[B]``."""
    return torch.logsumexp(torch.cat([pos.unsqueeze(1), neg], dim=1), dim=1) - pos


def nce_fixed_z_from_logits(pos: Tensor, neg: Tensor, log_z: float | Tensor,
                            dataset_size: int) -> Tensor:
    """Binary NCE with a uniform noise distribution and a fixed normaliser (the authors' VISSL
    release, after NPID's ``NCECriterion``) -> ``[B]``.

    Model probability P = exp(a) / Z, noise probability P_n = 1/|D|, N noise samples per data
    sample, so the noise rate is k = N / |D|.  The posterior that a score came from the data is
    P / (P + k).  Loss = -log(P_p / (P_p + k)) - sum_j log(k / (P_j + k)), with log P = a - log Z:

    * ``-log(P / (P + k)) = log(1 + k/P) = softplus(log k - a_p + log Z)``
    * ``-log(k / (P + k)) = log(1 + P/k) = softplus(a_j - log Z - log k)``

    ``log_z``: a float or a 0-dim tensor (on the scores' device, so the step never reads it back).
    VISSL adds an ``eps`` of 1.2e-7 to the denominators to avoid log(0); in log space it is not
    needed, and it is omitted (its effect is below float32 resolution for any sane score).
    """
    n = neg.shape[1]
    log_k = math.log(n) - math.log(dataset_size)
    return (F.softplus(log_k + log_z - pos)
            + F.softplus(neg - log_z - log_k).sum(dim=1))


def estimate_log_z_from_logits(pos: Tensor, neg: Tensor, dataset_size: int) -> Tensor:
    """log Z for :func:`nce_fixed_z_from_logits`, estimated once from the first batch, as NPID and
    VISSL do: ``Z = mean(exp(a)) * |D|`` where the mean runs over every score of the batch, the
    positive column included (both references score ``[B, 1+N]`` and average all of it; the
    positive's share is 1/(N+1)).  Computed as ``logsumexp(a) - log(count) + log|D|``, returned
    as a 0-dim float64 tensor on the scores' device (not read back: no wait for the device).
    """
    allv = torch.cat([pos.detach().reshape(-1), neg.detach().reshape(-1)]).double()
    return torch.logsumexp(allv, dim=0) - math.log(allv.numel()) + math.log(dataset_size)


# ----------------------------------------------------------------------------- vectors


def nce(query: Tensor, positive: Tensor, negatives: Tensor, tau: float) -> Tensor:
    """The paper's NCE loss (Eqs. 3-4), per sample ``[B]``.

    query ``[B,D]``: the anchor (g(v_I^t) or f(v_I)); positive ``[B,D]``: m_I from the bank;
    negatives ``[B,N,D]`` (each sample its own) or ``[N,D]`` (shared); all L2-normalised.
    See :func:`nce_from_logits` for the formula.
    """
    return nce_from_logits(*scores(query, positive, negatives, tau))


def infonce(query: Tensor, positive: Tensor, negatives: Tensor, tau: float) -> Tensor:
    """Cross-entropy over ``[positive, negatives] / tau`` with target 0, per sample ``[B]``.
    Shapes as in :func:`nce`."""
    return infonce_from_logits(*scores(query, positive, negatives, tau))


def nce_fixed_z(query: Tensor, positive: Tensor, negatives: Tensor, tau: float,
                log_z: float | Tensor, dataset_size: int) -> Tensor:
    """Binary NCE with P_noise = 1/|D| and a fixed normaliser Z (VISSL), per sample ``[B]``.
    Shapes as in :func:`nce`; ``log_z`` from :func:`estimate_log_z` on the first batch."""
    pos, neg = scores(query, positive, negatives, tau)
    return nce_fixed_z_from_logits(pos, neg, log_z, dataset_size)


def estimate_log_z(query: Tensor, positive: Tensor, negatives: Tensor, tau: float,
                   dataset_size: int) -> float:
    """log Z = log(mean exp(s/tau) * |D|) over one batch's scores (see
    :func:`estimate_log_z_from_logits`).  Shapes as in :func:`nce`."""
    with torch.no_grad():
        pos, neg = scores(query, positive, negatives, tau)
    return float(estimate_log_z_from_logits(pos, neg, dataset_size))


def pirl_objective(term_t: Tensor | None, term_img: Tensor, lam: float) -> Tensor:
    """Eq. 5 averaged over the batch: ``mean(lam * term_t + (1 - lam) * term_img)`` -> scalar.

    ``term_t`` = L(m_I, g(v_I^t)) and ``term_img`` = L(m_I, f(v_I)), both ``[B]``.  lam = 0 is
    NPID (then ``term_t`` may be None).
    """
    if term_t is None:
        if lam != 0:
            raise ValueError(f"pirl_objective: term_t is None but lam={lam} (only lam=0 = NPID "
                             "may omit the transformed-view term)")
        return term_img.mean()
    if term_t.shape != term_img.shape:
        raise ValueError(f"term_t {tuple(term_t.shape)} and term_img {tuple(term_img.shape)} "
                         "must have the same shape [B]")
    return (lam * term_t + (1.0 - lam) * term_img).mean()
