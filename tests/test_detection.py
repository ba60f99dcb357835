"""Detection transfer: the VOC reader, the metrics, the detector's wiring and the CLI.

Fast by design: the reader runs on the two shared sets (annotations only), the fine-tunes on a
few real raccoon images at 128 px for 2 iterations with few regions per image.
"""

from __future__ import annotations

import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from pirl.cli import build_parser
from pirl.config import Config, to_dict
from pirl.data.source import DatasetError
from pirl.data.voc import VOC_CLASSES, VOCSource, parse_data_paths
from pirl.evaluate.detection.metrics import detection_metrics
from pirl.evaluate.detection.model import build_detector, recalibrate_batchnorm
from pirl.evaluate.detection.schedule import resolve_schedule, rule_for_method
from pirl.methods import build_model
from pirl.presets import view_preset
from pirl.trunk import build_trunk

DET_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "detection"
if not (DET_DIR / "raccoon.tar").is_file():
    DET_DIR = Path("/work/shared/data/detection")
RACCOON, BCCD = DET_DIR / "raccoon.tar", DET_DIR / "bccd.tar"
needs_data = pytest.mark.skipif(not RACCOON.is_file() or not BCCD.is_file(),
                                reason=f"shared detection sets missing in {DET_DIR}")


# ----------------------------------------------------------------------------- helpers


