"""The streaming linear probe and PIRL-ens (``--concat``).

* streaming and cached probes agree on real images (Imagenette-96, 32 px, ResNet-18), and their
  standardisation statistics agree;
* the streaming probe's peak memory does not grow with the dataset (4x the images), while the
  cached probe's does;
* an interrupted streaming run resumes to the same heads as an uninterrupted one;
* the frozen-trunk check;
* concatenated features of two trunks (dims add up; kNN, SVM and linear run on them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import IMAGENETTE_DIR
from torchvision.models.resnet import BasicBlock, ResNet

from pirl.data.datasets import open_source
from pirl.data.synthetic import SyntheticSource
from pirl.evaluate import linear_stream as ls
from pirl.evaluate.cli import add_eval_parser, scaled_views
from pirl.evaluate.ensemble import TrunkEnsemble
from pirl.evaluate.features import EvalSettings, augmented_view, eval_view, extract_features
from pirl.evaluate.knn import run_knn
from pirl.evaluate.linear import TrunkChangedError, run_linear
from pirl.evaluate.linear_mode import cached_feature_bytes, choose_mode
from pirl.trunk import build_trunk

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    """One intra-op thread: these tiny forwards gain nothing from more, and on a shared machine
    OpenMP threads spinning against other processes make them several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _settings(cache: Path | None = None, batch: int = 100) -> EvalSettings:
    return EvalSettings(device=torch.device("cpu"), batch_size=batch, workers=0, quiet=True,
                        cache_dir=str(cache) if cache else None)


def _tiny_trunk(seed: int = 0) -> torch.nn.Module:
    """A one-block-per-stage ResNet (the trunk interface, a fraction of ResNet-18's compute)."""
    torch.manual_seed(seed)
    net = ResNet(BasicBlock, [1, 1, 1, 1])
    net.fc = torch.nn.Identity()  # type: ignore[assignment]
    return net.eval()


def _cut(tar_path: Path, dest: Path, per_class: int) -> str:
    """An ImageFolder of the first ``per_class`` images (by name) of each class of a tar."""
    taken: dict[str, int] = defaultdict(int)
    with tarfile.open(tar_path) as tar:
        for m in sorted((m for m in tar.getmembers() if m.name.endswith(".jpg")),
                        key=lambda m: m.name):
            wnid = m.name.split("/")[-2]
            if taken[wnid] >= per_class:
                continue
            out = dest / wnid / Path(m.name).name
            out.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            out.write_bytes(src.read())
            taken[wnid] += 1
    return str(dest)


@pytest.fixture(scope="module")
def real_splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """200 training images (20 per class of train.tar) and 100 val images (10 per class)."""
    if not (IMAGENETTE_DIR / "train.tar").is_file():
        pytest.skip(f"{IMAGENETTE_DIR} not found")
    root = tmp_path_factory.mktemp("imagenette-stream")
    return (_cut(IMAGENETTE_DIR / "train.tar", root / "train", 20),
            _cut(IMAGENETTE_DIR / "val.tar", root / "val", 10))


@pytest.fixture(scope="module")
def small_splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """40 training images (4 per class of train.tar) and 20 val images (2 per class)."""
    if not (IMAGENETTE_DIR / "train.tar").is_file():
        pytest.skip(f"{IMAGENETTE_DIR} not found")
    root = tmp_path_factory.mktemp("imagenette-small")
    return (_cut(IMAGENETTE_DIR / "train.tar", root / "train", 4),
            _cut(IMAGENETTE_DIR / "val.tar", root / "val", 2))


