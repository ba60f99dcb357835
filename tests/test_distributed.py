"""Data-parallel training on 2 CPU processes (gloo), launched with torchrun as a user would.

Each launch runs the real :func:`pirl.train.pretrain` in a small worker script (``WORKER`` below,
written to a temporary folder) that can patch the run for the test: drop BatchNorm, record a hash
of the memory bank after every step, make rank 1 die, or make rank 1's bank drift.

(a) one step... here two steps, on 2 ranks x B/2 give the parameters, bank and negative-sampling
    generator of 1 rank x B on the same samples.  BatchNorm is replaced by Identity in that run
    (per-rank batch statistics would legitimately differ); what remains differs only by float
    rounding of the gradient all-reduce and of convolutions at another batch size:
    parameters and bank rows agree to ``atol=2e-5``; the generator state is bit-identical.
(b) with BatchNorm, the bank replicas are bit-identical (same hash) after every step.
(c) a rank that dies (``os._exit``) makes torchrun exit non-zero; rerunning resumes from the last
    checkpoint and finishes, again with identical replicas.
(d) a bank that drifts on one rank stops both ranks at the next checkpoint with
    ReplicaDriftError, and no checkpoint is written for that step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from pirl.distributed import all_gather_ragged, any_rank, check_replicas, shard
from pirl.memory_bank import MemoryBank

WORKER = textwrap.dedent('''
    """Test worker: python worker.py SPEC_JSON (directly, or under torchrun)."""
    import hashlib, json, os, sys

    import torch
    from torch import nn

    import pirl.train
    from pirl import config as C
    from pirl.distributed import ReplicaDriftError
    from pirl.console import setup_logging
    from pirl.methods.pirl import PIRLObjective

    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    out = spec["out"]
    setup_logging(quiet=True, rank=rank)

    def no_batchnorm(module):
        for name, child in module.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, name, nn.Identity())
            else:
                no_batchnorm(child)
        return module

    if spec.get("no_bn"):
        build = pirl.train.build_model
        pirl.train.build_model = lambda *a, **k: no_batchnorm(build(*a, **k))

    calls = {"n": 0}
    after_step = PIRLObjective.after_step

    def patched_after_step(self, out_, batch):
        calls["n"] += 1
        if spec.get("die_at") == calls["n"] and rank == 1:
            os._exit(3)  # no cleanup, no exception: as if the process were killed
        after_step(self, out_, batch)
        if spec.get("drift_at") == calls["n"] and rank == 1:
            self.bank.rows[0].mul_(-1.0)
        digest = hashlib.blake2b(self.bank.rows.numpy().tobytes(), digest_size=16).hexdigest()
        with open(os.path.join(out, f"bank-rank{rank}.jsonl"), "a") as fh:
            fh.write(json.dumps(digest) + "\\n")

    PIRLObjective.after_step = patched_after_step

    cfg = C.from_preset("cifar10-r18")
    for key, value in spec["config"].items():
        C.set_value(cfg, key, value)
    try:
        pirl.train.pretrain(cfg, spec["data"], out, val_data=spec.get("val"),
                            stop_after_steps=spec.get("steps"))
        if spec.get("then_drift"):
            # Same processes, same process group: resume for one step in which rank 1's bank
            # is corrupted after its update.
            calls["n"], spec["drift_at"] = 0, 1
            pirl.train.pretrain(cfg, spec["data"], out, stop_after_steps=1)
    except ReplicaDriftError as e:
        with open(os.path.join(out, f"drift-rank{rank}.txt"), "w") as fh:
            fh.write(str(e))
        sys.exit(1)
''')

BASE = {
    "optim.batch_size": 16, "optim.epochs": 1, "optim.warmup_epochs": 0, "optim.base_lr": 0.5,
    "objective.num_negatives": 64, "model.small_stem": False,  # 8x8 maps after the stem: fast
    "train.workers": 0, "train.quiet": True, "train.log_every": 1, "train.knn_k": 10,
}


def launch(tmp: Path, out: Path, data: Path, nproc: int, timeout: float = 120,
           **spec: Any) -> subprocess.CompletedProcess[str]:
    """Run the worker on ``nproc`` processes (torchrun when > 1) and return the finished job."""
    script = tmp / "worker.py"
    script.write_text(WORKER)
    out.mkdir(parents=True, exist_ok=True)
    arg = json.dumps({"out": str(out), "data": str(data),
                      "config": {**BASE, **spec.pop("config", {})}, **spec})
    cmd = [sys.executable, str(script), arg]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


@pytest.fixture(scope="module")
def hundred_images(tiny_imagefolder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 real images per class (100): an epoch of 6 steps at batch 16; ``<it>.parent / "val"``
    holds 10 other images per class (labelled data for the kNN monitor)."""
    root = tmp_path_factory.mktemp("imagenette-100")
    for cls in sorted(p for p in tiny_imagefolder.iterdir() if p.is_dir()):
        for split, files in (("images", sorted(cls.iterdir())[:10]),
                             ("val", sorted(cls.iterdir())[10:20])):
            (root / split / cls.name).mkdir(parents=True)
            for img in files:
                shutil.copyfile(img, root / split / cls.name / img.name)
    return root / "images"


