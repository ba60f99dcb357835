"""MemoryBank: init, the update formula, negative sampling, dtype option, fast scoring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pirl.kernels.bank_scores import gather_scores, gather_scores_reference, shared_scores
from pirl.memory_bank import MemoryBank


def test_init_is_seeded_unit_rows() -> None:
    a, b = MemoryBank(50, 8, seed=3), MemoryBank(50, 8, seed=3)
    assert a.rows.shape == (50, 8) and a.rows.dtype == torch.float32
    torch.testing.assert_close(a.rows.norm(dim=1), torch.ones(50))
    assert torch.equal(a.rows, b.rows) and a.checksum() == b.checksum()
    assert not torch.equal(a.rows, MemoryBank(50, 8, seed=4).rows)


def test_update_formula_by_hand_and_unit_norm() -> None:
    bank = MemoryBank(10, 3, seed=0)
    old = bank.rows.clone()
    idx = torch.tensor([2, 7])
    z = F.normalize(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]), dim=1)
    m = 0.3
    bank.update(idx, z, m)
    for k, i in enumerate(idx.tolist()):
        v = [m * old[i, d].item() + (1 - m) * z[k, d].item() for d in range(3)]
        norm = math.sqrt(sum(x * x for x in v))
        want = torch.tensor([x / norm for x in v])
        torch.testing.assert_close(bank.rows[i], want)
    untouched = [i for i in range(10) if i not in (2, 7)]
    assert torch.equal(bank.rows[untouched], old[untouched])
    torch.testing.assert_close(bank.rows.norm(dim=1), torch.ones(10))


def test_update_with_duplicates_last_wins() -> None:
    bank = MemoryBank(6, 4, seed=1)
    old = bank.rows.clone()
    z = F.normalize(torch.randn(3, 4), dim=1)
    bank.update(torch.tensor([4, 1, 4]), z, 0.5)
    torch.testing.assert_close(bank.rows[4], F.normalize(0.5 * old[4] + 0.5 * z[2], dim=0))
    torch.testing.assert_close(bank.rows[1], F.normalize(0.5 * old[1] + 0.5 * z[1], dim=0))


def test_update_rejects_out_of_range_index() -> None:
    bank = MemoryBank(5, 2)
    with pytest.raises(IndexError, match="out of range"):
        bank.update(torch.tensor([5]), torch.ones(1, 2), 0.5)


def test_per_sample_negatives_never_own_row_and_uniform() -> None:
    size, n = 20, 4000
    bank = MemoryBank(size, 4)
    idx = torch.tensor([0, 7, 19, 7])
    gen = torch.Generator().manual_seed(0)
    neg = bank.negative_indices(idx, n, "per-sample", gen)
    assert neg.shape == (4, n) and neg.dtype == torch.long
    assert neg.min() >= 0 and neg.max() < size
    assert not (neg == idx.unsqueeze(1)).any()
    # each row: uniform over the other 19 rows -> chi-square with 18 dof (mean 18, sd 6)
    for b in range(4):
        counts = torch.bincount(neg[b], minlength=size).double()
        others = torch.cat([counts[: idx[b]], counts[idx[b] + 1:]])
        expected = n / (size - 1)
        chi2 = float(((others - expected) ** 2 / expected).sum())
        assert chi2 < 60, (b, chi2)


def test_per_sample_many_draws_small_bank() -> None:
    bank = MemoryBank(2, 3)
    gen = torch.Generator().manual_seed(1)
    neg = bank.negative_indices(torch.tensor([0, 1]), 1, "per-sample", gen)
    assert neg.tolist() == [[1], [0]]


def test_shared_negatives_exclude_batch_and_are_uniform() -> None:
    size = 30
    bank = MemoryBank(size, 4)
    idx = torch.tensor([3, 4, 29, 0, 4])
    gen = torch.Generator().manual_seed(2)
    counts = torch.zeros(size)
    for _ in range(300):
        neg = bank.negative_indices(idx, 20, "shared", gen)
        assert neg.shape == (20,)
        assert neg.unique().numel() == 20  # without replacement when it fits
        assert not torch.isin(neg, idx).any()
        counts += torch.bincount(neg, minlength=size)
    assert counts[[0, 3, 4, 29]].sum() == 0
    allowed = counts[[i for i in range(size) if i not in (0, 3, 4, 29)]]
    expected = 300 * 20 / 26
    chi2 = float(((allowed - expected) ** 2 / expected).sum())
    assert chi2 < 80, chi2  # 25 dof; without replacement the spread is even smaller
    # more negatives than rows left: with replacement, still never a batch row
    neg = bank.negative_indices(idx, 100, "shared", gen)
    assert neg.shape == (100,) and not torch.isin(neg, idx).any()
    # a large bank (N below 5% of it): drawn with replacement, same exclusion
    big = MemoryBank(5000, 2)
    batch = torch.randint(0, 5000, (64,), generator=gen)
    neg = big.negative_indices(batch, 200, "shared", gen)
    assert neg.shape == (200,) and neg.max() < 5000 and not torch.isin(neg, batch).any()


def test_shared_negatives_with_replacement_skip_repeated_batch_rows_uniformly() -> None:
    """The with-replacement path maps a uniform rank among the allowed rows to a row id with
    fixed shapes; a batch that repeats rows (a padded last batch, the gathered batch of a DDP
    rank) must neither be drawn nor shift the mapping onto a neighbour."""
    size = 50
    bank = MemoryBank(size, 4)
    idx = torch.tensor([3, 3, 7, 49, 0, 7, 48])  # 5 distinct rows, two of them repeated
    gen = torch.Generator().manual_seed(4)
    neg = torch.cat([bank.negative_indices(idx, 2, "shared", gen) for _ in range(4000)])
    counts = torch.bincount(neg, minlength=size)
    excluded = [0, 3, 7, 48, 49]
    assert counts[excluded].sum() == 0 and counts.numel() == size
    allowed = counts[[i for i in range(size) if i not in excluded]].double()
    expected = 8000 / 45
    chi2 = float(((allowed - expected) ** 2 / expected).sum())
    assert chi2 < 90, chi2  # 44 dof: the 99.9% quantile is about 78
    assert allowed.min() > 0  # rows 1, 2, 47 (beside excluded ones) are reachable


def test_bad_mode_and_too_many_negatives() -> None:
    bank = MemoryBank(5, 2)
    with pytest.raises(ValueError, match="objective.negatives"):
        bank.negative_indices(torch.tensor([0]), 2, "everything")
    with pytest.raises(ValueError, match="positive"):
        bank.negative_indices(torch.tensor([0]), 0, "per-sample")
    with pytest.raises(ValueError, match="nothing is left"):
        bank.negative_indices(torch.arange(5), 1, "shared")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_bank_storage(dtype: torch.dtype) -> None:
    full, half = MemoryBank(40, 16, seed=5), MemoryBank(40, 16, dtype=dtype, seed=5)
    assert half.rows.dtype == dtype and half.rows.element_size() == 2
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(half.rows.float(), full.rows, atol=tol, rtol=0)
    assert half.positives(torch.tensor([1, 2])).dtype == torch.float32
    z = F.normalize(torch.randn(4, 16), dim=1)
    half.update(torch.arange(4), z, 0.5)
    full.update(torch.arange(4), z, 0.5)
    torch.testing.assert_close(half.rows.float(), full.rows, atol=tol, rtol=0)
    assert MemoryBank(4, 2, dtype="bfloat16").rows.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="bank_dtype"):
        MemoryBank(4, 2, dtype="int8")


def test_load_state_with_wrong_row_count_is_clear() -> None:
    a, b = MemoryBank(10, 4), MemoryBank(12, 4)
    with pytest.raises(ValueError, match=r"bank rows 12 != \|D\| = 10"):
        a.load_state_dict(b.state_dict())
    c = MemoryBank(10, 4, seed=9)
    a.load_state_dict(c.state_dict())
    assert torch.equal(a.rows, c.rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("queries", [1, 2])
@pytest.mark.parametrize("path", ["chunks of 1", "auto", "dense", "gather"])
def test_fast_gather_scores_equal_reference(dtype: torch.dtype, queries: int, path: str) -> None:
    """Both paths (chunked gather, dense all-row scores) against the [B,N,D] reference, forward
    and backward; n = 37 from 300 rows with replacement, so repeated negatives occur."""
    torch.manual_seed(0)
    bank = MemoryBank(300, 16, dtype=dtype, seed=1)
    b, n = 5, 37
    idx = bank.negative_indices(torch.arange(b), n, "per-sample", torch.Generator().manual_seed(0))
    shape = (b, 16) if queries == 1 else (b, queries, 16)
    q = F.normalize(torch.randn(*shape), dim=-1)
    w = torch.randn(*shape[:-1], n)  # a non-uniform upstream gradient
    q1, q2 = q.clone().requires_grad_(), q.clone().requires_grad_()
    kwargs = {"chunks of 1": {"chunk_bytes": 1}, "auto": {}, "dense": {"dense": True},
              "gather": {"dense": False}}[path]
    fast = gather_scores(q1, bank.rows, idx, **kwargs)  # type: ignore[arg-type]
    ref = gather_scores_reference(q2, bank.rows, idx)
    assert fast.shape == ref.shape == (*shape[:-1], n) and fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref)
    (fast * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(q1.grad, q2.grad)
    # and the scores are the hand-written dot products
    rows = bank.rows.float()
    if queries == 1:
        torch.testing.assert_close(ref[2, 3], (q[2] * rows[idx[2, 3]]).sum())


def test_gather_scores_picks_dense_when_negatives_outnumber_rows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The automatic choice: dense scores when B x N > |D| (float32 bank, scores small enough),
    the chunked gather otherwise."""
    import pirl.kernels.bank_scores as mb

    used: list[str] = []
    for name in ("_DenseScores", "_GatherScores"):
        cls = getattr(mb, name)
        monkeypatch.setattr(mb, name, type(name, (cls,), {"apply": staticmethod(
            lambda *a, _c=cls, _n=name: (used.append(_n), _c.apply(*a))[1])}))
    q = F.normalize(torch.randn(4, 8), dim=1)
    bank = MemoryBank(100, 8)
    gather_scores(q, bank.rows, torch.randint(0, 100, (4, 30)))  # 120 > 100 rows
    gather_scores(q, bank.rows, torch.randint(0, 100, (4, 20)))  # 80 <= 100
    gather_scores(q, MemoryBank(100, 8, dtype=torch.float16).rows,
                  torch.randint(0, 100, (4, 30)))  # half bank: gather (no float32 copy)
    monkeypatch.setitem(mb._DENSE_BYTES, "cpu", 100)  # scores [4, 100] floats > 100 bytes
    gather_scores(q, bank.rows, torch.randint(0, 100, (4, 30)))
    assert used == ["_DenseScores", "_GatherScores", "_GatherScores", "_GatherScores"]


