"""pirl.losses against the formulas of PIRL.md, written out by hand with plain exp / log."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pirl import losses as L

B, N, D, TAU = 3, 5, 4, 0.5


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _inputs(shared: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, p = _unit(B, D, seed=1), _unit(B, D, seed=2)
    n = _unit(N, D, seed=3) if shared else _unit(B, N, D, seed=3)
    return q, p, n


def _neg_rows(n: torch.Tensor, b: int) -> list[list[float]]:
    return n.tolist() if n.dim() == 2 else n[b].tolist()


def _dot(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v, strict=True))


def hand_nce(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, tau: float) -> list[float]:
    """PIRL.md: e_p, e_j, S, h_p, h_j; loss = -log h_p - sum_j log(1 - h_j), one sample at a
    time in plain Python floats."""
    out = []
    for b in range(q.shape[0]):
        qb = q[b].tolist()
        e_p = math.exp(_dot(qb, p[b].tolist()) / tau)
        e = [math.exp(_dot(qb, nj) / tau) for nj in _neg_rows(n, b)]
        s = sum(e)
        h_p = e_p / (e_p + s)
        loss = -math.log(h_p)
        for e_j in e:
            h_j = e_j / (e_j + s)
            loss -= math.log(1.0 - h_j)
        out.append(loss)
    return out


def hand_infonce(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, tau: float) -> list[float]:
    out = []
    for b in range(q.shape[0]):
        qb = q[b].tolist()
        e_p = math.exp(_dot(qb, p[b].tolist()) / tau)
        s = sum(math.exp(_dot(qb, nj) / tau) for nj in _neg_rows(n, b))
        out.append(-math.log(e_p / (e_p + s)))
    return out


def hand_nce_fixed_z(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, tau: float, z: float,
                     size: int) -> list[float]:
    """NPID / VISSL NCECriterion: P = exp(s/tau)/Z, P_n = 1/|D|, k = N noise samples:
    -log(P_p / (P_p + k P_n)) - sum_j log(k P_n / (P_j + k P_n))."""
    out = []
    for b in range(q.shape[0]):
        qb = q[b].tolist()
        rows = _neg_rows(n, b)
        kpn = len(rows) / size
        pp = math.exp(_dot(qb, p[b].tolist()) / tau) / z
        loss = -math.log(pp / (pp + kpn))
        for nj in rows:
            pj = math.exp(_dot(qb, nj) / tau) / z
            loss -= math.log(kpn / (pj + kpn))
        out.append(loss)
    return out


@pytest.mark.parametrize("shared", [False, True])
def test_nce_matches_hand_formula(shared: bool) -> None:
    q, p, n = _inputs(shared)
    got = L.nce(q, p, n, TAU)
    assert got.shape == (B,)
    torch.testing.assert_close(got, torch.tensor(hand_nce(q, p, n, TAU), dtype=torch.float64))


@pytest.mark.parametrize("shared", [False, True])
def test_infonce_matches_hand_formula(shared: bool) -> None:
    q, p, n = _inputs(shared)
    torch.testing.assert_close(L.infonce(q, p, n, TAU),
                               torch.tensor(hand_infonce(q, p, n, TAU), dtype=torch.float64))


@pytest.mark.parametrize("shared", [False, True])
def test_nce_fixed_z_matches_hand_formula(shared: bool) -> None:
    q, p, n = _inputs(shared)
    size, z = 1000, 37.5
    got = L.nce_fixed_z(q, p, n, TAU, math.log(z), size)
    want = torch.tensor(hand_nce_fixed_z(q, p, n, TAU, z, size), dtype=torch.float64)
    torch.testing.assert_close(got, want)


def test_estimate_log_z_is_mean_exp_times_dataset_size() -> None:
    q, p, n = _inputs()
    size = 5000
    vals = []
    for b in range(B):
        vals.append(math.exp(_dot(q[b].tolist(), p[b].tolist()) / TAU))
        vals += [math.exp(_dot(q[b].tolist(), nj) / TAU) for nj in n[b].tolist()]
    want = math.log(sum(vals) / len(vals) * size)
    assert L.estimate_log_z(q, p, n, TAU, size) == pytest.approx(want, rel=1e-12)


def test_fixed_z_equals_nce_when_z_is_the_per_sample_estimate() -> None:
    """PIRL.md: NPID's binary NCE reduces to the paper's form when Z = |D| S / N per sample."""
    q, p, n = _inputs()
    size = 777
    pos, neg = L.scores(q, p, n, TAU)
    for b in range(B):
        log_z = float(torch.logsumexp(neg[b], 0)) + math.log(size / N)
        got = L.nce_fixed_z_from_logits(pos[b:b + 1], neg[b:b + 1], log_z, size)
        torch.testing.assert_close(got, L.nce_from_logits(pos[b:b + 1], neg[b:b + 1]))


@pytest.mark.parametrize("fn", [L.nce, L.infonce])
def test_shared_equals_per_sample_with_identical_negatives(fn) -> None:  # noqa: ANN001
    q, p, n = _inputs(shared=True)
    per = n.unsqueeze(0).expand(B, N, D).contiguous()
    torch.testing.assert_close(fn(q, p, n, TAU), fn(q, p, per, TAU))


@pytest.mark.parametrize("name", ["nce", "infonce", "nce-fixed-z"])
def test_finite_at_low_temperature_with_identical_negatives(name: str) -> None:
    """tau = 0.01 and 1000 copies of one negative: raw exp would overflow float32 (e^100)."""
    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 16), dim=1).requires_grad_()
    p = F.normalize(torch.randn(4, 16), dim=1)
    n = F.normalize(torch.randn(1, 16), dim=1).expand(1000, 16).contiguous()  # float32
    tau = 0.01
    if name == "nce":
        out = L.nce(q, p, n, tau)
    elif name == "infonce":
        out = L.infonce(q, p, n, tau)
    else:
        log_z = L.estimate_log_z(q, p, n, tau, 10_000)
        out = L.nce_fixed_z(q, p, n, tau, log_z, 10_000)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    if name == "nce":
        # identical negatives: every h_j = 1/1001, so that part is exactly 1000 log(1001/1000)
        part = F.softplus(torch.tensor(-math.log(1000.0))) * 1000
        assert float(part) == pytest.approx(1000 * math.log(1001 / 1000), rel=1e-5)
        # and with the query equal to that negative the positive term alone stays finite
        q2 = n[:1].clone()
        assert torch.isfinite(L.nce(q2, p[:1], n, tau)).all()


def test_gradients_match_float64_finite_differences() -> None:
    q, p, n = _inputs()
    q = q.clone().requires_grad_()
    for fn in (L.nce, L.infonce):
        assert torch.autograd.gradcheck(lambda x, f=fn: f(x, p, n, TAU), (q,))
    assert torch.autograd.gradcheck(lambda x: L.nce_fixed_z(x, p, n, TAU, 2.0, 100), (q,))


def test_pirl_objective_and_lambda_zero_is_npid() -> None:
    t = torch.tensor([1.0, 2.0, 3.0])
    i = torch.tensor([5.0, 7.0, 9.0])
    assert float(L.pirl_objective(t, i, 0.5)) == pytest.approx((0.5 * 6 + 0.5 * 21) / 3)
    assert float(L.pirl_objective(t, i, 0.25)) == pytest.approx((0.25 * 6 + 0.75 * 21) / 3)
    assert float(L.pirl_objective(t, i, 0.0)) == pytest.approx(7.0)
    assert float(L.pirl_objective(None, i, 0.0)) == pytest.approx(7.0)
    with pytest.raises(ValueError, match="lam"):
        L.pirl_objective(None, i, 0.5)


def test_bad_shapes_are_named() -> None:
    q, p, n = _inputs()
    with pytest.raises(ValueError, match="negatives"):
        L.nce(q, p, n[:, :, :2], TAU)
    with pytest.raises(ValueError, match="negatives"):
        L.nce(q, p, n[:2], TAU)


def test_nce_gradient_equals_autograd_of_the_written_out_formula() -> None:
    """The hand-derived backward of nce_from_logits against autograd through the plain
    softplus / logsumexp composition, at tau = 0.01-sized logits."""
    g = torch.Generator().manual_seed(4)
    pos = (torch.rand(4, generator=g, dtype=torch.float64) * 200 - 100).requires_grad_()
    neg = (torch.rand(4, 50, generator=g, dtype=torch.float64) * 200 - 100).requires_grad_()
    w = torch.rand(4, generator=g, dtype=torch.float64)
    (L.nce_from_logits(pos, neg) * w).sum().backward()
    got = pos.grad.clone(), neg.grad.clone()
    pos.grad, neg.grad = None, None
    lse = torch.logsumexp(neg, 1)
    plain = F.softplus(lse - pos) + F.softplus(neg - lse.unsqueeze(1)).sum(1)
    (plain * w).sum().backward()
    torch.testing.assert_close(got[0], pos.grad)
    torch.testing.assert_close(got[1], neg.grad)
    torch.testing.assert_close(L.nce_from_logits(pos, neg), plain)
    assert torch.autograd.gradcheck(L.nce_from_logits, (pos.detach()[:2].requires_grad_(),
                                                        neg.detach()[:2, :5].requires_grad_()))