def test_stream_agrees_with_cached_on_real_images(real_splits, tmp_path) -> None:
    """Same augmented images (aug_copies = epochs), shuffle, init and schedule: the two modes
    differ only by the cached mode's float16 storage, so accuracy agrees to within 2 val images
    (2 points) and the final losses to 0.1%.  Both beat chance (10 classes: 10%)."""
    train, val = open_source(real_splits[0]), open_source(real_splits[1])
    views = scaled_views(32)
    stages, epochs = ["res3", "res4"], 2  # res4 is the deepest: layer4 never runs
    torch.manual_seed(0)
    trunk = build_trunk("resnet18").eval()
    kw = {"stages": stages, "epochs": epochs, "batch_size": 32, "seed": 0}
    cached = run_linear(trunk, train, val, views, _settings(tmp_path / "cache"),
                        aug_copies=epochs, **kw)
    stream = ls.run_linear_stream(trunk, train, val, views, _settings(), out=tmp_path / "s",
                                  **kw)
    assert stream["mode"] == "stream" and stream["trunk_unchanged"]
    assert stream["stat_images"] == len(train)
    for s in stages:
        a, b = cached["layers"][s], stream["layers"][s]
        print(f"{s}: cached top-1 {a['top1']:.1f} loss {a['final_loss']:.5f}, "
              f"stream top-1 {b['top1']:.1f} loss {b['final_loss']:.5f}")
        assert a["dim"] == b["dim"]
        assert abs(a["top1"] - b["top1"]) <= 2.0, (s, a, b)
        assert abs(a["final_loss"] - b["final_loss"]) <= 1e-3 * a["final_loss"], (s, a, b)
        assert a["top1"] > 10 and b["top1"] > 10, (s, a, b)
    # The frozen statistics are the cached mode's: mean / std of augmented copy 0 (from cache).
    copy0 = extract_features(trunk, train, stages, augmented_view(views, 0, 0),
                             _settings(tmp_path / "cache"))
    heads = torch.load(tmp_path / "s" / ls.CHECKPOINT, weights_only=True)["heads"]
    for s in stages:
        f = copy0[s].feats
        var = f.var(0)
        std = (var + 0.01 * var.mean()).sqrt()
        torch.testing.assert_close(heads[f"mean_{s}"], f.mean(0), rtol=0, atol=2e-3 * std.max())
        torch.testing.assert_close(heads[f"std_{s}"], std, rtol=1e-2, atol=1e-4)


MEMORY_SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, sys.argv[1])
from torchvision.models.resnet import BasicBlock, ResNet
from pirl.data.synthetic import SyntheticSource
from pirl.evaluate.cli import scaled_views
from pirl.evaluate.features import EvalSettings
from pirl.evaluate.linear import run_linear
from pirl.evaluate.linear_stream import run_linear_stream

def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

def probe(mode, n):
    torch.set_num_threads(1)
    train = SyntheticSource("train", n=n, size=32)
    val = SyntheticSource("val", n=50, size=32)
    torch.manual_seed(0)
    trunk, views = ResNet(BasicBlock, [1, 1, 1, 1]).eval(), scaled_views(32)
    settings = EvalSettings(device=torch.device("cpu"), batch_size=64, workers=0, quiet=True,
                            cache_dir=None)
    kw = dict(stages=["conv1"], epochs=1, batch_size=64, seed=0)
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: the peak of what follows
    base = kb("VmRSS")
    if mode == "stream":
        run_linear_stream(trunk, train, val, views, settings, stat_images=128, **kw)
    else:
        run_linear(trunk, train, val, views, settings, aug_copies=1, **kw)
    return kb("VmHWM") - base

# One interpreter imports torch once; each probe runs in a fork of it that has run nothing yet,
# so no probe inherits another's freed-but-resident heap.
for job in sys.argv[2:]:
    mode, n = job.split(":")
    r, w = os.pipe()
    if os.fork() == 0:
        os.write(w, str(probe(mode, int(n))).encode())
        os._exit(0)
    os.close(w)
    print(job, os.read(r, 64).decode(), flush=True)
    os.wait()
"""


def test_stream_memory_is_flat_in_the_dataset_size() -> None:
    """conv1 at 32 px (only the stem runs): 64 x 8^2 = 4,096 values per image.  300 -> 1,200
    synthetic images: the cached probe's peak grows by ~900 x 4,096 x 6 B (float32 + float16
    chunks) ~ 22 MB; the streaming probe's must stay within 1.2x + 8 MB of its 1x peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("cannot reset the peak-RSS counter (/proc/self/clear_refs)")
    jobs = ["stream:300", "stream:1200", "cached:300", "cached:1200"]
    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(ROOT), *jobs],
                       capture_output=True, text=True, check=True, cwd=ROOT)
    peak = dict(line.split() for line in r.stdout.splitlines())  # job -> kB of peak growth
    s1, s4, c1, c4 = (int(peak[j]) for j in jobs)
    print(f"peak RSS growth, kB: stream {s1} -> {s4}, cached {c1} -> {c4}")
    assert s4 <= 1.2 * s1 + 8 * 1024, (s1, s4)
    extra = 900 * 4096 * 4  # the float32 features alone, bytes
    assert c4 - c1 >= 0.8 * extra / 1024, (c1, c4)


