"""Every evaluation protocol end to end on tiny real data (Imagenette-96 val images, 32 px views,
ResNet-18), plus the properties the protocols promise: cached features equal fresh ones, the
linear probe leaves the trunk unchanged (and says so when it does not), fine-tuning leaves the
caller's trunk alone, the invariance PNG overlays two checkpoints."""

from __future__ import annotations

import argparse
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import IMAGENETTE_DIR

from pirl.config import Config, to_dict
from pirl.data.datasets import open_source
from pirl.evaluate import features as feat_mod
from pirl.evaluate import linear as linear_mod
from pirl.evaluate.cli import add_eval_parser
from pirl.evaluate.features import (
    EvalSettings,
    eval_view,
    extract_features,
    trunk_fingerprint,
)
from pirl.evaluate.finetune import run_finetune
from pirl.evaluate.invariance import run_invariance
from pirl.evaluate.knn import run_knn
from pirl.evaluate.linear import TrunkChangedError, run_linear
from pirl.evaluate.loading import load_eval_model
from pirl.evaluate.neighbors import run_neighbors
from pirl.evaluate.svm import run_svm
from pirl.methods import build_model
from pirl.presets import view_preset
from pirl.trunk import build_trunk

VAL_TAR = IMAGENETTE_DIR / "val.tar"
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 4  # 10 classes: 80 train + 40 val images


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two disjoint ImageFolder splits cut from Imagenette-96's val archive."""
    if not VAL_TAR.is_file():
        pytest.skip(f"{VAL_TAR} not found")
    root = tmp_path_factory.mktemp("imagenette")
    taken: dict[str, int] = defaultdict(int)
    with tarfile.open(VAL_TAR) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith(".jpg")),
                         key=lambda m: m.name)
        for m in members:
            wnid = m.name.split("/")[-2]
            n = taken[wnid]
            if n >= TRAIN_PER_CLASS + VAL_PER_CLASS:
                continue
            split = "train" if n < TRAIN_PER_CLASS else "val"
            dest = root / split / wnid / Path(m.name).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            dest.write_bytes(src.read())
            taken[wnid] += 1
    return str(root / "train"), str(root / "val")


@pytest.fixture(scope="module")
def views() -> object:
    cfg = Config()
    for k, v in view_preset(32).items():
        setattr(cfg.views, k, v)
    return cfg.views


def _settings(cache: Path | None) -> EvalSettings:
    return EvalSettings(device=torch.device("cpu"), batch_size=32, workers=0, quiet=True,
                        cache_dir=str(cache) if cache else None)