def bank_hashes(out: Path, rank: int) -> list[str]:
    return [json.loads(line) for line in (out / f"bank-rank{rank}.jsonl").read_text().split()]


def load(out: Path) -> dict[str, Any]:
    return torch.load(out / "checkpoint.pt", weights_only=True)


def test_helpers_without_a_process_group() -> None:
    """Outside torchrun every helper is the single-process identity."""
    t = torch.arange(6).view(3, 2)
    gathered, sizes = all_gather_ragged(t)
    assert gathered is t and sizes == [3]
    assert any_rank([True, False]) == [True, False]
    assert list(shard(7)) == list(range(7))
    check_replicas({"bank": 1.0}, "no group")  # nothing to compare with: no error


@pytest.fixture(scope="module")
def equivalence_runs(hundred_images: Path, tmp_path_factory: pytest.TempPathFactory
                     ) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    """One step of 1 process x 16 and of 2 processes x 8, without BatchNorm; then the 2-process
    job resumes for one more step in which rank 1's bank drifts (test (d))."""
    tmp = tmp_path_factory.mktemp("ddp-equivalence")
    one, two = tmp / "one", tmp / "two"
    r1 = launch(tmp, one, hundred_images, 1, no_bn=True, steps=1)
    assert r1.returncode == 0, r1.stderr[-3000:]
    drift = launch(tmp, two, hundred_images, 2, no_bn=True, steps=1, then_drift=True)
    return one, two, drift


def test_a_two_ranks_half_batch_equal_one_rank_full_batch(equivalence_runs: Any) -> None:
    one, two, _ = equivalence_runs
    a, b = load(one), load(two)
    assert a["position"]["step"] == 1 and b["position"]["step"] == 1
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, atol=1e-6, rtol=0, msg=key)
    # SGD momentum buffers after one step = the gradients: DDP's average over 2 x 8 samples
    # equals the single process's mean over 16.  They are far from zero (not a vacuous check).
    grads_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    grads_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert len(grads_a) == len(grads_b) == len(a["model"])
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert float(ga.norm()) > 0.1
        assert float((gb - ga).norm()) < 1e-5 * float(ga.norm())
    bank_a, bank_b = a["objective"]["bank"]["rows"], b["objective"]["bank"]["rows"]
    torch.testing.assert_close(bank_b, bank_a, atol=1e-6, rtol=0)
    init = MemoryBank(bank_a.shape[0], bank_a.shape[1], seed=0).rows
    changed = (bank_a - init).abs().amax(dim=1) > 1e-3
    assert int(changed.sum()) == 16  # the 16 images of the step were written into the bank
    # Every rank draws the negatives of the global batch: the generators are in step.
    assert torch.equal(a["objective"]["generator"], b["objective"]["generator"])