def _small_run(out: Path, **kw: object) -> dict:
    train, val = SyntheticSource("train", n=64, size=16), SyntheticSource("val", n=20, size=16)
    args: dict = {"stages": ["res3", "res5"], "epochs": 3, "batch_size": 32, **kw}
    return ls.run_linear_stream(_tiny_trunk(), train, val, scaled_views(16), _settings(batch=48),
                                out=out, **args)


def test_interrupted_stream_resumes_to_the_same_heads(tmp_path, monkeypatch) -> None:
    whole = _small_run(tmp_path / "a")
    real, calls = ls._train_epoch, []

    def crash_third(*args: object, **kwargs: object) -> dict:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ls, "_train_epoch", crash_third)
    with pytest.raises(KeyboardInterrupt):
        _small_run(tmp_path / "b")
    assert torch.load(tmp_path / "b" / ls.CHECKPOINT, weights_only=True)["epoch"] == 2
    monkeypatch.setattr(ls, "_train_epoch", real)
    resumed = _small_run(tmp_path / "b")
    assert resumed["resumed_at_epoch"] == 2 and whole["resumed_at_epoch"] == 0
    a = torch.load(tmp_path / "a" / ls.CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "b" / ls.CHECKPOINT, weights_only=True)
    for k, v in a["heads"].items():
        assert torch.equal(v, b["heads"][k]), k
    assert torch.equal(a["generator"], b["generator"])
    assert resumed["layers"] == whole["layers"]
    # a finished run only re-evaluates; other settings refuse the checkpoint
    assert _small_run(tmp_path / "a")["layers"] == whole["layers"]
    with pytest.raises(ValueError, match="other settings"):
        _small_run(tmp_path / "a", seed=1)


def test_stream_detects_a_changed_trunk(monkeypatch, tmp_path) -> None:
    real = ls._train_epoch

    def sneaky(model, opt, loader, trunk, *args: object, **kwargs: object) -> dict:
        with torch.no_grad():
            trunk.bn1.running_mean.add_(0.5)  # what a trunk left in train mode would do
        return real(model, opt, loader, trunk, *args, **kwargs)

    monkeypatch.setattr(ls, "_train_epoch", sneaky)
    with pytest.raises(TrunkChangedError, match="changed"):
        _small_run(tmp_path, epochs=1)


def test_mode_choice() -> None:
    assert choose_mode(True, None, 0)[0] == "stream"
    assert choose_mode(False, 1.0, 2 * 2**30) == ("stream", "cached features need ~2.00 GB > "
                                                  "--memory-budget 1 GB (1.00 GB)")
    assert choose_mode(False, 4.0, 2 * 2**30)[0] == "cached"
    assert choose_mode(False, None, 1024)[0] == "cached"  # half the RAM holds 1 kB
    # with a disk cache only one training copy is held at a time
    dims = {"res5": 512, "res4": 9216}
    assert cached_feature_bytes(100, 10, 5, dims, True) == 110 * 9728 * 4
    assert cached_feature_bytes(100, 10, 5, dims, False) == 510 * 9728 * 4


