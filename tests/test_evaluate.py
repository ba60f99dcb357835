"""Unit tests of the evaluation maths against values written out by hand (no images needed)."""

from __future__ import annotations

import math

import pytest
import torch

from pirl.evaluate.features import Features, item_seed, pool_stage, pooled_side, seeded_rng
from pirl.evaluate.finetune import balanced_subset
from pirl.evaluate.knn import knn_classify, knn_scores
from pirl.evaluate.linear import step_milestones, train_linear_head
from pirl.evaluate.metrics import markdown_table, topk_accuracy
from pirl.evaluate.svm import fit_svms, mean_average_precision

# ----------------------------------------------------------------------------- kNN


def test_knn_scores_match_hand_computation() -> None:
    # Four training points in 2-D (not normalised: knn_scores must normalise them itself).
    #   x0 = (1, 0)  class 0        x1 = (0, 1)  class 1
    #   x2 = (2, 2)  class 1        x3 = (-1, 0) class 0
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    # Query q = (2, 1); cosine similarities to x0..x3:
    #   s0 = 2/sqrt(5), s1 = 1/sqrt(5), s2 = 3/sqrt(10), s3 = -2/sqrt(5)
    q = torch.tensor([[2.0, 1.0]])
    s0, s1, s2 = 2 / math.sqrt(5), 1 / math.sqrt(5), 3 / math.sqrt(10)
    tau = 0.07
    # k = 2: the two nearest are x2 (s2 = 0.9487, class 1) and x0 (s0 = 0.8944, class 0).
    got = knn_scores(train, labels, q, num_classes=2, k=2, tau=tau)
    want = torch.tensor([[math.exp(s0 / tau), math.exp(s2 / tau)]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    # k = 3 adds x1 (class 1).
    got3 = knn_scores(train, labels, q, num_classes=2, k=3, tau=tau)
    want3 = torch.tensor([[math.exp(s0 / tau), math.exp(s2 / tau) + math.exp(s1 / tau)]])
    torch.testing.assert_close(got3, want3, rtol=1e-5, atol=0)
    # tau = 1 makes the weights e^s: a second check where the numbers are small.
    got_t1 = knn_scores(train, labels, q, num_classes=2, k=4, tau=1.0)
    want_t1 = torch.tensor([[math.exp(s0) + math.exp(-s0), math.exp(s1) + math.exp(s2)]])
    torch.testing.assert_close(got_t1, want_t1, rtol=1e-5, atol=0)


def test_knn_scores_in_blocks_of_training_rows_match_one_block() -> None:
    """The training features are scored a block of rows at a time with a running top-k; any
    block size (below k, not dividing N) and float16 storage give the one-block votes (up to
    the matmul's float rounding), and the hand-computed case above holds with blocks of one."""
    g = torch.Generator().manual_seed(0)
    train = torch.randn(700, 16, generator=g)
    labels = torch.randint(0, 5, (700,), generator=g)
    q = torch.randn(90, 16, generator=g)
    whole = knn_scores(train, labels, q, 5, k=50, bank_chunk=700)
    for block, chunk in ((1, 1024), (7, 32), (49, 1024), (333, 17)):
        got = knn_scores(train, labels, q, 5, k=50, chunk_size=chunk, bank_chunk=block)
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=0)
    half = knn_scores(train.half(), labels, q, 5, k=50, bank_chunk=64)
    assert torch.equal(half.argmax(1), knn_scores(train.half().float(), labels, q, 5, k=50,
                                                  bank_chunk=700).argmax(1))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]])
    one = knn_scores(x, torch.tensor([0, 1, 1, 0]), torch.tensor([[2.0, 1.0]]), 2, k=2, tau=0.07,
                     bank_chunk=1)
    want = torch.tensor([[math.exp(2 / math.sqrt(5) / 0.07), math.exp(3 / math.sqrt(10) / 0.07)]])
    torch.testing.assert_close(one, want, rtol=1e-5, atol=0)


