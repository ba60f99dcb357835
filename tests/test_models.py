"""Trunk, heads and whole models: shapes, the jigsaw head's order dependence, stage features."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pirl.config import Config
from pirl.methods import build_model
from pirl.methods.jigsaw import JigsawClassifier
from pirl.methods.pirl import ImageHead, JigsawHead, RotationHead
from pirl.trunk import STAGES, build_trunk, stage_dim, stage_features, trunk_dim

B, S, PATCH, D = 2, 16, 8, 16


def _cfg(method: str, pretext: str = "jigsaw") -> Config:
    cfg = Config()
    cfg.model.arch = "resnet18"
    cfg.model.small_stem = True
    cfg.model.embed_dim = D
    cfg.objective.method = method
    cfg.objective.pretext = pretext
    cfg.objective.num_permutations = 10
    return cfg


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(B, 3, S, S, generator=g),
        "rotated": torch.randn(B, 3, S, S, generator=g),
        "patches": torch.randn(B, 9, 3, PATCH, PATCH, generator=g),
    }


# ---------------------------------------------------------------------------------------- trunk


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_trunk_dim_matches_forward(arch: str, dim: int) -> None:
    with torch.device("meta"):  # shapes only: no memory, no compute
        trunk = build_trunk(arch, small_stem=False)
        out = trunk(torch.empty(2, 3, 64, 64))
    assert trunk_dim(arch) == dim
    assert tuple(out.shape) == (2, dim)
    assert isinstance(trunk.fc, nn.Identity)


def test_small_stem_layout() -> None:
    trunk = build_trunk("resnet18", small_stem=True)
    assert tuple(trunk.conv1.weight.shape) == (64, 3, 3, 3)
    assert trunk.conv1.stride == (1, 1) and trunk.conv1.bias is None
    assert isinstance(trunk.maxpool, nn.Identity)
    # Same key set as torchvision's (only the conv1 shape differs), so exports need no renaming.
    import torchvision

    ref = torchvision.models.resnet18().state_dict()
    assert set(trunk.state_dict()) == set(ref) - {"fc.weight", "fc.bias"}


def test_unknown_arch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="resnet101"):
        build_trunk("resnet101", False)


def test_stage_features_shapes_small_stem() -> None:
    trunk = build_trunk("resnet18", small_stem=True).eval()
    x = torch.randn(B, 3, 32, 32)
    feats = stage_features(trunk, x, STAGES)
    # small stem: no downsampling before res2; res3..res5 halve each time.
    expected = {"conv1": (64, 32), "res2": (64, 32), "res3": (128, 16), "res4": (256, 8),
                "res5": (512, 4)}
    for name, (c, side) in expected.items():
        assert tuple(feats[name].shape) == (B, c, side, side), name
        assert stage_dim("resnet18", name) == c
    # the pooled trunk output is res5 average-pooled
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), feats["res5"].mean(dim=(2, 3)))


def test_stage_features_shapes_resnet50_imagenet_stem() -> None:
    with torch.device("meta"):
        trunk = build_trunk("resnet50", small_stem=False)
        feats = stage_features(trunk, torch.empty(B, 3, 64, 64), ["res5", "conv1", "res3"])
    assert set(feats) == {"conv1", "res3", "res5"}
    assert tuple(feats["conv1"].shape) == (B, 64, 16, 16)  # conv stride 2 + max-pool stride 2
    assert tuple(feats["res3"].shape) == (B, 512, 8, 8)
    assert tuple(feats["res5"].shape) == (B, 2048, 2, 2)
    assert stage_dim("resnet50", "res4") == 1024


def test_stage_features_stops_at_deepest_requested_stage() -> None:
    trunk = build_trunk("resnet18", small_stem=True)
    called: list[str] = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(trunk, name).register_forward_hook(lambda m, i, o, n=name: called.append(n))
    stage_features(trunk, torch.randn(B, 3, 16, 16), ["res3"])
    assert called == ["layer1", "layer2"]
    with pytest.raises(ValueError, match="res6"):
        stage_features(trunk, torch.randn(B, 3, 16, 16), ["res6"])


# ---------------------------------------------------------------------------------------- heads


def test_head_shapes() -> None:
    c = 512
    assert tuple(ImageHead(c, D)(torch.randn(B, c)).shape) == (B, D)
    assert tuple(RotationHead(c, D)(torch.randn(B, c)).shape) == (B, D)
    g = JigsawHead(c, D, num_patches=9)
    assert tuple(g(torch.randn(B, 9, c)).shape) == (B, D)
    assert tuple(g.patch_fc.weight.shape) == (D, c)  # ONE shared per-patch linear
    assert tuple(g.fuse.weight.shape) == (D, 9 * D)
    assert tuple(JigsawClassifier(c, 10)(torch.randn(B, 9, c)).shape) == (B, 10)
    with pytest.raises(ValueError, match="9"):
        g(torch.randn(B, 8, c))


def test_paper_head_sizes() -> None:
    """The paper: f = 2048 -> 128; g = 9 x shared (2048 -> 128) -> 1152 -> 128."""
    g = JigsawHead(2048, 128, 9)
    assert g.patch_fc.in_features == 2048 and g.patch_fc.out_features == 128
    assert g.fuse.in_features == 1152 and g.fuse.out_features == 128
    f = ImageHead(2048, 128)
    assert f.fc.in_features == 2048 and f.fc.out_features == 128


def test_jigsaw_head_equals_hand_computation() -> None:
    torch.manual_seed(0)
    c, p = 5, 4
    g = JigsawHead(c, D, num_patches=p)
    v = torch.randn(B, p, c)
    w1, b1 = g.patch_fc.weight, g.patch_fc.bias
    w2, b2 = g.fuse.weight, g.fuse.bias
    expected = torch.empty(B, D)
    for i in range(B):
        # each patch k through the same (w1, b1), then concatenated in the given order
        parts = [w1 @ v[i, k] + b1 for k in range(p)]
        expected[i] = w2 @ torch.cat(parts) + b2
    torch.testing.assert_close(g(v), expected)


def test_jigsaw_head_depends_on_patch_order() -> None:
    torch.manual_seed(0)
    g = JigsawHead(7, D, num_patches=9)
    v = torch.randn(B, 9, 7)
    perm = torch.tensor([3, 0, 1, 2, 8, 4, 5, 7, 6])
    assert not torch.allclose(g(v), g(v[:, perm]), atol=1e-4)
    # ... and on nothing else: the same order gives the same output
    torch.testing.assert_close(g(v), g(v.clone()))


# ---------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("pretext", ["jigsaw", "rotation", "jigsaw+rotation"])
def test_pirl_forward_shapes_and_unit_norm(pretext: str) -> None:
    torch.manual_seed(0)
    model = build_model(_cfg("pirl", pretext))
    out = model(_batch())
    assert set(out) == {"z_img", "z_t"}
    for z in out.values():
        assert tuple(z.shape) == (B, D) and z.dtype == torch.float32
        torch.testing.assert_close(z.norm(dim=1), torch.ones(B))
    assert isinstance(model.g, RotationHead if pretext == "rotation" else JigsawHead)


def test_pirl_runs_two_trunk_passes_in_one_forward() -> None:
    """Image and transformed view are separate trunk calls inside forward (BN stats per call;
    DDP sees both).  Each train-mode BN layer counts one step per call."""
    model = build_model(_cfg("pirl", "jigsaw")).train()
    calls: list[tuple[int, ...]] = []
    model.trunk.conv1.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    model(_batch())
    assert calls == [(B, 3, S, S), (B * 9, 3, PATCH, PATCH)]
    assert int(model.trunk.bn1.num_batches_tracked) == 2


def _bn_running_stats(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
            for t in (m.running_mean, m.running_var)]


@pytest.mark.parametrize("bn_stats", ["image", "all"])
def test_bn_running_stats_come_from_the_configured_views(bn_stats: str) -> None:
    """bn_stats=image: after a train-mode forward the running statistics equal those of a trunk
    that saw the image batch alone, and momenta are restored; all: the patches move them too."""
    cfg = _cfg("pirl", "jigsaw")
    cfg.model.bn_stats = bn_stats
    torch.manual_seed(0)
    model = build_model(cfg).train()
    image_only = build_trunk("resnet18", small_stem=True).train()
    image_only.load_state_dict(model.trunk.state_dict())
    batch = _batch()
    model(batch)
    image_only(batch["image"])
    same = [torch.allclose(a, b) for a, b in zip(_bn_running_stats(model.trunk),
                                                 _bn_running_stats(image_only), strict=True)]
    assert all(same) if bn_stats == "image" else not any(same)
    assert {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}


def test_bn_stats_option_does_not_change_the_training_outputs() -> None:
    """Train-mode BN normalises with batch statistics, so z_img and z_t are identical."""
    outs = []
    for bn_stats in ("image", "all"):
        cfg = _cfg("pirl", "jigsaw")
        cfg.model.bn_stats = bn_stats
        torch.manual_seed(0)
        outs.append(build_model(cfg).train()(_batch()))
    for key in ("z_img", "z_t"):
        torch.testing.assert_close(outs[0][key], outs[1][key])


def test_pirl_gradients_reach_trunk_from_each_branch() -> None:
    for key in ("z_img", "z_t"):
        model = build_model(_cfg("pirl", "jigsaw"))
        (model(_batch())[key] * torch.randn(B, D)).sum().backward()
        assert model.trunk.conv1.weight.grad is not None
        assert model.trunk.conv1.weight.grad.abs().sum() > 0
        other = model.g if key == "z_img" else model.f
        assert all(p.grad is None for p in other.parameters())


def test_pirl_patch_order_changes_z_t_only() -> None:
    model = build_model(_cfg("pirl", "jigsaw")).eval()
    batch = _batch()
    shuffled = dict(batch, patches=batch["patches"][:, torch.tensor([8, 7, 6, 5, 4, 3, 2, 1, 0])])
    with torch.no_grad():
        a, b = model(batch), model(shuffled)
    torch.testing.assert_close(a["z_img"], b["z_img"])
    assert not torch.allclose(a["z_t"], b["z_t"], atol=1e-5)


def test_npid_forward() -> None:
    model = build_model(_cfg("npid"))
    out = model({"image": _batch()["image"]})
    assert set(out) == {"z_img"} and tuple(out["z_img"].shape) == (B, D)
    torch.testing.assert_close(out["z_img"].norm(dim=1), torch.ones(B))


def test_jigsaw_baseline_forward() -> None:
    cfg = _cfg("jigsaw")
    cfg.objective.num_permutations = 7  # one class per permutation of the set
    out = build_model(cfg)({"patches": _batch()["patches"]})
    assert set(out) == {"logits"} and tuple(out["logits"].shape) == (B, 7)
    assert tuple(build_model(_cfg("jigsaw"))(_batch())["logits"].shape) == (B, 10)


def test_rotation_baseline_forward() -> None:
    model = build_model(_cfg("rotation"))
    out = model({"rotated": _batch()["rotated"]})
    assert set(out) == {"logits"} and tuple(out["logits"].shape) == (B, 4)


@pytest.mark.parametrize("method", ["pirl", "npid", "jigsaw", "rotation"])
def test_every_model_has_a_resnet_trunk(method: str) -> None:
    from torchvision.models import ResNet

    assert isinstance(build_model(_cfg(method)).trunk, ResNet)


def test_missing_batch_key_names_the_key() -> None:
    model = build_model(_cfg("pirl", "rotation"))
    with pytest.raises(KeyError, match="rotated"):
        model({"image": _batch()["image"]})