def test_concat_features_add_up_and_knn_runs(tmp_path) -> None:
    train, val = SyntheticSource("train", n=60, size=16), SyntheticSource("val", n=30, size=16)
    views = scaled_views(16)
    a, b = _tiny_trunk(0), _tiny_trunk(1)
    ens = TrunkEnsemble([a, b])
    s = _settings(tmp_path)
    both = extract_features(ens, train, ["res4", "res5"], eval_view(views), s)
    alone = [extract_features(t, train, ["res4", "res5"], eval_view(views), s) for t in (a, b)]
    for st in ("res4", "res5"):
        assert both[st].feats.shape[1] == sum(x[st].feats.shape[1] for x in alone)
        torch.testing.assert_close(both[st].feats,
                                   torch.cat([x[st].feats for x in alone], dim=1))
    r = run_knn(ens, train, val, views, s, k=10)
    assert 0 <= r["top1"] <= 100 and r["num_train"] == 60
    # the stream pools each member per batch the same way
    x = torch.randn(2, 3, 16, 16)
    f = ls.pooled_batch(ens, x, ["res5"], bf16=False)["res5"]
    assert f.shape == (2, 1024)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pirl")
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_concat_and_stream(small_splits, tmp_path, capsys) -> None:
    two = ["--checkpoint", "random", "--checkpoint", "random", "--arch", "resnet18"]
    common = ["--train-data", small_splits[0], "--val-data", small_splits[1], "--image-size", "32",
              "--workers", "0", "--quiet", "--cache-dir", str(tmp_path / "cache")]
    # several checkpoints without --concat: one-line error, exit 2
    assert _cli(["eval", "knn", *two, *common, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--concat" in err and len(err.splitlines()) == 1
    assert _cli(["eval", "knn", *two, "--concat", *common, "--k", "20",
                 "--out", str(tmp_path / "k")]) == 0
    knn = json.loads((tmp_path / "k" / "knn.json").read_text())
    assert knn["meta"]["checkpoint"] == ["random", "random"] and len(knn["meta"]["trunk_hash"]) == 2
    assert _cli(["eval", "svm", *two, "--concat", *common, "--costs", "1", "--folds", "2",
                 "--out", str(tmp_path / "v")]) == 0
    # a tiny budget switches the linear probe to streaming, and it says so
    assert _cli(["eval", "linear", *two, "--concat", *common, "--epochs", "1",
                 "--memory-budget", "0.0001", "--out", str(tmp_path / "l")]) == 0
    out = capsys.readouterr()
    assert "stream mode (cached features need" in out.err and "| res5" in out.out
    lin = json.loads((tmp_path / "l" / "linear.json").read_text())
    assert lin["mode"] == "stream" and lin["layers"]["res5"]["dim"] == 1024
    assert (tmp_path / "l" / ls.CHECKPOINT).is_file()
    # the cached probe on the same concatenation (members' features from the knn/svm cache)
    assert _cli(["eval", "linear", *two, "--concat", *common, "--epochs", "1",
                 "--out", str(tmp_path / "c")]) == 0
    assert "cached mode" in capsys.readouterr().err
    lin = json.loads((tmp_path / "c" / "linear.json").read_text())
    assert lin["mode"] == "cached" and lin["layers"]["res5"]["dim"] == 1024


DDP_SCRIPT = r"""
import json, sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
torch.set_num_threads(1)
from pirl.distributed import setup_distributed
from test_linear_stream import _ddp_run
env = setup_distributed("cpu")
r = _ddp_run(sys.argv[2])
if env.rank == 0:
    print(json.dumps({s: v["top1"] for s, v in r["layers"].items()}))
"""


def _ddp_run(out: str) -> dict:
    """70 images in global batches of 32: the last batch (6) splits 3 / 3 over two ranks."""
    train, val = SyntheticSource("train", n=70, size=16), SyntheticSource("val", n=21, size=16)
    return ls.run_linear_stream(_tiny_trunk(), train, val, scaled_views(16), _settings(batch=16),
                                stages=["res3", "res5"], epochs=2, batch_size=32, out=out)


def test_ddp_on_two_cpu_ranks_matches_one_process(tmp_path) -> None:
    """torchrun, gloo: sharded batches + DDP-averaged head gradients give the single-process
    heads (up to float summation order) and the same val accuracy (val sharded 10 / 11)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip("torchrun not installed beside this interpreter")
    one = _ddp_run(str(tmp_path / "one"))
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "--no-python",
                        sys.executable, "-c", DDP_SCRIPT, str(ROOT), str(tmp_path / "two")],
                       check=True, capture_output=True, text=True, cwd=ROOT, timeout=300)
    a = torch.load(tmp_path / "one" / ls.CHECKPOINT, weights_only=True)["heads"]
    b = torch.load(tmp_path / "two" / ls.CHECKPOINT, weights_only=True)["heads"]
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-5, atol=1e-6)
    two = json.loads(r.stdout.strip().splitlines()[-1])
    assert two == {s: v["top1"] for s, v in one["layers"].items()}
