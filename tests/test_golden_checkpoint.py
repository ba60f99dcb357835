"""Golden values: five demo steps give the run the code gave before pirl/methods/ existed.

The expected numbers were recorded at commit 54442ac (before the methods were split into
pirl/methods/), with exactly the run below: ``from_preset("demo")``, one epoch, ``train.workers
= 0``, ``views.colour_backend = "torch"``, ``train.log_every = 1``, one torch thread, data
``synthetic``, ``stop_after_steps=5``.  (At that commit and after the move, every tensor of the
four methods' checkpoints is bit-identical; this test keeps two methods to stay fast.)

Each fingerprint has a tolerance between two measurements on the development machine: the
noise, the same run with two threads instead of one (float rounding differs the way it differs
between CPUs), and the signal, a run whose views draw the jigsaw cut before the image crop (and,
for the Jigsaw baseline, the permutation before the patches):

=====================  =========  ==============  ======
fingerprint            noise      signal          rtol
=====================  =========  ==============  ======
loss of steps 1-3      <= 5e-7    >= 6e-3 step 1  1e-4
trunk weights, sum     2e-6       7e-5 .. 1.2e-4  2e-5
loss of step 5         <= 8e-5    5e-3 .. 4e-2    1e-3
trunk BN running_mean  3e-4       3e-2 .. 5e-2    1e-2
memory bank checksum   1.2e-3     3e-2            1e-2
=====================  =========  ==============  ======

Rounding grows with every step (five steps take a 1e-7 difference to 1e-3 in the bank), which is
why the early losses carry the tight check.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import pirl
from pirl.checkpoint import LATEST, safe_load
from pirl.config import from_preset
from pirl.logs import LOG_NAME

GOLDEN: dict[str, dict[str, Any]] = {
    "pirl": {"losses": [8.591504096984863, 9.11904239654541, 9.253863334655762,
                        9.369728088378906, 9.844781875610352],
             "trunk_weights": 4749.910993115609, "trunk_running_mean": 4.880817752280564,
             "bank": -148.1949430605495},
    "jigsaw": {"losses": [6.913623809814453, 6.9913105964660645, 6.959156513214111,
                          6.972606658935547, 6.910210609436035],
               "trunk_weights": 4750.731996618278, "trunk_running_mean": 6.364007767797375},
}
RTOL = {"trunk_weights": 2e-5, "trunk_running_mean": 1e-2, "bank": 1e-2}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The values were recorded with one thread; fewer rounding differences to tolerate."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(method: str, out: Path) -> Any:
    cfg = from_preset("demo")
    cfg.objective.method = method
    cfg.optim.epochs = 1
    cfg.train.workers = 0
    cfg.train.quiet = True
    cfg.train.log_every = 1
    cfg.views.colour_backend = "torch"  # always installed; numba rounds differently
    return pirl.pretrain(cfg=cfg, data="synthetic", out=out, stop_after_steps=5)


def _fingerprints(run_dir: Path) -> dict[str, Any]:
    ckpt = safe_load(run_dir / LATEST)
    trunk = {k: v.double() for k, v in ckpt["model"].items()
             if k.startswith("trunk.") and v.is_floating_point()}
    records = [json.loads(line) for line in (run_dir / LOG_NAME).read_text().splitlines()]
    fp = {"losses": [r["loss"] for r in records if r.get("kind") == "train"],
          "trunk_weights": sum(float(v.sum()) for k, v in trunk.items() if "running" not in k),
          "trunk_running_mean": sum(float(v.sum()) for k, v in trunk.items()
                                    if k.endswith("running_mean"))}
    bank = ckpt["objective"].get("bank")
    if bank is not None:  # the memory bank's position-sensitive checksum (MemoryBank.checksum)
        s = bank["rows"].double().sum(dim=1)
        w = torch.arange(1, s.shape[0] + 1, dtype=torch.float64) / s.shape[0]
        fp["bank"] = float(s.sum() + (s * w).sum())
    return fp


@pytest.mark.parametrize("method", sorted(GOLDEN))
def test_five_demo_steps_match_the_values_before_the_move(method: str, tmp_path: Path) -> None:
    assert _run(method, tmp_path).steps == 5
    got, want = _fingerprints(tmp_path), GOLDEN[method]
    assert set(got) == set(want)
    assert got["losses"][:3] == pytest.approx(want["losses"][:3], rel=1e-4)
    assert got["losses"][4] == pytest.approx(want["losses"][4], rel=1e-3)
    for key, rtol in RTOL.items():
        if key in want:
            assert got[key] == pytest.approx(want[key], rel=rtol), key


def test_a_checkpoint_with_the_old_scaler_entry_still_resumes(tmp_path: Path) -> None:
    """Checkpoints written before the move hold ``"scaler": {}``; resuming ignores it."""
    _run("npid", tmp_path)
    ckpt = safe_load(tmp_path / LATEST)
    assert "scaler" not in ckpt
    torch.save({**ckpt, "scaler": {}}, tmp_path / LATEST)
    assert _run("npid", tmp_path).steps == 10