def test_knn_vote_can_overrule_the_nearest_neighbour() -> None:
    # The nearest neighbour is class 0, but two slightly farther class-1 points outvote it when
    # k = 3 (weights e^(s/tau) with tau = 1 are nearly equal), not when k = 1.
    train = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.99, -0.14]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    assert knn_scores(train, labels, q, 2, k=1, tau=1.0).argmax().item() == 0
    assert knn_scores(train, labels, q, 2, k=3, tau=1.0).argmax().item() == 1


def test_knn_chunking_and_k_cap() -> None:
    g = torch.Generator().manual_seed(0)
    train, query = torch.randn(50, 8, generator=g), torch.randn(13, 8, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    full = knn_scores(train, labels, query, 4, k=10, chunk_size=1000)
    torch.testing.assert_close(knn_scores(train, labels, query, 4, k=10, chunk_size=3), full)
    # k beyond N uses every training point: total weight = sum of all exp(s / tau)
    capped = knn_scores(train, labels, query, 4, k=500, tau=0.5)
    sims = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(
        train, dim=1).T
    torch.testing.assert_close(capped.sum(1), (sims / 0.5).exp().sum(1), rtol=1e-5, atol=1e-5)


def test_knn_classify_percentages_and_bad_labels() -> None:
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    acc = knn_classify(train, torch.tensor([0, 1]), torch.tensor([[1.0, 0.1], [0.1, 1.0]]),
                       torch.tensor([0, 0]), num_classes=2, k=1)
    assert acc == {"top1": 50.0, "top5": 100.0}
    with pytest.raises(ValueError, match="-1"):
        knn_scores(train, torch.tensor([0, -1]), train, 2)


# ----------------------------------------------------------------------------- metrics


def test_topk_accuracy_by_hand() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.0, 0.0, 0.0],   # ranking 1, 2, 0, ...
                           [0.9, 0.0, 0.0, 0.0, 0.0, 0.1],   # ranking 0, 5, ...
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])  # ranking 5, 4, 3, 2, 1, 0
    labels = torch.tensor([2, 0, 0])
    # row 0: label 2 is 2nd -> top-5 hit only; row 1: top-1 hit; row 2: label 0 is 6th -> miss
    acc = topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert acc["top1"] == pytest.approx(100 / 3)
    assert acc["top2"] == pytest.approx(200 / 3)
    assert acc["top5"] == pytest.approx(200 / 3)
    # fewer classes than k: top-5 of 2 classes is always a hit
    assert topk_accuracy(torch.tensor([[0.0, 1.0]]), torch.tensor([0]))["top5"] == 100.0


def test_mean_average_precision_by_hand() -> None:
    # class 0 scores 0.9, 0.8, 0.3, 0.1; positives (items 0, 2) at ranks 1 and 3:
    #   AP = (1/1 + 2/3) / 2 = 5/6
    # class 1 scores 0.1, 0.7, 0.2, 0.6; positives (items 1, 3) at ranks 1 and 2: AP = 1
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2], [0.1, 0.6]])
    labels = torch.tensor([0, 1, 0, 1])
    m, aps = mean_average_precision(scores, labels)
    assert aps[0] == pytest.approx(100 * 5 / 6)
    assert aps[1] == pytest.approx(100.0)
    assert m == pytest.approx((100 * 5 / 6 + 100) / 2)


def test_markdown_table() -> None:
    assert markdown_table(["a", "b"], [[1, 2.345]]) == "| a | b |\n|---|---|\n| 1 | 2.35 |"


# ----------------------------------------------------------------------------- pooling


def test_pooling_reproduces_goyal_dimensions_for_resnet50() -> None:
    # Goyal et al.'s benchmark: conv1 9216, res2 9216, res3 8192, res4 9216, res5 2048.
    for stage, c, h, dim in (("conv1", 64, 56, 9216), ("res2", 256, 56, 9216),
                             ("res3", 512, 28, 8192), ("res4", 1024, 14, 9216),
                             ("res5", 2048, 7, 2048)):
        assert pool_stage(torch.zeros(1, c, h, h), stage).shape == (1, dim), stage
    # capped at the map's own size on small images
    assert pooled_side("conv1", 64, 5) == 5
    # res5 is a global average: equals mean over space
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(pool_stage(x, "res5"), x.mean((2, 3)))


