"""Objective: the PIRL / NPID / Jigsaw / Rotation losses, the bank update, state, distribution."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pirl import losses as L
from pirl.config import Config
from pirl.methods import build_objective
from pirl.methods.bank_objective import BankObjective

SIZE, D, B = 40, 8, 6


def _cfg(method: str = "pirl", loss: str = "nce", mode: str = "per-sample", n: int = 10,
         dtype: str = "float32") -> Config:
    cfg = Config()
    cfg.model.embed_dim = D
    o = cfg.objective
    o.method, o.loss, o.negatives, o.num_negatives, o.bank_dtype = method, loss, mode, n, dtype
    return cfg


def _out(seed: int = 0, grad: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z_img = F.normalize(torch.randn(B, D, generator=g), dim=1)
    z_t = F.normalize(torch.randn(B, D, generator=g), dim=1)
    return {"z_img": z_img.requires_grad_(grad), "z_t": z_t.requires_grad_(grad)}


def _batch(offset: int = 0) -> dict[str, torch.Tensor]:
    return {"index": torch.arange(B) * 3 + offset}


def _same_negatives(obj: BankObjective, idx: torch.Tensor) -> torch.Tensor:
    """The negative indices the next ``obj.loss`` call will draw (replaying its generator)."""
    g = torch.Generator().manual_seed(0)
    g.set_state(obj.generator.get_state())
    return obj.bank.negative_indices(idx, obj.num_negatives, obj.mode, g)


@pytest.mark.parametrize("mode", ["per-sample", "shared"])
@pytest.mark.parametrize("loss", ["nce", "infonce"])
def test_pirl_loss_is_eq5_of_the_vector_losses(mode: str, loss: str) -> None:
    obj = build_objective(_cfg(loss=loss, mode=mode), SIZE, "cpu")
    assert obj.bank is not None
    out, batch = _out(), _batch()
    neg_idx = _same_negatives(obj, batch["index"])
    rows = obj.bank.rows.clone()
    pos = rows[batch["index"]]
    neg = rows[neg_idx]  # [B,N,D] or [N,D]
    fn = L.nce if loss == "nce" else L.infonce
    t_ref = fn(out["z_t"].detach(), pos, neg, 0.07)
    i_ref = fn(out["z_img"].detach(), pos, neg, 0.07)
    total, terms = obj.loss(out, batch)
    want = (0.5 * t_ref + 0.5 * i_ref).mean()
    torch.testing.assert_close(total.detach(), want)
    assert all(t.dim() == 0 and not t.requires_grad for t in terms.values())  # no host sync
    assert float(terms["loss"]) == pytest.approx(float(want), rel=1e-5)
    assert float(terms["loss_t"]) == pytest.approx(float(t_ref.mean()), rel=1e-5)
    assert float(terms["loss_img"]) == pytest.approx(float(i_ref.mean()), rel=1e-5)
    total.backward()
    assert out["z_t"].grad is not None and out["z_img"].grad is not None
    assert torch.isfinite(out["z_t"].grad).all()


def test_fixed_z_is_estimated_once_and_kept() -> None:
    obj = build_objective(_cfg(loss="nce-fixed-z"), SIZE, "cpu")
    out, batch = _out(), _batch()
    neg_idx = _same_negatives(obj, batch["index"])
    assert obj.bank is not None
    rows = obj.bank.rows.clone()
    pos, neg = rows[batch["index"]], rows[neg_idx]
    log_z = L.estimate_log_z(out["z_img"].detach(), pos, neg, 0.07, SIZE)
    total, _ = obj.loss(out, batch)
    assert obj.log_z == pytest.approx(log_z, rel=1e-9)
    want = (0.5 * L.nce_fixed_z(out["z_t"].detach(), pos, neg, 0.07, log_z, SIZE)
            + 0.5 * L.nce_fixed_z(out["z_img"].detach(), pos, neg, 0.07, log_z, SIZE)).mean()
    torch.testing.assert_close(total.detach(), want)
    obj.loss(_out(seed=5), _batch(1))
    assert obj.log_z == pytest.approx(log_z, rel=1e-9)  # fixed after the first batch


def test_npid_equals_pirl_with_lambda_zero() -> None:
    cfg_p = _cfg("pirl")
    cfg_p.objective.lam = 0.0
    pirl, npid = build_objective(cfg_p, SIZE, "cpu"), build_objective(_cfg("npid"), SIZE, "cpu")
    out = _out()
    lp, tp = pirl.loss(out, _batch())
    ln, tn = npid.loss({"z_img": out["z_img"]}, _batch())
    torch.testing.assert_close(lp, ln)
    assert set(tn) == {"loss", "loss_img"}
    assert float(tn["loss"]) == pytest.approx(float(tp["loss_img"]))


def test_after_step_updates_bank_with_image_embedding_only() -> None:
    obj = build_objective(_cfg(), SIZE, "cpu")
    assert obj.bank is not None
    before = obj.bank.rows.clone()
    out, batch = _out(), _batch()
    obj.loss(out, batch)
    assert torch.equal(obj.bank.rows, before)  # scoring does not touch the bank
    obj.after_step(out, batch)
    i = batch["index"]
    want = F.normalize(0.5 * before[i] + 0.5 * out["z_img"].detach(), dim=1)
    torch.testing.assert_close(obj.bank.rows[i], want)
    rest = torch.ones(SIZE, dtype=torch.bool)
    rest[i] = False
    assert torch.equal(obj.bank.rows[rest], before[rest])


def test_negatives_capped_at_dataset_size_minus_one() -> None:
    obj = build_objective(_cfg(n=32000), 12, "cpu")
    assert obj.num_negatives == 11
    total, _ = obj.loss(_out(), {"index": torch.arange(B)})
    assert torch.isfinite(total)


@pytest.mark.parametrize("method,key,classes", [("jigsaw", "perm_label", 7),
                                                 ("rotation", "rotation", 4)])
def test_classification_baselines(method: str, key: str, classes: int) -> None:
    obj = build_objective(_cfg(method), SIZE, "cpu")
    assert obj.bank is None
    logits = torch.randn(B, classes, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 1, 0])
    target[0] = int(logits[0].argmax())  # at least one right answer
    total, terms = obj.loss({"logits": logits}, {key: target})
    ref = -sum(math.log(math.exp(logits[b, target[b]].item())
                        / sum(math.exp(v) for v in logits[b].tolist())) for b in range(B)) / B
    assert float(terms["loss_ce"]) == pytest.approx(ref, rel=1e-5)
    assert float(terms["loss"]) == float(terms["loss_ce"])
    acc = sum(int(logits[b].argmax()) == int(target[b]) for b in range(B)) / B
    assert float(terms["acc"]) == pytest.approx(acc)
    assert all(t.dim() == 0 and not t.requires_grad for t in terms.values())
    total.backward()
    obj.after_step({"logits": logits}, {key: target})  # no bank: no-op
    assert obj.state_dict() == {"method": method}


def test_missing_keys_are_named() -> None:
    obj = build_objective(_cfg(), SIZE, "cpu")
    with pytest.raises(KeyError, match="z_t"):
        obj.loss({"z_img": torch.zeros(B, D)}, _batch())
    with pytest.raises(KeyError, match="index"):
        obj.loss(_out(), {})


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_state_roundtrip_resumes_identically(tmp_path: Path, dtype: str) -> None:
    cfg = _cfg(loss="nce-fixed-z", dtype=dtype)
    a = build_objective(cfg, SIZE, "cpu")
    a.loss(_out(), _batch())
    a.after_step(_out(), _batch())
    torch.save(a.state_dict(), tmp_path / "obj.pt")
    b = build_objective(cfg, SIZE, "cpu")
    b.load_state_dict(torch.load(tmp_path / "obj.pt", weights_only=True))
    assert a.bank is not None and b.bank is not None
    assert torch.equal(a.bank.rows, b.bank.rows) and a.bank.rows.dtype == b.bank.rows.dtype
    assert b.log_z == a.log_z
    la, _ = a.loss(_out(seed=3), _batch(1))
    lb, _ = b.loss(_out(seed=3), _batch(1))
    assert torch.equal(la, lb)  # same negatives: the generator state came back too


def test_state_from_a_different_dataset_size_is_refused() -> None:
    a = build_objective(_cfg(), SIZE, "cpu")
    b = build_objective(_cfg(), SIZE + 5, "cpu")
    with pytest.raises(ValueError, match=r"bank rows 45 != \|D\| = 40"):
        a.load_state_dict(b.state_dict())
    with pytest.raises(ValueError, match="method"):
        a.load_state_dict({"method": "jigsaw"})


def _ragged_cfg(mode: str) -> Config:
    cfg = _cfg("npid", mode=mode)
    cfg.optim.batch_size = 8  # 4 per rank: rank 1's shorter batches are padded to 4
    return cfg


def _dist_worker(rank: int, world: int, folder: str, mode: str) -> None:
    torch.set_num_threads(1)  # forked child: stay out of the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(100 + rank)
        obj = build_objective(_ragged_cfg(mode), SIZE, "cpu")
        assert obj.bank is not None
        seen = []
        for step in range(2):
            b = 4 if rank == 0 else 3 - step  # ragged: rank 1 "skipped" images
            idx = torch.arange(b) + 10 * rank + step
            if rank == 1 and step == 1:
                idx[0] = 1  # also in rank 0's batch: rank 1's embedding must win
            z = F.normalize(torch.randn(b, D), dim=1)
            loss, _ = obj.loss({"z_img": z}, {"index": idx})
            assert torch.isfinite(loss)
            obj.after_step({"z_img": z}, {"index": idx})
            seen.append((idx, z))
        torch.save(seen, Path(folder, f"seen{rank}.pt"))
        torch.save(obj.bank.rows, Path(folder, f"rows{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["per-sample", "shared"])
def test_replicas_stay_identical_across_ranks(tmp_path: Path, mode: str) -> None:
    """Two gloo processes with different (and differently sized) batches end with the same bank,
    and it is the bank one process gets by applying both ranks' (index, embedding) in rank order:
    the padding that keeps the exchange a fixed size writes nothing of its own."""
    # fork, not spawn: a spawned child re-imports torch (seconds on this shared machine)
    mp.start_processes(_dist_worker, args=(2, str(tmp_path), mode), nprocs=2, join=True,
                       start_method="fork")
    rows = [torch.load(tmp_path / f"rows{r}.pt", weights_only=True) for r in range(2)]
    seen = [torch.load(tmp_path / f"seen{r}.pt", weights_only=True) for r in range(2)]
    ref = build_objective(_ragged_cfg(mode), SIZE, "cpu").bank
    assert ref is not None
    init = ref.rows.clone()
    for step in range(2):
        ref.update(torch.cat([seen[0][step][0], seen[1][step][0]]),
                   torch.cat([seen[0][step][1], seen[1][step][1]]),
                   _ragged_cfg(mode).objective.bank_momentum)
    assert torch.equal(rows[0], rows[1])
    assert torch.equal(rows[0], ref.rows) and not torch.equal(rows[0], init)
