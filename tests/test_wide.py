"""Wide trunks (``model.width``, PIRL-c2x) and the MLP heads (``model.head=mlp``): shapes and
parameter counts against hand formulas, a step of pretraining and its export, and a wide trunk in
the authors' VISSL layout loaded by every evaluation protocol."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pirl.cli import main as pirl_main
from pirl.config import Config, ConfigError, to_dict
from pirl.evaluate.cli import add_eval_parser
from pirl.evaluate.detection.model import build_detector
from pirl.evaluate.loading import load_eval_model
from pirl.export import CheckpointError, export_trunk, load_backbone
from pirl.layouts import infer_trunk
from pirl.methods import build_model, fit_to_dataset
from pirl.run import check_resume_compatible
from pirl.trunk import _ScaledResNet, build_trunk, stage_dim, trunk_dim


def _bottleneck_resnet50_params(w: int) -> int:
    """Parameters of a ResNet-50 trunk with every stage w times as wide, from the layer shapes
    (convs without bias; BatchNorm: weight + bias)."""
    total = 3 * 7 * 7 * 64 * w + 2 * 64 * w  # conv1 + bn1
    inplanes = 64 * w
    for planes, blocks in ((64 * w, 3), (128 * w, 4), (256 * w, 6), (512 * w, 3)):
        for b in range(blocks):
            total += inplanes * planes + 2 * planes  # 1x1 conv + bn
            total += 9 * planes * planes + 2 * planes  # 3x3 conv + bn
            total += planes * 4 * planes + 2 * 4 * planes  # 1x1 conv + bn
            if b == 0:  # projection shortcut: 1x1 conv + bn
                total += inplanes * 4 * planes + 2 * 4 * planes
            inplanes = 4 * planes
    return total


def test_width_2_resnet50_is_pirl_c2x() -> None:
    """128 channels out of conv1, 4096 out of res5, ~98M parameters with a 1000-way classifier
    (the count the paper quotes); the plain formula matches width 1 too (torchvision's 25.6M)."""
    assert _bottleneck_resnet50_params(1) + 2048 * 1000 + 1000 == sum(
        p.numel() for p in torchvision.models.resnet50().parameters())
    with torch.device("meta"):
        wide = build_trunk("resnet50", width=2)
    n = sum(p.numel() for p in wide.parameters())
    assert n == _bottleneck_resnet50_params(2)
    assert round((n + 4096 * 1000 + 1000) / 1e6) == 98
    assert tuple(wide.conv1.weight.shape) == (128, 3, 7, 7)
    assert tuple(wide.layer1[0].conv1.weight.shape) == (128, 128, 1, 1)
    assert tuple(wide.layer4[2].conv3.weight.shape) == (4096, 1024, 1, 1)
    assert trunk_dim("resnet50", 2) == 4096 and stage_dim("resnet50", "res4", 2) == 2048
    assert stage_dim("resnet18", "conv1", 4) == 256


def test_the_scaled_builder_at_width_1_is_torchvision() -> None:
    """The wide builder re-creates torchvision's modules: at width 1 it must give exactly
    torchvision's key set and shapes, or the wide layouts would drift from the narrow ones."""
    with torch.device("meta"):
        for arch, block, layers in (("resnet18", torchvision.models.resnet.BasicBlock,
                                     [2, 2, 2, 2]),
                                    ("resnet50", torchvision.models.resnet.Bottleneck,
                                     [3, 4, 6, 3])):
            ours = _ScaledResNet(block, layers, 1).state_dict()
            ref = build_trunk(arch).state_dict()
            assert {k: tuple(v.shape) for k, v in ours.items()} == {
                k: tuple(v.shape) for k, v in ref.items()}


def test_wide_small_stem_forward_and_shape_inference() -> None:
    trunk = build_trunk("resnet18", small_stem=True, width=2)
    assert trunk(torch.randn(2, 3, 32, 32)).shape == (2, 1024)
    assert infer_trunk(trunk.state_dict()) == ("resnet18", True, 2)


def test_mlp_heads_have_the_release_shapes() -> None:
    cfg = Config()
    cfg.model.arch, cfg.model.head, cfg.model.width = "resnet18", "mlp", 2
    model = build_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("trunk")}
    assert shapes["f.fc.0.weight"] == (1024, 1024) and shapes["f.fc.2.weight"] == (128, 1024)
    assert shapes["g.patch_fc.0.weight"] == (1024, 1024)
    assert shapes["g.patch_fc.2.weight"] == (128, 1024)
    assert shapes["g.fuse.weight"] == (128, 9 * 128)
    out = model({"image": torch.randn(2, 3, 32, 32), "patches": torch.randn(2, 9, 3, 9, 9)})
    assert out["z_img"].shape == (2, 128) and out["z_t"].shape == (2, 128)


