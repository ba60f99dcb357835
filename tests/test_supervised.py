"""Supervised pre-training: it learns the labels, resumes bit for bit, refuses unlabelled data,
and its checkpoint loads wherever a trunk is read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import pirl
from pirl import config as C
from pirl.checkpoint import safe_load
from pirl.cli import main
from pirl.data.source import ImageSource
from pirl.evaluate.detection.schedule import rule_for_method
from pirl.methods import REGISTRY, fit_to_dataset, get_method
from pirl.methods.supervised import labelled_classes
from pirl.train import pretrain

PATTERNS = ("horizontal", "vertical", "checker", "blank")


def _pattern(kind: str, rng: np.random.Generator, side: int = 40) -> Image.Image:
    """A ``side`` px RGB image of stripes / a checkerboard / a flat field in two random colours
    at a random phase: the class is the pattern, which survives crops, flips and colour."""
    period = int(rng.integers(6, 10))
    yy, xx = np.mgrid[:side, :side] + int(rng.integers(0, period))
    mask = {"horizontal": (yy // (period // 2)) % 2, "vertical": (xx // (period // 2)) % 2,
            "checker": ((yy // (period // 2)) + (xx // (period // 2))) % 2,
            "blank": np.zeros_like(yy)}[kind].astype(bool)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    return Image.fromarray(np.where(mask[..., None], a, b).astype(np.uint8))


@pytest.fixture(scope="module")
def patterns(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder of 64 images, 16 per class of :data:`PATTERNS`."""
    root = tmp_path_factory.mktemp("patterns") / "data"
    rng = np.random.default_rng(0)
    for kind in PATTERNS:
        (root / kind).mkdir(parents=True)
        for i in range(16):
            _pattern(kind, rng).save(root / kind / f"{i:02d}.png")
    return root


def tiny_cfg(epochs: int, **overrides: Any) -> C.Config:
    """ResNet-18 through the ImageNet stem on 32-px views, batch 16: 4 steps per epoch on the
    64 patterns, a fraction of a second per step on a CPU."""
    cfg = C.from_preset("cifar10-r18")
    for key, value in {"method": "supervised", "small_stem": False, "epochs": epochs,
                       "batch_size": 16, "warmup_epochs": 0, "workers": 0, "quiet": True,
                       "log_every": 1, "knn_every": 0, **overrides}.items():
        C.set_value(cfg, key, value)
    return cfg