def _xml(name: str, w: int, h: int, objects: list[tuple[str, tuple, int]]) -> str:
    objs = "".join(
        f"<object><name>{c}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for c, b, d in objects)
    return (f"<annotation><filename>{name}.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size>{objs}</annotation>")


def _raccoon_images(n: int) -> list[tuple[str, bytes, str]]:
    """(id, jpeg bytes, xml text) of the first n raccoon trainval images, read from the tar."""
    src = VOCSource(str(RACCOON), "trainval")
    out = []
    with tarfile.open(RACCOON) as tf:
        for r in src.records[:n]:
            jpg = tf.extractfile(f"raccoon/JPEGImages/{r.image_id}.jpg")
            xml = tf.extractfile(f"raccoon/Annotations/{r.image_id}.xml")
            assert jpg is not None and xml is not None
            out.append((r.image_id, jpg.read(), xml.read().decode()))
    return out


def _make_voc(root: Path, items: list[tuple[str, bytes, str]], splits: dict[str, list[str]],
              labels: list[str] | None = None) -> Path:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, jpg, xml in items:
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpg)
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    for split, ids in splits.items():
        (root / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    if labels is not None:
        (root / "labels.txt").write_text("\n".join(labels) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_raccoon(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VOC folder of 6 real raccoon images: train = 4, test = 2."""
    if not RACCOON.is_file():
        pytest.skip("raccoon.tar missing")
    items = _raccoon_images(6)
    ids = [i for i, _, _ in items]
    return _make_voc(tmp_path_factory.mktemp("voc") / "raccoon", items,
                     {"trainval": ids[:4], "test": ids[4:]}, ["raccoon"])


FAST = ["--min-size", "128", "--roi-batch", "16", "--test-proposals", "10", "--workers", "0",
        "--quiet", "--batch-size", "2"]


def _cli(argv: list[str]) -> int:
    args = build_parser().parse_args(["eval", "detection", *argv])
    return int(args.func(args))


# ----------------------------------------------------------------------------- reader


@needs_data
def test_reader_counts_match_the_shared_readme() -> None:
    expected = {("raccoon", "train"): (128, 139), ("raccoon", "val"): (32, 34),
                ("raccoon", "test"): (40, 44), ("raccoon", "trainval"): (160, 173),
                ("bccd", "train"): (205, 2804), ("bccd", "val"): (87, 1137),
                ("bccd", "test"): (72, 945), ("bccd", "trainval"): (292, 3941)}
    for (name, split), (images, boxes) in expected.items():
        src = VOCSource(str(DET_DIR / f"{name}.tar"), split)
        assert (len(src), src.num_boxes()) == (images, boxes), (name, split)
        assert src.skipped_images == src.skipped_boxes == 0
    test = VOCSource(str(BCCD), "test")
    assert test.classes == ["Platelets", "RBC", "WBC"]  # labels.txt order
    counts = np.bincount(np.concatenate([r.labels for r in test.records]), minlength=4)
    assert dict(zip(test.classes, counts[1:].tolist(), strict=True)) == {
        "RBC": 805, "WBC": 71, "Platelets": 69}
    image, target = pickle.loads(pickle.dumps(test))[0]  # picklable, handle reopened
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["difficult"].dtype == torch.bool
    h, w = image.shape[1:]
    assert (target["boxes"][:, 2] <= w).all() and (target["boxes"][:, 3] <= h).all()
    assert (target["boxes"][:, :2] >= 0).all() and (target["labels"] >= 1).all()


@needs_data
def test_folder_and_nested_tar_read_the_same(tmp_path: Path) -> None:
    with tarfile.open(RACCOON) as tf:
        tf.extractall(tmp_path / "VOCdevkit", filter="data")
    folder = VOCSource(str(tmp_path / "VOCdevkit"), "test")  # root found one level down
    tar = VOCSource(str(RACCOON), "test")
    assert [r.image_id for r in folder.records] == [r.image_id for r in tar.records]
    assert torch.equal(folder[3][0], tar[3][0])
    assert torch.equal(folder.target(3)["boxes"], tar.target(3)["boxes"])
    # VOC box convention: 1-based inclusive corners -> continuous 0-based (xmin - 1, .., xmax)
    assert folder.target(0)["boxes"][0].tolist() == [
        float(v) for v in np.array(folder.records[0].boxes[0])]
    (tmp_path / "VOCdevkit" / "other" / "Annotations").mkdir(parents=True)
    (tmp_path / "VOCdevkit" / "other" / "JPEGImages").mkdir()
    (tmp_path / "VOCdevkit" / "other" / "Annotations" / "x.xml").write_text("<a/>")
    (tmp_path / "VOCdevkit" / "other" / "JPEGImages" / "x.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="several VOC folders"):
        VOCSource(str(tmp_path / "VOCdevkit"), "test")


@needs_data
def test_planted_faults_are_skipped_counted_and_named(tmp_path: Path) -> None:
    (good_id, jpg, xml), = _raccoon_images(1)
    items = [(good_id, jpg, xml),
             ("bad_xml", jpg, "<annotation><size>"),
             ("no_image", b"", _xml("no_image", 320, 240, [("raccoon", (1, 1, 9, 9), 0)])),
             ("outside", jpg, _xml("outside", 320, 205, [("raccoon", (10, 10, 330, 100), 0),
                                                         ("raccoon", (5, 5, 50, 50), 1)])),
             ("empty", jpg, _xml("empty", 320, 205, [("raccoon", (50, 10, 40, 100), 0)]))]
    root = _make_voc(tmp_path / "faulty", items, {"trainval": [i for i, _, _ in items]},
                     ["raccoon"])
    (root / "JPEGImages" / "no_image.jpg").unlink()
    src = VOCSource(str(root), "trainval")
    assert [r.image_id for r in src.records] == [good_id, "outside", "empty"]
    assert (src.skipped_images, src.skipped_boxes) == (2, 2)
    text = "\n".join(src.problems)
    for name in ("bad_xml.xml", "no_image.jpg", "outside.xml", "empty.xml"):
        assert name in text
    outside = src.target(1)
    assert outside["boxes"].tolist() == [[4.0, 4.0, 50.0, 50.0]]
    assert outside["difficult"].tolist() == [True]
    assert len(src.target(2)["labels"]) == 0
    with pytest.raises(DatasetError, match="bad_xml.xml.*--strict-data"):
        VOCSource(str(root), "trainval", strict=True)
    with pytest.raises(DatasetError, match="no split 'test'.*trainval"):
        VOCSource(str(root), "test")


def test_classes_from_xmls_and_multi_root_join(tmp_path: Path) -> None:
    from PIL import Image

    buf = __import__("io").BytesIO()
    Image.new("RGB", (64, 48), (120, 30, 200)).save(buf, format="JPEG")
    jpg = buf.getvalue()
    a = _make_voc(tmp_path / "VOC2007", [
        ("a1", jpg, _xml("a1", 64, 48, [("dog", (1, 1, 20, 20), 0), ("cat", (5, 5, 30, 40), 1)])),
        ("a2", jpg, _xml("a2", 64, 48, [("person", (2, 3, 64, 48), 0)]))],
        {"trainval": ["a1", "a2"], "test": ["a2"]})
    b_dir = _make_voc(tmp_path / "b" / "VOCdevkit" / "VOC2012", [
        ("b1", jpg, _xml("b1", 64, 48, [("dog", (1, 1, 10, 10), 0)]))], {"trainval": ["b1"]})
    with tarfile.open(tmp_path / "b.tar", "w") as tf:
        tf.add(b_dir.parents[1], arcname=".")
    paths = parse_data_paths([f"{a},{tmp_path / 'b.tar'}"])
    joined = VOCSource(paths, "trainval")
    assert joined.classes == list(VOC_CLASSES)  # every name is a VOC class: VOC's order
    assert [r.image_id for r in joined.records] == ["a1", "a2", "b1"]
    assert joined.target(0)["labels"].tolist() == [VOC_CLASSES.index("dog") + 1,
                                                    VOC_CLASSES.index("cat") + 1]
    assert joined.target(1)["boxes"].tolist() == [[1.0, 2.0, 64.0, 48.0]]
    assert joined.describe(2).endswith("b.tar:VOCdevkit/VOC2012/JPEGImages/b1.jpg")
    with pytest.raises(DatasetError, match="no split 'test'"):
        VOCSource(paths, "test")
    test = VOCSource(paths, "test", classes=joined.classes, require_split=False)
    assert len(test) == 1  # VOC07+12's test split is VOC2007's
    own = VOCSource(str(b_dir), "trainval")
    assert own.classes == list(VOC_CLASSES)


# ----------------------------------------------------------------------------- metrics


def test_metrics_by_hand_with_a_difficult_object() -> None:
    """Two images, class 'a' with 2 positives + 1 difficult, class 'b' with 1 positive and no
    detection.  Detections of 'a' by score:
      0.90 image0 = A1 exactly                    TP at every IoU
      0.80 image0 = the difficult object          ignored (neither TP nor FP)
      0.70 image1 nowhere                         FP
      0.65 image0 inside the difficult object     IoU 0.25 -> FP (COCO's crowd IoA would be 1)
      0.60 image1 = A3 shifted, IoU 0.9           TP up to IoU 0.9, FP at 0.95
      0.50 image0 second hit on A1 (IoU 0.82)     FP (A1 already taken)
    IoU 0.5..0.9: P/R after each counted detection: (1, .5) (.5, .5) (1/3, .5) (.5, 1) (.4, 1):
    interpolated precision is 1 up to recall .5 and .5 above.  101-point AP = (51 x 1 + 50 x .5)
    / 101 = 76/101; 11-point = (6 x 1 + 5 x .5) / 11 = 8.5/11.  IoU 0.95: only the first
    detection is a TP: AP = 51/101.  AP(a) = (9 x 76 + 51) / 1010; class b scores 0.
    """
    targets = [
        {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]),
         "labels": torch.tensor([1, 1]), "difficult": torch.tensor([False, True])},
        {"boxes": torch.tensor([[0.0, 0, 10, 10], [30, 30, 40, 40]]),
         "labels": torch.tensor([1, 2]), "difficult": torch.tensor([False, False])},
    ]
    dets = [
        {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [20, 20, 25, 25],
                                [1, 0, 11, 10]]),
         "labels": torch.tensor([1, 1, 1, 1]), "scores": torch.tensor([0.9, 0.8, 0.65, 0.5])},
        {"boxes": torch.tensor([[50.0, 50, 60, 60], [0, 0, 10, 9]]),
         "labels": torch.tensor([1, 1]), "scores": torch.tensor([0.7, 0.6])},
    ]
    m = detection_metrics(targets, dets, ["a", "b"])
    ap_a = (9 * 76 + 51) / 1010
    assert m["per_class"]["a"]["AP"] == pytest.approx(100 * ap_a)
    assert m["per_class"]["a"]["AP50"] == pytest.approx(100 * 76 / 101)
    assert m["per_class"]["a"]["VOC07_AP50"] == pytest.approx(100 * 8.5 / 11)
    assert m["per_class"]["b"] == {"AP": 0.0, "AP50": 0.0, "VOC07_AP50": 0.0}
    assert m["AP"] == pytest.approx(100 * ap_a / 2)
    assert m["AP50"] == pytest.approx(100 * 76 / 101 / 2)
    assert m["AP75"] == pytest.approx(100 * 76 / 101 / 2)
    assert m["VOC07_AP50"] == pytest.approx(100 * 8.5 / 11 / 2)
    assert (m["num_objects"], m["num_difficult"], m["num_detections"]) == (4, 1, 6)
    # Were the difficult object an ordinary one, the 0.8 detection would be a TP and recall
    # would count 3 positives: the score must change.
    plain = [dict(t, difficult=torch.zeros_like(t["difficult"])) for t in targets]
    assert detection_metrics(plain, dets, ["a", "b"])["AP50"] != pytest.approx(m["AP50"])
    empty = detection_metrics(targets, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(
        0, dtype=torch.long), "scores": torch.zeros(0)}] * 2, ["a", "b", "c"])
    assert empty["AP"] == 0.0 and empty["per_class"]["c"]["AP"] is None


def test_metrics_give_pycocotools_the_info_key_it_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """pycocotools 2.0.10's ``loadRes`` copies ``dataset["info"]`` (a KeyError without it, which
    stopped a GPU run of the detection benchmark); the ground truth must carry the key whatever
    version is installed."""
    from pycocotools.coco import COCO

    seen: list[bool] = []
    load_res = COCO.loadRes

    def strict_load_res(self: COCO, results: object) -> COCO:
        seen.append("info" in self.dataset and "licenses" in self.dataset)
        return load_res(self, results)

    monkeypatch.setattr(COCO, "loadRes", strict_load_res)
    target = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])}
    det = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1]),
           "scores": torch.tensor([0.9])}
    assert detection_metrics([target], [det], ["a"])["AP"] == pytest.approx(100.0)
    assert seen == [True]


# ----------------------------------------------------------------------------- model


def _trunk_with_stats(arch: str = "resnet18") -> torch.nn.Module:
    """A trunk whose BatchNorms hold non-default statistics and affine parameters."""
    torch.manual_seed(0)
    trunk = build_trunk(arch)
    for m in trunk.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return trunk.eval()


def test_bn_recalibration_is_the_mean_of_per_image_batch_statistics() -> None:
    """--bn-recalibrate: each BatchNorm's new running mean / var are the averages over the
    images of each image's own channel mean and unbiased variance at the detector's input
    (computed here by hand through conv -> BN in batch mode -> ReLU -> conv); the affine
    parameters, eps and momentum stay, and the trunk ends in eval mode."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    torch.manual_seed(0)
    conv1, bn1 = torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4, momentum=0.3)
    conv2, bn2 = torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2)
    trunk = torch.nn.Sequential(conv1, bn1, torch.nn.ReLU(), conv2, bn2)
    for bn in (bn1, bn2):
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(1e-4)
        bn.weight.data.uniform_(0.5, 2.0)
        bn.bias.data.uniform_(-1.0, 1.0)
    affine = [p.clone() for p in trunk.parameters()]
    transform = GeneralizedRCNNTransform(48, 80, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
              for h, w in ((40, 50), (30, 30), (64, 48))]
    stats1, stats2 = [], []
    with torch.no_grad():
        for img in images:
            x = transform.eval()([img.float() / 255])[0].tensors
            y1 = conv1(x)
            m, v = y1.mean((0, 2, 3)), y1.var((0, 2, 3), unbiased=True)
            vb = y1.var((0, 2, 3), unbiased=False)  # batch mode normalises with the biased var
            z = (y1 - m.view(1, -1, 1, 1)) / torch.sqrt(vb.view(1, -1, 1, 1) + bn1.eps)
            y2 = conv2(torch.relu(z * bn1.weight.view(1, -1, 1, 1) + bn1.bias.view(1, -1, 1, 1)))
            stats1.append((m, v))
            stats2.append((y2.mean((0, 2, 3)), y2.var((0, 2, 3), unbiased=True)))
    assert recalibrate_batchnorm(trunk, iter(images), transform) == 3
    for bn, stats in ((bn1, stats1), (bn2, stats2)):
        torch.testing.assert_close(bn.running_mean, torch.stack([m for m, _ in stats]).mean(0))
        torch.testing.assert_close(bn.running_var, torch.stack([v for _, v in stats]).mean(0))
        assert not bn.training
    assert bn1.momentum == 0.3 and bn2.momentum == 0.1
    assert all(torch.equal(a, b) for a, b in zip(affine, trunk.parameters(), strict=True))


def _tiny_batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 112, 96, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 12, 70, 80]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5, 50, 60], [40, 30, 90, 100]]),
                "labels": torch.tensor([2, 1])}]
    return images, targets