def test_d_drifting_bank_stops_every_rank_before_the_checkpoint(equivalence_runs: Any) -> None:
    _, two, drift = equivalence_runs
    assert drift.returncode != 0
    for rank in (0, 1):
        msg = (two / f"drift-rank{rank}.txt").read_text()
        assert "checkpoint at step 2" in msg and "memory bank" in msg, msg
        assert "rank 0=" in msg and "rank 1=" in msg
    assert load(two)["position"]["step"] == 1  # the inconsistent step 2 was never saved


@pytest.fixture(scope="module")
def crash_and_resume(hundred_images: Path, tmp_path_factory: pytest.TempPathFactory
                     ) -> dict[str, Any]:
    """With BatchNorm, checkpoints every 2 steps: rank 1 dies in its 3rd step (after the step-2
    checkpoint); then the same command is run again and finishes the epoch (6 steps)."""
    tmp = tmp_path_factory.mktemp("ddp-crash")
    out = tmp / "run"
    cfg = {"train.checkpoint_every": 2}
    val = str(hundred_images.parent / "val")
    dead = launch(tmp, out, hundred_images, 2, timeout=150, config=cfg, die_at=3, val=val)
    result: dict[str, Any] = {"out": out, "dead": dead, "ckpt_after_crash": load(out),
                              "trunk_after_crash": (out / "trunk.pt").exists(),
                              "before": [bank_hashes(out, r) for r in (0, 1)]}
    for r in (0, 1):
        (out / f"bank-rank{r}.jsonl").unlink()
    result["again"] = launch(tmp, out, hundred_images, 2, timeout=150, config=cfg, val=val)
    result["images"] = hundred_images
    result["after"] = [bank_hashes(out, r) for r in (0, 1)]
    return result


def test_b_bank_replicas_identical_after_every_step(crash_and_resume: dict[str, Any]) -> None:
    (b0, b1), (a0, a1) = crash_and_resume["before"], crash_and_resume["after"]
    assert len(b1) == 2 and b0[:2] == b1  # steps 1-2 (rank 1 died before updating in step 3)
    assert len(a0) == 4 and a0 == a1  # steps 3-6 after the resume
    assert len(set(b1 + a1)) == 6  # and the bank did change at every step


def test_c_dead_rank_fails_the_job_and_rerun_resumes(crash_and_resume: dict[str, Any]) -> None:
    out, dead, again = crash_and_resume["out"], crash_and_resume["dead"], crash_and_resume["again"]
    assert dead.returncode != 0
    assert crash_and_resume["ckpt_after_crash"]["position"]["step"] == 2
    assert not crash_and_resume["trunk_after_crash"]
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr and "step 2" in again.stderr
    assert "global batch 16 = 2 x 8 per process" in again.stderr
    final = load(out)
    assert final["position"]["step"] == 6 and (out / "trunk.pt").exists()
    rows = final["objective"]["bank"]["rows"]
    digest = hashlib.blake2b(rows.numpy().tobytes(), digest_size=16).hexdigest()
    assert digest == crash_and_resume["after"][0][-1]  # rank 0 saved the bank every rank holds
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 7))  # every step logged once, none lost on the crash


def test_knn_monitor_extracts_shards_and_matches_one_process(crash_and_resume: dict[str, Any]
                                                             ) -> None:
    """The end-of-epoch kNN monitor ran on both ranks, each extracting half of the images (with
    rank 0's BatchNorm statistics); one process on the saved trunk gets the same accuracy."""
    from pirl import config as C
    from pirl.data import open_source
    from pirl.evaluate.features import EvalSettings
    from pirl.evaluate.knn import run_knn
    from pirl.export import load_backbone

    out, images = crash_and_resume["out"], crash_and_resume["images"]
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert len(evals) == 1
    trunk = load_backbone(str(out / "checkpoint.pt"))
    settings = EvalSettings(batch_size=64, workers=0, quiet=True, cache_dir=None)
    ref = run_knn(trunk, open_source(str(images)), open_source(str(images.parent / "val")),
                  C.from_preset("cifar10-r18").views, settings, k=10)
    assert evals[0]["knn_top1"] == pytest.approx(float(ref["top1"]))
    assert evals[0]["knn_top5"] == pytest.approx(float(ref["top5"]))