def _write_images(root: Path, classes: int = 3, per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            base = np.zeros((40, 40, 3), dtype=np.uint8)
            base[..., c] = 160  # a colour per class, plus noise
            img = np.clip(base + rng.integers(0, 90, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.png")
    return root


def test_wide_mlp_pirl_pretrains_a_step_exports_and_evaluates(tmp_path: Path) -> None:
    """A PIRL-c2x-style run (width 2, MLP heads) on a small trunk: one epoch of pretraining, the
    checkpoint records width and head, the export reloads with its width inferred, and the eval
    loader rebuilds the model with its MLP heads from the checkpoint alone."""
    data = _write_images(tmp_path / "data")
    out = tmp_path / "run"
    rc = pirl_main(["pretrain", "--data", str(data), "--out", str(out), "--preset", "demo",
                    "--epochs", "1", "--batch-size", "8", "--workers", "0", "--quiet",
                    "model.width=2", "model.head=mlp", "knn_every=0"])
    assert rc == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["model"]["width"] == 2 and ckpt["config"]["model"]["head"] == "mlp"
    em = load_eval_model(str(out / "checkpoint.pt"))
    assert em.full is not None and isinstance(em.full.f.fc, torch.nn.Sequential)
    assert em.trunk.conv1.out_channels == 128
    heads = {k: v for k, v in ckpt["model"].items() if k.startswith(("f.", "g."))}
    assert any(".fc.2." in k for k in heads) and any(".patch_fc.2." in k for k in heads)
    reloaded = em.full.state_dict()
    for k, v in heads.items():  # the MLP heads come back with the trained weights, not new ones
        assert torch.equal(reloaded[k], v), k
    eval_parser = _eval_parser()
    # The invariance protocol measures ||f(v_I) - g(v_I^t)|| through the MLP heads.
    args = eval_parser.parse_args(["eval", "invariance", "--checkpoint", str(out / "checkpoint.pt"),
                                   "--val-data", str(data), "--image-size", "32", "--workers",
                                   "0", "--quiet", "--out", str(tmp_path / "inv")])
    assert args.func(args) == 0
    (m,) = json.loads((tmp_path / "inv" / "invariance.json").read_text())["models"].values()
    assert 0.0 <= m["heads"]["mean"] <= 2.0
    # A resume that would rebuild other heads or another width is refused before any work.
    for change in ("model.head=linear", "model.width=1"):
        again = ["pretrain", "--data", str(data), "--out", str(out), "--preset", "demo",
                 "--epochs", "2", "--batch-size", "8", "--workers", "0", "--quiet",
                 "model.width=2", "model.head=mlp", "knn_every=0", change]
        assert pirl_main(again) == 2, change
    assert pirl_main(["export", "--checkpoint", str(out / "checkpoint.pt"),
                      "--format", "detectron2", "--out", str(tmp_path / "d2.pth")]) == 0
    d2 = torch.load(tmp_path / "d2.pth", weights_only=True)["model"]
    assert tuple(d2["stem.conv1.weight"].shape) == (128, 3, 7, 7)
    assert tuple(d2["res5.1.conv2.weight"].shape) == (1024, 1024, 3, 3)
    exported = export_trunk(out / "checkpoint.pt", "torchvision", tmp_path / "trunk.pth")
    back = load_backbone(exported)
    assert back.conv1.out_channels == 128
    for k, v in back.state_dict().items():
        assert torch.equal(v, em.trunk.state_dict()[k]), k
    with pytest.raises(CheckpointError, match="width"):
        load_backbone(exported, width=1)


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pirl")
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser


def _vissl_wide(path: Path) -> Path:
    """A synthetic checkpoint in the authors' VISSL layout holding a width-2 trunk."""
    torch.manual_seed(0)
    trunk = build_trunk("resnet18", width=2)
    sd = {f"_feature_blocks.{k}": v for k, v in trunk.state_dict().items()}
    heads = {"0.clf.0.weight": torch.randn(128, 1024), "0.clf.0.bias": torch.zeros(128)}
    torch.save({"phase_idx": 0, "type": "checkpoint",
                "classy_state_dict": {"base_model": {"model": {"trunk": sd, "heads": heads}}}},
               path)
    return path


def test_wide_vissl_checkpoint_loads_into_every_protocol(tmp_path: Path) -> None:
    ckpt = _vissl_wide(tmp_path / "model_final_checkpoint_phase0.torch")
    train = _write_images(tmp_path / "train")
    val = _write_images(tmp_path / "val", per_class=4)
    parser = _eval_parser()
    common = ["--checkpoint", str(ckpt), "--train-data", str(train), "--val-data", str(val),
              "--image-size", "32", "--workers", "0", "--quiet", "--no-cache",
              "--batch-size", "12"]
    runs = {"knn": ["--k", "5"], "linear": ["--epochs", "2", "--aug-copies", "1"],
            "svm": ["--costs", "0.1,1", "--folds", "2"],
            "finetune": ["--epochs", "1", "--fraction", "0.5"],
            "neighbors": ["--queries", "2", "--k", "2"]}
    for protocol, extra in runs.items():
        o = tmp_path / protocol
        args = parser.parse_args(["eval", protocol, *common, "--out", str(o), *extra])
        assert args.func(args) == 0, protocol
        assert (o / f"{protocol}.json").is_file(), protocol
        json.loads((o / f"{protocol}.json").read_text())
    # invariance reads no training split; a VISSL file has no f / g, so the trunk distance only
    args = parser.parse_args(["eval", "invariance", "--checkpoint", str(ckpt), "--val-data",
                              str(val), "--image-size", "32", "--workers", "0", "--quiet",
                              "--out", str(tmp_path / "invariance")])
    assert args.func(args) == 0
    inv = json.loads((tmp_path / "invariance" / "invariance.json").read_text())
    (m,) = inv["models"].values()
    assert 0.0 <= m["trunk"]["mean"] <= 2.0 and m["heads"] is None
    # detection: the wide trunk as a C4 backbone, one training forward with a box
    det = build_detector(load_backbone(ckpt), num_classes=2)
    det.train()
    losses = det([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]),
                                             "labels": torch.tensor([1])}])
    assert all(torch.isfinite(v) for v in losses.values())