def test_frozen_batchnorm_keeps_the_checkpoint_statistics_through_a_step() -> None:
    trunk = _trunk_with_stats()
    model = build_detector(trunk, 2, "c4", min_size=96, max_size=160, roi_batch=16)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    frozen = dict(model.backbone.named_modules()) | {
        f"layer4.{k}" if k else "layer4": v
        for k, v in model.roi_heads.box_head.layer4.named_modules()}
    expected = {n: m for n, m in trunk.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert set(expected) <= set(frozen)
    for name, bn in expected.items():
        fbn = frozen[name]
        assert isinstance(fbn, FrozenBatchNorm2d)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(fbn, attr), getattr(bn, attr).detach()), (name, attr)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = sum(model(*_tiny_batch()).values())
    loss.backward()  # type: ignore[union-attr]
    opt.step()
    after = model.state_dict()
    bn_keys = [k for k in after if k.rsplit(".", 1)[-1] in ("running_mean", "running_var")
               or (".bn" in k or "downsample.1" in k)]
    assert bn_keys and all(torch.equal(before[k], after[k]) for k in bn_keys)
    assert not torch.equal(before["backbone.conv1.weight"], after["backbone.conv1.weight"])


def test_c4_wiring_res5_lands_in_the_box_head() -> None:
    trunk = _trunk_with_stats()
    model = build_detector(trunk, 3, "c4", min_size=96, max_size=160)
    assert model.backbone.out_channels == 256  # res4 of ResNet-18
    head = model.roi_heads.box_head
    assert head.out_channels == 512
    assert model.roi_heads.box_predictor.cls_score.in_features == 512
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    sd = trunk.state_dict()
    for k, v in head.layer4.state_dict().items():
        assert torch.equal(v, sd[f"layer4.{k}"]), k
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert model.roi_heads.box_roi_pool.pooled == 14
    fpn = build_detector(trunk, 3, "fpn", min_size=96, max_size=160, roi_batch=16)
    fpn.train()
    assert set(fpn(*_tiny_batch())) == {"loss_classifier", "loss_box_reg", "loss_objectness",
                                        "loss_rpn_box_reg"}
    assert torch.equal(fpn.backbone.body.layer3[0].conv1.weight, sd["layer3.0.conv1.weight"])


