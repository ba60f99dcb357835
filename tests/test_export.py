"""Trunk export (torchvision, Detectron2) and import (pirl, trunk.pt, Detectron2, VISSL, random)."""

from __future__ import annotations

import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor, nn

from pirl.config import Config, to_dict
from pirl.export import (
    CheckpointError,
    detectron2_to_torchvision,
    export_trunk,
    infer_arch,
    load_backbone,
    torchvision_to_detectron2,
)
from pirl.methods import build_model
from pirl.trunk import build_trunk

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _randomise_bn(trunk: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, so a mix-up of running_mean / running_var / weight shows up."""
    g = torch.Generator().manual_seed(1)
    for m in trunk.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return trunk


def _trunk(arch: str = "resnet18", small: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(build_trunk(arch, small)).eval()


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _out(trunk: nn.Module) -> Tensor:
    with torch.no_grad():
        return trunk.eval()(X)


# ------------------------------------------------------------------------------- torchvision out


def test_torchvision_export_loads_with_only_fc_missing(tmp_path: Path) -> None:
    trunk = _trunk("resnet18")
    path = export_trunk(trunk, "torchvision", tmp_path / "trunk.pth")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    tv = torchvision.models.resnet18()
    result = tv.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    tv.fc = nn.Identity()
    torch.testing.assert_close(_out(tv), _out(trunk), rtol=0, atol=0)


def test_torchvision_export_from_a_whole_model_drops_heads(tmp_path: Path) -> None:
    cfg = Config()
    cfg.model.arch, cfg.model.embed_dim = "resnet18", 8
    model = build_model(cfg)
    path = export_trunk(model, "torchvision", tmp_path / "t.pth")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert set(sd) == set(model.trunk.state_dict())  # no f.*, g.*, trunk.* prefixes
    assert not any(k.startswith(("f.", "g.", "fc.")) for k in sd)


def test_small_stem_export_needs_load_backbone(tmp_path: Path) -> None:
    trunk = _trunk("resnet18", small=True)
    path = export_trunk(trunk, "torchvision", tmp_path / "trunk.pt")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert tuple(sd["conv1.weight"].shape) == (64, 3, 3, 3)
    with pytest.raises(RuntimeError, match="conv1.weight"):  # documented: plain torchvision can't
        torchvision.models.resnet18().load_state_dict(sd, strict=False)
    back = load_backbone(path)
    assert isinstance(back.maxpool, nn.Identity)
    torch.testing.assert_close(_out(back), _out(trunk), rtol=0, atol=0)


def test_unknown_export_format() -> None:
    with pytest.raises(ValueError, match="onnx"):
        export_trunk(_trunk(), "onnx", "x.pt")


# -------------------------------------------------------------------------------- detectron2 out

# Detectron2's ResNet-50 backbone, written out from its module structure (BasicStem.conv1 with a
# `norm` attribute; stages res2..res5 of 3, 4, 6, 3 BottleneckBlocks with conv1..conv3 each
# carrying a norm; a `shortcut` conv + norm in the first block of every stage).
D2_STEM_AND_FIRST_BLOCK = [
    "stem.conv1.weight",
    "stem.conv1.norm.weight",
    "stem.conv1.norm.bias",
    "stem.conv1.norm.running_mean",
    "stem.conv1.norm.running_var",
    "res2.0.conv1.weight",
    "res2.0.conv1.norm.weight",
    "res2.0.conv1.norm.bias",
    "res2.0.conv1.norm.running_mean",
    "res2.0.conv1.norm.running_var",
    "res2.0.conv2.weight",
    "res2.0.conv2.norm.weight",
    "res2.0.conv2.norm.bias",
    "res2.0.conv2.norm.running_mean",
    "res2.0.conv2.norm.running_var",
    "res2.0.conv3.weight",
    "res2.0.conv3.norm.weight",
    "res2.0.conv3.norm.bias",
    "res2.0.conv3.norm.running_mean",
    "res2.0.conv3.norm.running_var",
    "res2.0.shortcut.weight",
    "res2.0.shortcut.norm.weight",
    "res2.0.shortcut.norm.bias",
    "res2.0.shortcut.norm.running_mean",
    "res2.0.shortcut.norm.running_var",
]

D2_R50_BLOCKS = """
res2.0 conv1 conv2 conv3 shortcut
res2.1 conv1 conv2 conv3
res2.2 conv1 conv2 conv3
res3.0 conv1 conv2 conv3 shortcut
res3.1 conv1 conv2 conv3
res3.2 conv1 conv2 conv3
res3.3 conv1 conv2 conv3
res4.0 conv1 conv2 conv3 shortcut
res4.1 conv1 conv2 conv3
res4.2 conv1 conv2 conv3
res4.3 conv1 conv2 conv3
res4.4 conv1 conv2 conv3
res4.5 conv1 conv2 conv3
res5.0 conv1 conv2 conv3 shortcut
res5.1 conv1 conv2 conv3
res5.2 conv1 conv2 conv3
"""

NORM = ("weight", "bias", "running_mean", "running_var")


def _d2_r50_table() -> set[str]:
    keys = set(D2_STEM_AND_FIRST_BLOCK[:5])
    for line in D2_R50_BLOCKS.strip().splitlines():
        block, *convs = line.split()
        for conv in convs:
            keys.add(f"{block}.{conv}.weight")
            keys.update(f"{block}.{conv}.norm.{n}" for n in NORM)
    return keys


def _meta_sd(arch: str, small: bool = False) -> dict[str, Tensor]:
    with torch.device("meta"):
        return dict(build_trunk(arch, small).state_dict())


def test_detectron2_key_table_resnet50() -> None:
    table = _d2_r50_table()
    assert set(D2_STEM_AND_FIRST_BLOCK) <= table and len(table) == 265
    d2 = torchvision_to_detectron2(_meta_sd("resnet50"))
    assert set(d2) == table
    assert tuple(d2["stem.conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(d2["res5.0.shortcut.weight"].shape) == (2048, 1024, 1, 1)
    assert tuple(d2["res4.5.conv3.norm.running_var"].shape) == (1024,)


@pytest.mark.parametrize("tv_key,d2_key", [
    ("conv1.weight", "stem.conv1.weight"),
    ("bn1.bias", "stem.conv1.norm.bias"),
    ("layer1.0.downsample.0.weight", "res2.0.shortcut.weight"),
    ("layer1.0.downsample.1.running_var", "res2.0.shortcut.norm.running_var"),
    ("layer3.5.conv2.weight", "res4.5.conv2.weight"),
    ("layer4.2.bn3.weight", "res5.2.conv3.norm.weight"),
    ("layer2.1.bn1.running_mean", "res3.1.conv1.norm.running_mean"),
])
def test_detectron2_key_pairs(tv_key: str, d2_key: str) -> None:
    d2 = torchvision_to_detectron2(_meta_sd("resnet50"))
    assert d2_key in d2
    assert d2[d2_key].shape == _meta_sd("resnet50")[tv_key].shape
    assert d2_key in torchvision_to_detectron2({tv_key: torch.zeros(1)})


def test_detectron2_resnet18_has_no_res2_shortcut() -> None:
    d2 = torchvision_to_detectron2(_meta_sd("resnet18"))
    assert not any(k.startswith("res2.0.shortcut") for k in d2)
    assert "res3.0.shortcut.weight" in d2 and "res2.1.conv2.norm.bias" in d2
    assert not any("conv3" in k for k in d2)


def test_detectron2_mapping_round_trips() -> None:
    sd = _meta_sd("resnet50")
    back = detectron2_to_torchvision(torchvision_to_detectron2(sd))
    assert set(back) == {k for k in sd if not k.endswith("num_batches_tracked")}


def test_detectron2_export_file_and_reimport(tmp_path: Path) -> None:
    trunk = _trunk("resnet18")
    path = export_trunk(trunk, "detectron2", tmp_path / "d2.pth")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    assert obj["__author__"] == "pirl" and obj["matching_heuristics"] is True
    assert "stem.conv1.weight" in obj["model"] and "conv1.weight" not in obj["model"]
    assert not any(k.endswith("num_batches_tracked") for k in obj["model"])
    back = load_backbone(path)
    torch.testing.assert_close(_out(back), _out(trunk), rtol=0, atol=0)


def test_detectron2_export_refuses_small_stem_and_pkl(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="small-stem"):
        export_trunk(_trunk("resnet18", small=True), "detectron2", tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match=r"\.pkl"):
        export_trunk(_trunk("resnet18"), "detectron2", tmp_path / "a.pkl")


# -------------------------------------------------------------------------------------- imports


def test_load_random() -> None:
    net = load_backbone("random", arch="resnet18", small_stem=True)
    assert not net.training and isinstance(net.fc, nn.Identity)
    assert tuple(net.conv1.weight.shape) == (64, 3, 3, 3)
    with pytest.raises(ValueError, match="arch"):
        load_backbone("random")


def _pirl_ckpt(model: nn.Module, cfg: Config) -> dict:
    return {"format": "pirl", "version": 1, "config": to_dict(cfg), "dataset_size": 10,
            "model": model.state_dict(), "position": {"epoch": 1, "step": 5, "batch_in_epoch": 0}}


def test_load_pirl_checkpoint(tmp_path: Path) -> None:
    cfg = Config()
    cfg.model.arch, cfg.model.small_stem, cfg.model.embed_dim = "resnet18", True, 8
    torch.manual_seed(0)
    model = build_model(cfg)
    _randomise_bn(model.trunk)
    torch.save(_pirl_ckpt(model, cfg), tmp_path / "checkpoint.pt")
    back = load_backbone(tmp_path / "checkpoint.pt")
    assert not back.training
    _same_weights(back, model.trunk)
    torch.testing.assert_close(_out(back), _out(model.trunk), rtol=0, atol=0)


def test_pirl_checkpoint_config_must_match_weights(tmp_path: Path) -> None:
    cfg = Config()
    cfg.model.arch, cfg.model.embed_dim = "resnet18", 8
    ckpt = _pirl_ckpt(build_model(cfg), cfg)
    ckpt["config"]["model"]["arch"] = "resnet34"
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="resnet34"):
        load_backbone(tmp_path / "c.pt")


def test_load_plain_torchvision_state_dict_with_fc(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tv = torchvision.models.resnet34()
    torch.save(tv.state_dict(), tmp_path / "r34.pth")  # includes fc.*: ignored
    back = load_backbone(tmp_path / "r34.pth")
    tv.fc = nn.Identity()
    torch.testing.assert_close(_out(back), _out(tv), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="arch"):
        load_backbone(tmp_path / "r34.pth", arch="resnet18")


def _vissl_ckpt(trunk: nn.Module) -> dict:
    """The layout of the authors' VISSL release (trunk = VISSL's ResNeXt `_feature_blocks`)."""
    trunk_sd = {f"_feature_blocks.{k}": v for k, v in trunk.state_dict().items()}
    heads = {"0.clf.0.weight": torch.randn(128, 2048), "0.clf.0.bias": torch.zeros(128)}
    return {"phase_idx": 799, "iteration": 1000, "type": "checkpoint",
            "classy_state_dict": {"base_model": {"model": {"trunk": trunk_sd, "heads": heads},
                                                 "meta": {}},
                                  "train_phase_idx": 799}}


def test_vissl_checkpoint_round_trip(tmp_path: Path) -> None:
    trunk = _trunk("resnet50")
    ckpt = _vissl_ckpt(trunk)
    assert "_feature_blocks.conv1.weight" in ckpt["classy_state_dict"]["base_model"]["model"][
        "trunk"]
    torch.save(ckpt, tmp_path / "model_final_checkpoint_phase799.torch")
    back = load_backbone(tmp_path / "model_final_checkpoint_phase799.torch")
    _same_weights(back, trunk)
    # and converted to torchvision in one step
    out = export_trunk(tmp_path / "model_final_checkpoint_phase799.torch", "torchvision",
                       tmp_path / "tv.pth")
    tv = torchvision.models.resnet50()
    res = tv.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and not res.unexpected_keys


def test_vissl_bad_layout_is_clear(tmp_path: Path) -> None:
    torch.save({"classy_state_dict": {"base_model": {}}}, tmp_path / "v.torch")
    with pytest.raises(CheckpointError, match="model"):
        load_backbone(tmp_path / "v.torch")


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("small", [False, True])
def test_infer_arch(arch: str, small: bool) -> None:
    assert infer_arch(_meta_sd(arch, small)) == (arch, small)


def test_infer_arch_rejects_other_resnets() -> None:
    with torch.device("meta"):
        r101 = torchvision.models.resnet101().state_dict()
        wide = torchvision.models.wide_resnet50_2().state_dict()
    with pytest.raises(CheckpointError, match=r"\(3, 4, 23, 3\)"):
        infer_arch(r101)
    with pytest.raises(CheckpointError, match="width 128"):
        infer_arch(wide)


def test_strict_load_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    sd = dict(_trunk("resnet18").state_dict())
    del sd["layer2.0.bn1.running_var"]
    torch.save(sd, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing\.pt.*layer2\.0\.bn1\.running_var"):
        load_backbone(tmp_path / "missing.pt")
    sd = dict(_trunk("resnet18").state_dict())
    sd["layer1.0.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"layer1\.0\.extra\.weight"):
        load_backbone(tmp_path / "extra.pt")


class _Evil:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused_not_run(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"conv1.weight": torch.zeros(1), "x": _Evil(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=2)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*arbitrary code"):
        load_backbone(path)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        export_trunk(path, "torchvision", tmp_path / "out.pt")
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello, not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"notes\.txt: not a PyTorch checkpoint"):
        load_backbone(tmp_path / "notes.txt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt"):
        load_backbone(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such"):
        load_backbone(tmp_path / "nope.pt")
    torch.save({"optimizer": {"lr": 0.1}}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="unrecognised"):
        load_backbone(tmp_path / "odd.pt")


def test_export_refuses_incomplete_trunk(tmp_path: Path) -> None:
    sd = dict(_trunk("resnet18").state_dict())
    del sd["layer4.1.conv2.weight"]
    with pytest.raises(CheckpointError, match=r"layer4\.1\.conv2\.weight"):
        export_trunk(sd, "torchvision", tmp_path / "t.pth")
    assert not (tmp_path / "t.pth").exists()
    sd = dict(_trunk("resnet18").state_dict())
    sd["layer3.0.bn2.weight"] = torch.ones(7)
    with pytest.raises(CheckpointError, match=r"layer3\.0\.bn2\.weight \(7,\)"):
        export_trunk(sd, "torchvision", tmp_path / "t.pth")
