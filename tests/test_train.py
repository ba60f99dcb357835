"""End-to-end pretraining on real images: the loss falls, runs resume, trunk.pt loads, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from pirl import config as C
from pirl.cli import main
from pirl.kernels.colour import resolve_colour_backend
from pirl.train import pretrain


def tiny_cfg(method: str = "pirl", epochs: int = 2, **overrides: object) -> C.Config:
    """ResNet-18 with the small stem on 32-px views: seconds per epoch on 2 CPU cores."""
    cfg = C.from_preset("cifar10-r18")
    cfg.objective.method = method
    cfg.optim.epochs = epochs
    cfg.optim.batch_size = 32
    cfg.optim.warmup_epochs = 0
    cfg.objective.num_negatives = 64
    cfg.train.workers = 0
    cfg.train.quiet = True
    cfg.train.log_every = 1
    for key, value in overrides.items():
        C.set_value(cfg, key, value)
    return cfg


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_pirl_loss_falls_on_real_images(tiny_imagefolder: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(epochs=6, base_lr=0.06)
    pretrain(cfg, str(tiny_imagefolder), tmp_path / "run")
    train = [r for r in read_log(tmp_path / "run") if r["kind"] == "train"]
    steps_per_epoch = len(train) // 6
    first = sum(r["loss"] for r in train[:steps_per_epoch]) / steps_per_epoch
    last = sum(r["loss"] for r in train[-steps_per_epoch:]) / steps_per_epoch
    assert {"loss", "loss_t", "loss_img", "lr", "samples_per_s"} <= set(train[0])
    assert last < first - 0.5, (first, last)
    # The log names the colour backend that drew the pixels (the two agree to rounding only).
    events = [r for r in read_log(tmp_path / "run") if r["kind"] == "event"]
    assert events[0]["colour_backend"] == resolve_colour_backend(cfg.views.colour_backend)


def test_resume_and_trunk_loads_into_torchvision(tiny_imagefolder: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    cfg = tiny_cfg(epochs=2)
    first = pretrain(cfg, str(tiny_imagefolder), run, stop_after_steps=3)
    assert first.steps == 3 and (run / "checkpoint.pt").exists()
    assert not (run / "trunk.pt").exists()
    with caplog.at_level("INFO", logger="pirl"):
        second = pretrain(tiny_cfg(epochs=2), str(tiny_imagefolder), run)
    assert second.resumed_from_step == 3
    assert any("resuming from" in m for m in caplog.messages)
    steps = [r["step"] for r in read_log(run) if r["kind"] == "train"]
    assert steps == list(range(1, len(steps) + 1))  # no step lost or repeated
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["position"]["epoch"] == 2
    assert (run / "config.yaml").exists()
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the small stem
    missing, unexpected = net.load_state_dict(torch.load(run / "trunk.pt", weights_only=True),
                                              strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected


@pytest.mark.parametrize("method", ["npid", "jigsaw", "rotation"])
def test_baselines_train_one_epoch(method: str, tiny_imagefolder: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(method=method, epochs=1, num_permutations=10)
    result = pretrain(cfg, str(tiny_imagefolder), tmp_path / method)
    assert result.steps == 200 // 32
    assert result.trunk_path.exists()


def test_resume_refuses_another_architecture(tiny_imagefolder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    pretrain(tiny_cfg(epochs=1), str(tiny_imagefolder), run, stop_after_steps=1)
    with pytest.raises(C.ConfigError, match="model.arch='resnet18' but this run asks for"):
        pretrain(tiny_cfg(epochs=1, arch="resnet34"), str(tiny_imagefolder), run)


def test_non_finite_loss_stops_and_names_the_step(tiny_imagefolder: Path, tmp_path: Path) -> None:
    from pirl.train import NonFiniteLossError

    cfg = tiny_cfg(epochs=1, base_lr=1e30)
    with pytest.raises(NonFiniteLossError, match=r"loss at or before step \d+ \(epoch 1\)"):
        pretrain(cfg, str(tiny_imagefolder), tmp_path / "run")


def test_cli_errors_exit_2_before_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["pretrain", "--data", "synthetic", "--out", str(tmp_path), "bse_lr=1"]) == 2
    assert "did you mean 'base_lr'" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["pretrain", "--data", "synthetic", "--preset", "demo",
                 "--out", str(tmp_path), "num_negatives=5000"]) == 2
    assert "num_negatives=5000: must be below the number of images" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_knn_monitor_does_not_change_the_run(tiny_imagefolder: Path, tmp_path: Path) -> None:
    """A run with --val-data trains exactly as one without (pirl demo logs a kNN curve and its
    numbers must not depend on it): the monitor's DataLoaders draw from torch's global RNG,
    which the training must not depend on (views, order and negatives have their own seeds)."""
    cfg = tiny_cfg(epochs=2, knn_every=1, knn_k=5)
    plain = pretrain(cfg, str(tiny_imagefolder), tmp_path / "plain")
    watched = pretrain(cfg, str(tiny_imagefolder), tmp_path / "watched",
                       val_data=str(tiny_imagefolder))
    assert plain.steps == watched.steps
    knn = [r for r in read_log(tmp_path / "watched") if "knn_top1" in r]
    assert len(knn) == 2  # the monitor ran after each epoch
    a = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "watched" / "checkpoint.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_progress_in_a_file_is_plain_lines(tiny_imagefolder: Path, tmp_path: Path) -> None:
    """`pirl pretrain > file 2>&1` (a batch job's log): no carriage-return frames of progress
    bars, but one readable line per logging step and per kNN feature pass."""
    import os
    import re
    import subprocess
    import sys

    out_file = tmp_path / "out.txt"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    with open(out_file, "w") as fh:
        rc = subprocess.run(
            [sys.executable, "-m", "pirl", "pretrain", "--data", str(tiny_imagefolder),
             "--val-data", str(tiny_imagefolder), "--out", str(tmp_path / "run"),
             "--preset", "cifar10-r18", "--epochs", "2", "--batch-size", "32", "--workers", "0",
             "model.small_stem=false", "num_negatives=32", "warmup_epochs=0", "log_every=2",
             "knn_k=5"], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=repo,
            timeout=600).returncode
    text = out_file.read_text()
    assert rc == 0, text[-3000:]
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) < 40, text  # 200 images, batch 32: 6 steps per epoch, 3 logging steps
    steps = [line for line in lines if re.search(r"epoch \d/2  step \d/6  loss \d+\.\d{3}  "
                                                 r"samples/s \d+$", line)]
    assert [re.search(r"epoch \d/2  step \d/6", line).group(0) for line in steps] == [
        f"epoch {e}/2  step {s}/6" for e in (1, 2) for s in (2, 4, 6)]
    assert sum("train res5  batch 1/1" in line for line in lines) == 2  # kNN after each epoch