def train_log(run: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


def test_registry_entry() -> None:
    method = get_method("supervised")
    assert method.needs_labels and not method.uses_bank and not method.has_f_and_g
    assert method.transfer_lr_rule == rule_for_method("supervised") == "supervised"
    assert {n for n, m in REGISTRY.items() if m.needs_labels} == {"supervised"}
    assert "supervised" in C.METHODS


def test_learns_the_labels(patterns: Path, tmp_path: Path) -> None:
    """The loss falls and the training accuracy ends far above chance (25 %) in 100 steps.

    The colour jitter is off and crops keep half the image: the stripes must stay visible
    through the ImageNet stem's stride 4 at 32 px for so short a run (over seeds 0-2 the last 8
    steps then averaged 76-89 % accuracy and a loss of 0.3-0.6 from about 2)."""
    torch.set_num_threads(1)
    run = tmp_path / "run"
    cfg = tiny_cfg(epochs=25, base_lr=0.25, jitter_prob=0.0, grayscale_prob=0.0,
                   image_scale_min=0.5)
    result = pretrain(cfg, str(patterns), run)
    log = train_log(run)
    assert result.steps == len(log) == 100
    assert {"loss", "loss_ce", "acc", "lr"} <= set(log[0])
    first, last = log[:8], log[-8:]
    loss0, loss1 = (float(np.mean([r["loss"] for r in part])) for part in (first, last))
    acc1 = float(np.mean([r["acc"] for r in last]))
    assert loss1 < loss0 - 0.8 and acc1 > 0.6, (loss0, loss1, acc1)
    # The class count came from the data and is recorded with the run.
    saved = safe_load(run / "checkpoint.pt")
    assert saved["config"]["objective"]["num_classes"] == 4
    assert tuple(saved["model"]["classifier.weight"].shape) == (4, 512)


def test_resume_is_bit_identical(patterns: Path, tmp_path: Path) -> None:
    """Stopped after 3 steps and resumed: weights, optimiser, position and log equal those of an
    uninterrupted run bit for bit (CPU, deterministic algorithms)."""
    torch.set_num_threads(1)
    reference, run = tmp_path / "reference", tmp_path / "run"
    pretrain(tiny_cfg(epochs=2, deterministic=True), str(patterns), reference)
    first = pretrain(tiny_cfg(epochs=2, deterministic=True), str(patterns), run,
                     stop_after_steps=3)
    assert first.stopped and first.steps == 3
    second = pretrain(tiny_cfg(epochs=2, deterministic=True), str(patterns), run)
    assert second.resumed_from_step == 3 and second.steps == 8
    a, b = safe_load(reference / "checkpoint.pt"), safe_load(run / "checkpoint.pt")
    for key in ("model", "optimizer"):
        flat_a, flat_b = _flatten(a[key]), _flatten(b[key])
        assert flat_a.keys() == flat_b.keys()
        for name, value in flat_a.items():
            other = flat_b[name]
            same = torch.equal(value, other) if torch.is_tensor(value) else value == other
            assert same, f"{key}.{name}"
    assert a["position"] == b["position"]
    assert [(r["step"], r["loss"], r["acc"]) for r in _effective(run)] == \
        [(r["step"], r["loss"], r["acc"]) for r in train_log(reference)]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        return {k: v for key, sub in d.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    if isinstance(d, (list, tuple)):
        return {k: v for i, sub in enumerate(d) for k, v in _flatten(sub, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): d}


def _effective(run: Path) -> list[dict[str, Any]]:
    from pirl.logs import LOG_NAME, read_log

    return [r for r in read_log(run / LOG_NAME) if r["kind"] == "train"]


def test_unlabelled_data_stops_with_one_line(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A folder of loose images (no class folders) has no labels: exit 2 before any step, one
    line naming the folder."""
    loose = tmp_path / "loose"
    loose.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        _pattern("checker", rng).save(loose / f"{i}.png")
    out = tmp_path / "run"
    code = main(["pretrain", "--data", str(loose), "--out", str(out), "--method", "supervised",
                 "--preset", "cifar10-r18", "--batch-size", "4", "--workers", "0", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and str(loose) in err[0] and "labelled" in err[0], err
    assert not (out / "checkpoint.pt").exists()


class _Targets(ImageSource):
    def __init__(self, classes: list[str], targets: list[int]) -> None:
        self.classes, self.targets = classes, targets


@pytest.mark.parametrize(("classes", "targets", "message"), [
    ([], [-1, -1, -1], "has none"),
    (["a", "b"], [-1, -1], "has none"),
    (["a", "b"], [0, -1, 1], "1 of 3 images have no label"),
    (["a", "b"], [0, 2], "outside the 2 classes"),
])
def test_label_checks(classes: list[str], targets: list[int], message: str) -> None:
    with pytest.raises(C.ConfigError, match=message):
        labelled_classes(_Targets(classes, targets), "DATA")


def test_num_classes_from_data_unless_set() -> None:
    source = _Targets(["a", "b", "c"], [0, 1, 2, 1])
    cfg = tiny_cfg(epochs=1)
    notes = fit_to_dataset(cfg, 4, source, "DATA")
    assert notes == ["objective.num_classes=3: the classes of DATA"]
    assert cfg.objective.num_classes == 3
    assert fit_to_dataset(cfg, 4, source, "DATA") == []  # already fitted: nothing to say
    fit_to_dataset(cfg, 2, _Targets(["a", "b"], [0, 1]), "OTHER")  # a value it set is not a wish
    assert cfg.objective.num_classes == 2
    C.set_value(cfg, "num_classes", 5)
    with pytest.raises(C.ConfigError, match="num_classes=5: DATA has 3 classes"):
        fit_to_dataset(cfg, 4, source, "DATA")
    C.set_value(cfg, "num_classes", 3)
    assert fit_to_dataset(cfg, 4, source, "DATA") == []  # an explicit value that agrees
    other = tiny_cfg(epochs=1, method="pirl", num_negatives=1)
    fit_to_dataset(other, 2, _Targets([], [-1, -1]), "DATA")  # unlabelled is fine for PIRL
    assert other.objective.num_classes == 0
    with pytest.raises(C.ConfigError, match="num_classes=0"):
        get_method("supervised").build_model(tiny_cfg(epochs=1))


def test_checkpoint_loads_as_a_trunk_and_into_knn(patterns: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    run = tmp_path / "run"
    pretrain(tiny_cfg(epochs=1), str(patterns), run)
    trunk = pirl.load_backbone(run / "checkpoint.pt")
    assert tuple(trunk(torch.randn(2, 3, 32, 32)).shape) == (2, 512)
    saved = safe_load(run / "checkpoint.pt")["model"]
    for name, value in trunk.state_dict().items():
        assert torch.equal(value, saved[f"trunk.{name}"]), name
    code = main(["eval", "knn", "--checkpoint", str(run / "checkpoint.pt"), "--train-data",
                 str(patterns), "--val-data", str(patterns), "--out", str(tmp_path / "eval"),
                 "--k", "5", "--workers", "0", "--no-cache", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert "checkpoint.pt" in capsys.readouterr().out