def test_seeded_rng_is_reproducible_and_restores_state() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    with seeded_rng(item_seed(0, 1, 7)):
        a = torch.rand(3)
    after = torch.rand(1)
    assert torch.equal(before, after)  # the outer stream did not move
    with seeded_rng(item_seed(0, 1, 7)):
        assert torch.equal(torch.rand(3), a)
    with seeded_rng(item_seed(0, 2, 7)):
        assert not torch.equal(torch.rand(3), a)


# ----------------------------------------------------------------------------- linear


def test_step_milestones() -> None:
    assert step_milestones(30) == [10, 20]
    assert step_milestones(3) == [1, 2]
    assert step_milestones(1) == []


def _blobs(n: int, seed: int) -> Features:
    """Three well-separated Gaussian blobs in 16-D (labels 0..2)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centres = torch.eye(16)[:3] * 6
    feats = centres[labels] + torch.randn(n, 16, generator=g)
    return Features(feats, labels, torch.arange(n))


def test_linear_head_learns_separable_features() -> None:
    copies = [_blobs(90, 1), _blobs(90, 2)]
    val = _blobs(30, 3)
    r = train_linear_head(lambda c: copies[c], 2, val, num_classes=3, epochs=30, batch_size=16)
    assert r["top1"] == 100.0 and r["dim"] == 16
    assert r["final_loss"] < 0.5


def test_linear_head_survives_a_channel_dead_in_the_first_copy() -> None:
    # Channel 16 is 0 for every image of copy 0 (a ReLU channel that never fired there) but 1.0
    # in copy 1 and in val: standardising by its std (0) alone would multiply it by ~1e6.
    def with_extra(f: Features, value: float) -> Features:
        return Features(torch.cat([f.feats, torch.full((len(f.labels), 1), value)], 1),
                        f.labels, f.indices)

    copies = [with_extra(_blobs(90, 1), 0.0), with_extra(_blobs(90, 2), 1.0)]
    val = with_extra(_blobs(30, 3), 1.0)
    r = train_linear_head(lambda c: copies[c], 2, val, num_classes=3, epochs=30, batch_size=16)
    assert r["final_loss"] < 0.5 and r["top1"] == 100.0


# ----------------------------------------------------------------------------- svm


def test_svms_separate_blobs_and_pick_a_grid_cost() -> None:
    tr, va = _blobs(60, 4), _blobs(30, 5)
    w, b, costs, cv = fit_svms(tr.feats, tr.labels, 3, costs=(0.1, 1.0), folds=3)
    assert w.shape == (3, 16) and b.shape == (3,)
    assert all(c in (0.1, 1.0) for c in costs) and all(set(s) == {0.1, 1.0} for s in cv)
    scores = va.feats @ w.T + b
    m, _ = mean_average_precision(scores, va.labels)
    assert m == pytest.approx(100.0)


# ----------------------------------------------------------------------------- subsets


def test_balanced_subset_is_balanced_and_deterministic() -> None:
    # 100 / 300 / 200 images of classes 0 / 1 / 2, interleaved, plus 50 unlabelled.
    targets = [0] * 100 + [1] * 300 + [2] * 200 + [-1] * 50
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0)).tolist()
    targets = [targets[i] for i in order]
    sub = balanced_subset(targets, 0.01, seed=0)
    # 1% of 600 labelled images over 3 classes = 2 per class
    counts = [sum(targets[i] == c for i in sub) for c in range(3)]
    assert counts == [2, 2, 2]
    assert all(targets[i] >= 0 for i in sub) and sub == sorted(set(sub))
    assert balanced_subset(targets, 0.01, seed=0) == sub
    assert balanced_subset(targets, 0.01, seed=1) != sub
    sub10 = balanced_subset(targets, 0.1, seed=0)
    assert [sum(targets[i] == c for i in sub10) for c in range(3)] == [20, 20, 20]
    # a class smaller than the quota gives all it has
    small = [0] * 3 + [1] * 97
    assert sum(small[i] == 0 for i in balanced_subset(small, 0.1)) == 3
    with pytest.raises(ValueError, match="fraction"):
        balanced_subset(targets, 0.0)
