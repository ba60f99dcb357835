"""The VOC07 SVM protocol: multi-label targets from the VOC reader (+1 / 0 = difficult only /
-1), VOC's average precision, difficult images left out, low-shot draws, and the whole
``pirl eval svm --data VOC`` path on the shared BCCD set (3 classes)."""

from __future__ import annotations

import json
import shutil
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from pirl.cli import main
from pirl.data.voc_labels import open_voc_images
from pirl.evaluate.svm import (
    BENCHMARK_COSTS,
    fit_svms,
    low_shot_matrix,
    mean_average_precision,
    voc_ap,
)

DET_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "detection"
if not (DET_DIR / "bccd.tar").is_file():
    DET_DIR = Path("/work/shared/data/detection")
BCCD, RACCOON = DET_DIR / "bccd.tar", DET_DIR / "raccoon.tar"
needs_data = pytest.mark.skipif(not BCCD.is_file(), reason=f"shared VOC sets missing in {DET_DIR}")


# ----------------------------------------------------------------------------- AP by hand


def test_voc_ap_uses_the_precision_envelope() -> None:
    # ranked: neg, pos, pos -> precision 0, 1/2, 2/3 at recall 0, 1/2, 1.  The envelope lifts
    # the 1/2 to 2/3: AP = 1/2 * 2/3 + 1/2 * 2/3 = 2/3 (the step sum without it: 7/12).
    assert voc_ap(np.array([0.9, 0.5, 0.1]), np.array([False, True, True])) == pytest.approx(2 / 3)
    # ranked: pos, neg, pos, neg, pos -> precisions at the hits 1, 2/3, 3/5: AP = (1+2/3+3/5)/3
    assert voc_ap(np.array([5.0, 4, 3, 2, 1]), np.array([1, 0, 1, 0, 1], dtype=bool)) == \
        pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert voc_ap(np.array([0.3, 0.2]), np.array([True, True])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no positive"):
        voc_ap(np.array([0.3]), np.array([False]))


def _plant_voc(root: Path, n: int = 4) -> list[str]:
    """A VOC folder of the first n real BCCD test images with hand-written annotations:
    classes A, B; image 1 holds only a *difficult* A (and a B)."""
    objects = [[("A", 0)], [("A", 1), ("B", 0)], [("B", 0)], [("A", 0), ("B", 0)]]
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    ids = []
    with tarfile.open(BCCD) as tf:
        for k, name in enumerate(sorted(m.name for m in tf.getmembers()
                                        if m.name.endswith(".jpg"))[:n]):
            fh = tf.extractfile(name)
            assert fh is not None
            image_id = f"im{k}"
            (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(fh.read())
            objs = "".join(f"<object><name>{c}</name><difficult>{d}</difficult><bndbox>"
                           "<xmin>10</xmin><ymin>10</ymin><xmax>50</xmax><ymax>50</ymax>"
                           "</bndbox></object>" for c, d in objects[k])
            (root / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><size><width>320</width><height>240</height></size>{objs}"
                "</annotation>")
            ids.append(image_id)
    (root / "ImageSets/Main/test.txt").write_text("\n".join(ids) + "\n")
    (root / "labels.txt").write_text("A\nB\n")
    return ids


@needs_data
def test_voc_map_leaves_the_difficult_image_out(tmp_path: Path) -> None:
    _plant_voc(tmp_path / "voc")
    src = open_voc_images(str(tmp_path / "voc"), "test")
    assert src.classes == ["A", "B"] and src.targets == [-1] * 4
    # A: present, difficult only, absent, present; B: absent, present, present, present
    assert src.label_matrix.tolist() == [[1, -1], [0, 1], [-1, 1], [1, 1]]
    scores = torch.tensor([[0.2, 0.1], [0.9, 0.3], [0.5, 0.8], [0.4, 0.6]], dtype=torch.float64)
    m, aps = mean_average_precision(scores, src.label_matrix)
    # A without image 1: ranked 2 (neg, 0.5), 3 (pos, 0.4), 0 (pos, 0.2) -> precision 0, 1/2,
    # 2/3, envelope 2/3, 2/3 -> AP 2/3.  (Image 1 as a negative would give 1/2, as a positive
    # 5/6.)  B: its three positives outrank the negative -> AP 1.
    assert aps == pytest.approx([100 * 2 / 3, 100.0])
    assert m == pytest.approx((100 * 2 / 3 + 100) / 2)
    assert np.asarray(src.load(1)).shape == (240, 320, 3)  # the real image, sized as annotated


@needs_data
def test_bccd_label_matrix_matches_the_xml(tmp_path: Path) -> None:
    src = open_voc_images(str(BCCD), "test")
    # reference: every object name of each image, read straight from the archive
    with tarfile.open(BCCD) as tf:
        for i, rec in enumerate(src.voc.records):
            fh = tf.extractfile(f"bccd/Annotations/{rec.image_id}.xml")
            assert fh is not None
            top = ET.fromstring(fh.read())
            easy = {o.findtext("name") for o in top.iter("object")
                    if (o.findtext("difficult") or "0").strip() == "0"}
            hard = {o.findtext("name") for o in top.iter("object")} - easy
            want = [1 if c in easy else 0 if c in hard else -1 for c in src.classes]
            assert src.label_matrix[i].tolist() == want, rec.image_id


# ----------------------------------------------------------------------------- SVMs


def test_svm_training_ignores_zero_entries() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    y = np.where(x[:, 0].numpy() > 0, 1, -1).astype(np.int8)[:, None]
    planted = y.copy()
    planted[:6, 0] = 0  # left out: whatever their features, the SVM must not see them
    x_bad = x.clone()
    x_bad[:6] = -x_bad[:6] * 50  # would pull the boundary if used
    w0, b0, c0, _ = fit_svms(x_bad, planted, 1, costs=(0.1, 1.0), folds=3)
    w1, b1, c1, _ = fit_svms(x[6:], y[6:], 1, costs=(0.1, 1.0), folds=3)
    assert c0 == c1 and torch.allclose(w0, w1) and torch.allclose(b0, b1)
    assert min(BENCHMARK_COSTS) == pytest.approx(1e-7) and 0.5 ** 19 in BENCHMARK_COSTS
    with pytest.raises(ValueError, match="no negative"):
        fit_svms(x, np.ones((40, 1), dtype=np.int8), 1, costs=(1.0,))


def test_low_shot_draw_counts_and_seeding() -> None:
    rng = np.random.default_rng(0)
    y = rng.choice(np.array([1, 0, -1], dtype=np.int8), size=(200, 3), p=[0.3, 0.1, 0.6])
    for k in (1, 4, 96):
        a = low_shot_matrix(y, k, seed=0, sample=0)
        assert ((a == 0) | (a == y)).all()  # only original labels survive
        for c in range(3):
            assert (a[:, c] == 1).sum() == min(k, (y[:, c] == 1).sum())
            assert (a[:, c] == -1).sum() == min(2 * k, (y[:, c] == -1).sum())
    assert np.array_equal(low_shot_matrix(y, 4, 0, 1), low_shot_matrix(y, 4, 0, 1))
    assert not np.array_equal(low_shot_matrix(y, 4, 0, 0), low_shot_matrix(y, 4, 0, 1))


@needs_data
def test_cli_svm_on_bccd_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "bccd.tar"
    shutil.copy(BCCD, data)
    out = tmp_path / "ev"
    assert main(["eval", "svm", "--checkpoint", "random", "--arch", "resnet18",
                 "--data", str(data), "--image-size", "32", "--workers", "0", "--device", "cpu",
                 "--no-cache", "--quiet", "--costs", "0.01,1", "--folds", "2",
                 "--low-shot", "2,8", "--samples", "2", "--out", str(out)]) == 0
    r = json.loads((out / "svm.json").read_text())
    assert list(r["ap_per_class"]) == ["Platelets", "RBC", "WBC"]
    assert r["num_train"] == 292 and r["num_val"] == 72 and "top1" not in r
    assert r["mAP"] == pytest.approx(np.mean(list(r["ap_per_class"].values())))
    assert set(r["cost_per_class"].values()) <= {0.01, 1.0}
    assert set(r["low_shot"]) == {"2", "8"}
    for v in r["low_shot"].values():
        assert len(v["mAP"]) == 2 and v["mAP_mean"] == pytest.approx(np.mean(v["mAP"]))
    assert "| random | res5 |" in capsys.readouterr().out
    # a VOC set and ImageFolder splits at once is refused (exit 2)
    assert main(["eval", "svm", "--checkpoint", "random", "--arch", "resnet18", "--data",
                 str(data), "--train-data", "synthetic", "--out", str(out)]) == 2


@needs_data
def test_cli_svm_refuses_a_one_class_set(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # raccoon: every image holds a raccoon, so no negative exists; refused before features
    assert main(["eval", "svm", "--checkpoint", "random", "--arch", "resnet18", "--data",
                 str(RACCOON), "--no-cache", "--out", str(tmp_path)]) == 2
    assert "class 'raccoon' has no negative training image" in capsys.readouterr().err