def _trunk(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_trunk("resnet18", small_stem=False).eval()


def test_features_cached_equal_fresh_and_keyed_by_weights(splits, views, tmp_path,
                                                          monkeypatch) -> None:
    train = open_source(splits[0])
    trunk = _trunk()
    s = _settings(tmp_path)
    first = extract_features(trunk, train, ["res3", "res5"], eval_view(views), s)
    assert first["res5"].feats.shape == (len(train), 512)
    assert first["res3"].feats.shape[0] == len(train)
    assert len(list(tmp_path.glob("*.pt"))) == 2
    # res5 = the trunk's own pooled output (float16 storage: ~3 significant digits)
    from pirl.data.views import build_eval_transform, normalize
    t = build_eval_transform(views)
    x = normalize(torch.stack([t(train.load(i)) for i in range(4)]))
    with torch.no_grad():
        torch.testing.assert_close(first["res5"].feats[:4], trunk(x), rtol=2e-3, atol=2e-3)
    assert first["res5"].labels.tolist() == train.targets

    # A second call must be served from the cache: the trunk is never run.
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("stage_features called despite a cache hit")

    monkeypatch.setattr(feat_mod, "stage_features", boom)
    again = extract_features(trunk, train, ["res5", "res3"], eval_view(views), s)
    assert torch.equal(again["res5"].feats, first["res5"].feats)
    # Different weights -> different key -> recomputed (and here: the patched trunk pass fails).
    with torch.no_grad():
        trunk.fc = torch.nn.Identity()
        next(trunk.parameters()).add_(1.0)
    with pytest.raises(AssertionError, match="cache hit"):
        extract_features(trunk, train, ["res5"], eval_view(views), s)


def test_knn_protocol(splits, views, tmp_path) -> None:
    train, val = open_source(splits[0]), open_source(splits[1])
    r = run_knn(_trunk(), train, val, views, _settings(tmp_path), k=200)
    assert r["k"] == len(train)  # k capped at the 80 training images
    assert 0 <= r["top1"] <= r["top5"] <= 100 and r["num_val"] == len(val)
    # deterministic: same numbers again (from the cache)
    assert run_knn(_trunk(), train, val, views, _settings(tmp_path), k=200) == r


def test_linear_probe_leaves_trunk_unchanged(splits, views, tmp_path) -> None:
    train, val = open_source(splits[0]), open_source(splits[1])
    trunk = _trunk()
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    r = run_linear(trunk, train, val, views, _settings(tmp_path), stages=["conv1", "res5"],
                   epochs=3, aug_copies=2)
    assert r["trunk_unchanged"] and set(r["layers"]) == {"conv1", "res5"}
    assert r["best_layer"] in r["layers"] and r["milestones"] == [1, 2]
    for k, v in trunk.state_dict().items():
        assert torch.equal(v, before[k]), k
    # conv1 is pooled to 12x12 cells (capped at its 8x8 map on 32 px input): 64 x 8 x 8
    assert r["layers"]["conv1"]["dim"] == 64 * 8 * 8 and r["layers"]["res5"]["dim"] == 512
    assert r["aug_copies"] == 2
    # two augmented copies were cached (+ val): the copies differ (different random crops)
    assert len(list(tmp_path.glob("res5-*.pt"))) == 3


def test_linear_probe_detects_a_changed_trunk(splits, views, monkeypatch) -> None:
    train, val = open_source(splits[0]), open_source(splits[1])
    trunk = _trunk()
    real = linear_mod.train_linear_head

    def sneaky(*args: object, **kwargs: object) -> dict:
        with torch.no_grad():
            trunk.bn1.running_mean.add_(0.5)  # what a probe with BN in train mode would do
        return real(*args, **kwargs)

    monkeypatch.setattr(linear_mod, "train_linear_head", sneaky)
    with pytest.raises(TrunkChangedError, match="changed"):
        run_linear(trunk, train, val, views, _settings(None), epochs=1, aug_copies=1)


def test_svm_protocol(splits, views, tmp_path) -> None:
    train, val = open_source(splits[0]), open_source(splits[1])
    r = run_svm(_trunk(), train, val, views, _settings(tmp_path), costs=(0.1, 10.0), folds=2)
    assert 0 <= r["mAP"] <= 100 and 0 <= r["top1"] <= 100
    assert set(r["cost_per_class"].values()) <= {0.1, 10.0}
    assert len(r["ap_per_class"]) == 10


def test_finetune_protocol(splits, views) -> None:
    train, val = open_source(splits[0]), open_source(splits[1])
    trunk = _trunk()
    before = trunk_fingerprint(trunk)
    r = run_finetune(trunk, train, val, views, _settings(None), fraction=0.25, epochs=2,
                     batch_size=8)
    # 25% of 80 images over 10 classes = 2 per class
    assert r["subset_size"] == 20 and set(r["per_class"].values()) == {2}
    assert 0 <= r["top1"] <= r["top5"] <= 100 and r["num_val"] == len(val)
    assert trunk_fingerprint(trunk) == before  # the caller's trunk is not the one trained


def _pirl_checkpoint(path: Path) -> Path:
    return _method_checkpoint(path, "pirl", seed=1)


def test_invariance_overlays_two_checkpoints(splits, views, tmp_path) -> None:
    val = open_source(splits[1])
    pirl_ckpt = _pirl_checkpoint(tmp_path / "pirl.pt")
    trunk_file = tmp_path / "trunk.pt"
    torch.save(_trunk(2).state_dict(), trunk_file)
    models = [load_eval_model(str(pirl_ckpt), name="pirl"),
              load_eval_model(str(trunk_file), name="other")]
    assert models[0].full is not None and models[1].full is None
    png = tmp_path / "out" / "inv.png"
    r = run_invariance(models, val, views, _settings(None), out_png=png)
    assert png.is_file() and png.stat().st_size > 5000
    pirl, other = r["models"]["pirl"], r["models"]["other"]
    for summary in (pirl["trunk"], pirl["heads"], other["trunk"]):
        assert summary["n"] == len(val) and 0 <= summary["mean"] <= 2
        assert sum(summary["histogram"]) == len(val)
    assert other["heads"] is None
    # same seed -> identical jigsaw views -> identical distances
    again = run_invariance(models[1:], val, views, _settings(None))
    assert again["models"]["other"]["trunk"]["mean"] == pytest.approx(other["trunk"]["mean"])


def test_invariance_distance_by_hand_for_one_image(splits, views) -> None:
    """Recompute one image's trunk distance from its definition."""
    import torch.nn.functional as F

    from pirl.data.views import normalize
    from pirl.evaluate.features import item_seed, seeded_rng
    from pirl.evaluate.invariance import InvarianceView, invariance_distances
    from pirl.evaluate.loading import EvalModel

    val = open_source(splits[1])
    trunk = _trunk(3)
    d = invariance_distances(EvalModel("t", "random", trunk), val, views, _settings(None))
    with seeded_rng(item_seed(0, 0, 5)):
        item = InvarianceView(views, None)(val.load(5))
    with torch.no_grad():
        a = F.normalize(trunk(normalize(item["image"][None])), dim=1)
        b = F.normalize(trunk(normalize(item["patches"])).mean(0, keepdim=True), dim=1)
    assert d["trunk"][5].item() == pytest.approx((a - b).norm().item(), abs=1e-4)


def test_neighbors_protocol(splits, views, tmp_path) -> None:
    train, val = open_source(splits[0]), open_source(splits[1])
    png = tmp_path / "nn.png"
    r = run_neighbors(_trunk(), train, val, views, _settings(None), out_png=png,
                      num_queries=3, k=4)
    assert png.is_file() and len(r["queries"]) == 3
    for q in r["queries"]:
        sims = [n["similarity"] for n in q["neighbors"]]
        assert len(sims) == 4 and sims == sorted(sims, reverse=True)
    assert 0 <= r["precision_at_k"] <= 100


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pirl")
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_knn_and_invariance_write_json_and_png(splits, tmp_path, capsys) -> None:
    common = ["--val-data", splits[1], "--out", str(tmp_path / "o"), "--image-size", "32",
              "--workers", "0", "--batch-size", "40", "--quiet", "--no-cache"]
    args = _parser().parse_args(["eval", "knn", "--checkpoint", "random", "--arch", "resnet18",
                                 "--train-data", splits[0], "--k", "10", *common])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| top-1 | top-5 |" in out
    result = json.loads((tmp_path / "o" / "knn.json").read_text())
    assert result["k"] == 10 and result["meta"]["views"]["image_size"] == 32
    # --checkpoint random is seeded (--seed): the same baseline every time
    assert args.func(args) == 0
    again = json.loads((tmp_path / "o" / "knn.json").read_text())
    assert again["meta"]["trunk_hash"] == result["meta"]["trunk_hash"]
    assert again["top1"] == result["top1"]

    pirl_ckpt = _pirl_checkpoint(tmp_path / "a.pt")
    args = _parser().parse_args(["eval", "invariance", "--checkpoint", str(pirl_ckpt),
                                 "--checkpoint", "random", "--arch", "resnet18", *common])
    assert args.func(args) == 0
    result = json.loads((tmp_path / "o" / "invariance.json").read_text())
    assert set(result["models"]) == {"a.pt", "random"}
    assert (tmp_path / "o" / "invariance.png").is_file()


def test_cli_rejects_bad_input(splits, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    base = ["--train-data", splits[0], "--val-data", splits[1], "--out", str(tmp_path),
            "--quiet", "--no-cache"]
    for argv in (["--checkpoint", str(bad)], ["--checkpoint", "random"],
                 ["--checkpoint", str(tmp_path / "missing.pt")],
                 ["--checkpoint", "random", "--arch", "resnet18", "--checkpoint", "random"]):
        args = _parser().parse_args(["eval", "knn", *argv, *base])
        assert args.func(args) == 2, argv
    assert "error" in capsys.readouterr().err


def _method_checkpoint(path: Path, method: str, seed: int = 4) -> Path:
    """A checkpoint as ``pirl pretrain --method METHOD`` writes it (random weights)."""
    cfg = Config()
    cfg.model.arch, cfg.objective.method = "resnet18", method
    cfg.objective.num_permutations = 10
    for k, v in view_preset(32).items():
        setattr(cfg.views, k, v)
    torch.manual_seed(seed)
    model = build_model(cfg)
    torch.save({"format": "pirl", "version": 1, "config": to_dict(cfg),
                "model": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("method", ["pirl", "npid", "jigsaw", "rotation"])
def test_every_method_loads_into_every_protocol_cli(method, splits, tmp_path, capsys) -> None:
    """Issue 4: a checkpoint of each method goes through all six ``pirl eval`` commands, and
    every protocol evaluates the same trunk weights (the fingerprint in each JSON)."""
    ckpt = str(_method_checkpoint(tmp_path / f"{method}.pt", method))
    common = ["--val-data", splits[1], "--image-size", "32", "--workers", "0", "--quiet",
              "--no-cache"]
    train = ["--train-data", splits[0]]
    runs = {
        "knn": [*train, "--k", "5"],
        "linear": [*train, "--epochs", "1", "--layers", "res5"],
        "svm": [*train, "--costs", "1", "--folds", "2"],
        "finetune": [*train, "--epochs", "1", "--fraction", "0.25"],
        "neighbors": train,
        "invariance": [],
    }
    for proto, extra in runs.items():
        out = tmp_path / proto
        args = _parser().parse_args(["eval", proto, "--checkpoint", ckpt, *common, *extra,
                                     "--out", str(out)])
        assert args.func(args) == 0, proto
        result = json.loads((out / f"{proto}.json").read_text())
        assert result["protocol"] == proto
    inv = json.loads((tmp_path / "invariance" / "invariance.json").read_text())
    heads = inv["models"][f"{method}.pt"]["heads"]
    assert (heads is not None) == (method == "pirl")  # f-g distance only for PIRL models
    capsys.readouterr()