def test_shared_scores_equal_per_sample_with_same_rows() -> None:
    bank = MemoryBank(50, 8)
    q = F.normalize(torch.randn(4, 2, 8), dim=-1)
    idx = torch.tensor([3, 9, 11, 40])
    per = gather_scores(q, bank.rows, idx.expand(4, 4).contiguous())
    torch.testing.assert_close(shared_scores(q, bank.rows, idx), per)


@pytest.mark.parametrize("dense", [False, True])
def test_bank_modified_before_backward_is_detected(dense: bool) -> None:
    """Scoring must use the bank before the update: updating in place between the forward and
    the backward would silently change the gradient, so autograd's version check must fire."""
    bank = MemoryBank(20, 4)
    q = F.normalize(torch.randn(2, 4), dim=1).requires_grad_()
    s = gather_scores(q, bank.rows, torch.tensor([[1, 2], [3, 4]]), dense=dense)
    bank.update(torch.tensor([1]), torch.ones(1, 4), 0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        s.sum().backward()


def test_last_occurrence_maps_every_position_to_its_values_last_position() -> None:
    """Fixed-shape de-duplication (no host read): hand-worked case with runs of 3, 2 and 1."""
    from pirl.memory_bank import _last_occurrence

    idx = torch.tensor([3, 1, 3, 2, 1, 3])
    assert _last_occurrence(idx).tolist() == [5, 4, 5, 3, 4, 5]
    assert _last_occurrence(torch.tensor([7])).tolist() == [0]
    assert _last_occurrence(torch.tensor([2, 0, 1])).tolist() == [0, 1, 2]


def test_chunked_init_draws_the_same_rows_as_one_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bank is initialised chunk by chunk (no float32 copy of a half bank); the rows must be
    the ones a single randn(size, dim) gives, whatever the chunk, so seeds keep their meaning."""
    import pirl.memory_bank as mb

    for size, dim, chunk_values in ((1003, 24, 240), (1003, 24, 24000), (1003, 24, 1 << 24),
                                    (997, 3, 50), (997, 3, 1000)):
        gen = torch.Generator().manual_seed(7)
        want = F.normalize(torch.randn(size, dim, generator=gen), dim=1)
        monkeypatch.setattr(mb, "_INIT_CHUNK_VALUES", chunk_values)
        assert torch.equal(MemoryBank(size, dim, seed=7).rows, want), (size, dim, chunk_values)
        half = MemoryBank(size, dim, dtype=torch.float16, seed=7).rows
        assert half.dtype == torch.float16 and torch.equal(half, want.half())