def test_schedules_follow_the_paper_and_the_linear_rule() -> None:
    s = resolve_schedule("voc07+12", "supervised", 16)
    assert (s.iterations, s.steps, s.base_lr, s.warmup_iters) == (25_000, (17_000,), 0.02, 100)
    s = resolve_schedule("voc07", "contrastive", 16)
    assert (s.iterations, s.steps, s.base_lr, s.warmup_iters) == (12_500, (9_500,), 0.003, 1000)
    assert s.lr_at(0) == pytest.approx(0.001)  # warm-up from 1/3
    assert s.lr_at(500) == pytest.approx(0.002)
    assert s.lr_at(9_499) == pytest.approx(0.003) and s.lr_at(9_500) == pytest.approx(0.0003)
    s = resolve_schedule("voc07+12", "supervised", 2)
    assert (s.iterations, s.steps, s.base_lr, s.warmup_iters) == (200_000, (136_000,), 0.0025,
                                                                  800)
    s = resolve_schedule("short", "supervised", 2, iters=20)
    assert (s.iterations, s.steps, s.warmup_iters) == (20, (15,), 1)
    assert [rule_for_method(m) for m in ("pirl", "npid", "jigsaw", "rotation", None)] == [
        "contrastive", "contrastive", "supervised", "supervised", "supervised"]