def test_resume_check_reads_old_checkpoints_as_width_1_linear() -> None:
    """Checkpoints from before model.width / model.head hold a width-1 trunk with linear heads:
    resuming them with the defaults is allowed, with a wide trunk or MLP heads it is not."""
    cfg = Config()
    saved = to_dict(cfg)
    for key in ("width", "head"):
        del saved["model"][key]
    check_resume_compatible({"config": saved, "dataset_size": 10}, cfg, 10, Path("ckpt"))
    for key, value in (("width", 2), ("head", "mlp")):
        changed = Config()
        setattr(changed.model, key, value)
        with pytest.raises(ConfigError, match=f"model.{key}"):
            check_resume_compatible({"config": saved, "dataset_size": 10}, changed, 10,
                                    Path("ckpt"))


def test_mlp_head_is_refused_for_methods_without_f() -> None:
    """jigsaw / rotation / supervised have no f or g: an MLP head would be silently ignored."""
    for method in ("jigsaw", "rotation"):
        cfg = Config()
        cfg.objective.method, cfg.model.head = method, "mlp"
        with pytest.raises(ConfigError, match="model.head=mlp"):
            fit_to_dataset(cfg, 100)
    cfg = Config()
    cfg.objective.method, cfg.model.head = "npid", "mlp"
    fit_to_dataset(cfg, 100)  # NPID has f: allowed
    assert isinstance(build_model(cfg).f.fc, torch.nn.Sequential)