# ----------------------------------------------------------------------------- CLI


def _pirl_checkpoint(path: Path) -> Path:
    cfg = Config()
    cfg.model.arch, cfg.objective.method = "resnet18", "pirl"
    cfg.objective.num_permutations = 10
    for k, v in view_preset(32).items():
        setattr(cfg.views, k, v)
    torch.manual_seed(3)
    model = build_model(cfg)
    torch.save({"format": "pirl", "version": 1, "config": to_dict(cfg),
                "model": model.state_dict()}, path)
    return path


def test_finetune_from_a_pirl_checkpoint_writes_json_table_png_and_resumes(
        tiny_raccoon: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _pirl_checkpoint(tmp_path / "pirl.pt")
    out = tmp_path / "det"
    argv = ["--checkpoint", str(ckpt), "--data", str(tiny_raccoon), "--schedule", "short",
            "--iters", "1", "--checkpoint-every", "1", "--out", str(out), *FAST]
    assert _cli(argv) == 0
    first = json.loads((out / "detection.json").read_text())
    assert first["lr_rule"] == "contrastive" and first["method"] == "pirl"
    assert first["design"] == "c4" and first["iterations"] == 1
    assert first["training"]["resumed_from"] == 0
    # Rerunning with more iterations is another run: refused, with a one-line reason.
    assert _cli([*argv[:7], "2", *argv[8:]]) == 2
    assert "other settings" in capsys.readouterr().err
    # The same command again: training is done, it resumes at the end and re-scores.
    assert _cli(argv) == 0
    again = json.loads((out / "detection.json").read_text())
    assert again["training"]["resumed_from"] == 1
    assert again["AP"] == first["AP"] and again["AP50"] == first["AP50"]
    printed = capsys.readouterr().out
    assert "| checkpoint | design | schedule |" in printed and "| raccoon |" in printed
    assert (out / "detection.png").stat().st_size > 10_000
    for key in ("AP", "AP50", "AP75", "VOC07_AP50", "per_class_AP", "schedule", "checkpoint"):
        assert key in first


def test_bn_recalibrate_is_recorded_and_part_of_the_run_settings(
        tiny_raccoon: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _pirl_checkpoint(tmp_path / "pirl.pt")
    out = tmp_path / "det"
    argv = ["--checkpoint", str(ckpt), "--data", str(tiny_raccoon), "--schedule", "short",
            "--iters", "1", "--out", str(out), "--bn-recalibrate", "3", *FAST]
    assert _cli(argv) == 0
    result = json.loads((out / "detection.json").read_text())
    assert result["batchnorm"] == ("frozen (FrozenBatchNorm2d), statistics re-estimated on 3 "
                                   "training images at 128 px")
    # Other statistics are another run: resuming it with another N is refused.
    n = argv.index("--bn-recalibrate") + 1
    assert _cli([*argv[:n], "2", *argv[n + 1:]]) == 2
    assert "other settings" in capsys.readouterr().err


def test_resume_continues_where_the_checkpoint_stopped(tiny_raccoon: Path,
                                                       tmp_path: Path) -> None:
    """Fine-tune 2 iterations in one go, and resume another run from the first one's
    iteration-1 checkpoint: the same weights at the end (data order, flips and RNG restored)."""
    from pirl.evaluate.detection.engine import CKPT

    base = ["--checkpoint", "random", "--arch", "resnet18", "--data", str(tiny_raccoon),
            "--schedule", "short", "--checkpoint-every", "1", "--lr-rule", "supervised",
            *FAST, "--test-proposals", "1", "--png-images", "0", "--roi-batch", "8",
            "--min-size", "96"]
    assert _cli([*base, "--iters", "2", "--out", str(tmp_path / "once")]) == 0
    whole = torch.load(tmp_path / "once" / CKPT, weights_only=True)
    # A second folder holding only the iteration-1 checkpoint: as if killed right after it.
    split = tmp_path / "split"
    split.mkdir()
    shutil.copy(tmp_path / "once" / "detection_ckpt.prev.pt", split / CKPT)
    assert torch.load(split / CKPT, weights_only=True)["iteration"] == 1
    assert _cli([*base, "--iters", "2", "--out", str(split)]) == 0
    resumed = torch.load(split / CKPT, weights_only=True)
    result = json.loads((split / "detection.json").read_text())
    assert result["training"]["resumed_from"] == 1 and result["lr_rule_from"] == "--lr-rule"
    assert resumed["iteration"] == whole["iteration"] == 2
    for k, v in whole["model"].items():
        assert torch.allclose(v, resumed["model"][k], atol=1e-6), k


def test_bad_input_exits_2_with_one_line(tiny_raccoon: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out", str(tmp_path / "x")]
    cases = [["--checkpoint", "random", "--data", str(tiny_raccoon)],  # no --arch
             ["--checkpoint", str(tmp_path / "nope.pt"), "--data", str(tiny_raccoon)],
             ["--checkpoint", "random", "--arch", "resnet18", "--data", str(tmp_path / "none")],
             ["--checkpoint", "random", "--arch", "resnet18", "--data", str(tiny_raccoon),
              "--train-split", "nosuch"],
             ["--checkpoint", "random", "--arch", "resnet18", "--data", str(tiny_raccoon),
              "--iters", "0"]]
    for argv in cases:
        assert _cli([*argv, *out, "--quiet"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("pirl eval detection: error:") and "\n" not in err, err


@needs_data
def test_an_undecodable_image_is_skipped_or_fatal_when_loaded(tmp_path: Path) -> None:
    from pirl.data.datasets import UnreadableDataError
    from pirl.evaluate.detection.engine import DetectionItems

    (image_id, jpg, xml), = _raccoon_images(1)
    root = _make_voc(tmp_path / "v", [(image_id, jpg[: len(jpg) // 3], xml)],
                     {"trainval": [image_id]}, ["raccoon"])
    src = VOCSource(str(root), "trainval")  # the size comes from the XML: indexed fine
    assert DetectionItems(src)[0] is None
    with pytest.raises(UnreadableDataError, match=f"{image_id}.jpg"):
        DetectionItems(src, strict=True)[0]
    good = VOCSource(str(_make_voc(tmp_path / "w", [(image_id, jpg, xml)],
                                   {"trainval": [image_id]})), "trainval")
    image, target = DetectionItems(good)[(0, True)]  # flipped: boxes mirrored
    w = image.shape[-1]
    assert torch.equal(image, good[0][0].flip(-1))
    assert torch.allclose(target["boxes"][:, [2, 0]], w - good.target(0)["boxes"][:, [0, 2]])
