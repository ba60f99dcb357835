"""Tests of pirl.data: image sources (folder, tar, synthetic), ViewDataset / collate_views and the
dataset checker.  Real images come from the fixtures in conftest.py."""

from __future__ import annotations

import io
import logging
import pickle
import shutil
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import pirl.data.synthetic as synthetic
from pirl.data import (
    BadImageError,
    SyntheticSource,
    ViewDataset,
    check_source,
    collate_views,
    open_source,
)
from pirl.data.datasets import FolderSource, TarSource
from pirl.data.source import to_rgb
from pirl.data.synthetic import CLASSES, render

# ----------------------------------------------------------------------------- helpers


def _png(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(colour: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _pixel(img: Image.Image) -> tuple[int, ...]:
    return tuple(np.asarray(img)[0, 0].tolist())


def _to_tensor(img: Image.Image) -> dict[str, torch.Tensor]:
    """A minimal view transform: PIL -> {"image": uint8 [3,H,W]}."""
    return {"image": torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)}


@pytest.fixture()
def modes_folder(tmp_path: Path) -> Path:
    """DIR/train/<class>/ with one image per colour mode, each of a known colour."""
    root = tmp_path / "ds" / "train"
    (root / "b_modes").mkdir(parents=True)
    (root / "a_plain").mkdir()
    (root / "c_empty").mkdir()
    (root / "a_plain" / "x.JPG").write_bytes(_jpeg((250, 10, 10)))
    (root / "a_plain" / "y.jpeg").write_bytes(_jpeg((10, 250, 10)))
    (root / "a_plain" / "._y.jpg").write_bytes(b"AppleDouble junk")  # hidden: ignored
    (root / "a_plain" / "notes.txt").write_text("not an image")
    d = root / "b_modes"
    (d / "gray.png").write_bytes(_png(Image.new("L", (8, 8), 77)))
    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 0))  # fully transparent blue -> white
    (d / "rgba.png").write_bytes(_png(rgba))
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 12, 34, 56] + [0] * (256 * 3 - 6))
    (d / "pal.PNG").write_bytes(_png(pal))
    (d / "gray16.png").write_bytes(_png(Image.fromarray(np.full((8, 8), 65535, np.uint16))))
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buf, format="TIFF")  # CMYK red
    (d / "cmyk.tif").write_bytes(buf.getvalue())
    return tmp_path / "ds"


# ----------------------------------------------------------------------------- folders


def test_folder_source_layout_and_rgb_conversion(modes_folder: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        src = open_source(str(modes_folder))
    assert isinstance(src, FolderSource)
    assert src.root == modes_folder / "train"  # the lone wrapper folder was descended into
    assert src.classes == ["a_plain", "b_modes"]  # c_empty skipped ...
    assert "c_empty" in caplog.text and "no images" in caplog.text  # ... with a warning
    names = [Path(src.describe(i)).name for i in range(len(src))]
    assert names == ["x.JPG", "y.jpeg", "cmyk.tif", "gray.png", "gray16.png", "pal.PNG",
                     "rgba.png"]
    assert src.targets == [0, 0, 1, 1, 1, 1, 1]
    assert src.ignored == [str(modes_folder / "train" / "a_plain" / "notes.txt")]
    expected = {"gray.png": (77, 77, 77), "rgba.png": (255, 255, 255), "pal.PNG": (12, 34, 56),
                "gray16.png": (255, 255, 255), "cmyk.tif": (255, 0, 0)}
    for i, name in enumerate(names):
        img = src.load(i)
        assert img.mode == "RGB", name
        if name in expected:
            assert _pixel(img) == expected[name], name
    r, g, _ = _pixel(src.load(0))
    assert r > 230 and g < 30  # the red JPEG (lossy, so not exact)


def test_to_rgb_composites_partial_alpha_on_white() -> None:
    img = Image.new("RGBA", (2, 2), (0, 0, 0, 128))  # half-transparent black
    assert _pixel(to_rgb(img)) == (127, 127, 127)
    la = Image.new("LA", (2, 2), (0, 0))
    assert _pixel(to_rgb(la)) == (255, 255, 255)


def test_unlabelled_folder_and_loose_images(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    for k in range(3):
        (tmp_path / f"{k}.png").write_bytes(_png(Image.new("RGB", (4, 4))))
    src = open_source(str(tmp_path))
    assert src.classes == [] and src.targets == [-1, -1, -1]
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "a.png").write_bytes(_png(Image.new("RGB", (4, 4))))
    with caplog.at_level(logging.WARNING):
        src = open_source(str(tmp_path))
    assert src.classes == ["cls"] and len(src) == 1
    assert "3 image(s)" in caplog.text and "ignored" in caplog.text


def test_split_folders_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "cls").mkdir(parents=True)
        (tmp_path / split / "cls" / "a.png").write_bytes(_png(Image.new("RGB", (4, 4))))
    with caplog.at_level(logging.WARNING):
        src = open_source(str(tmp_path))
    assert src.classes == ["train", "val"] and "split folders" in caplog.text


def test_open_source_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        open_source(str(missing))
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images found in .*empty"):
        open_source(str(empty))
    notes = tmp_path / "notes.md"  # (a .txt is read as a list file: tests/test_lists.py)
    notes.write_text("hello")
    with pytest.raises(ValueError, match="neither a folder nor a tar"):
        open_source(str(notes))
    listed = tmp_path / "notes.txt"
    listed.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt:1: no label"):
        open_source(str(listed))
    with pytest.raises(ValueError, match="synthetic:val"):
        open_source("synthetic:test")
    with pytest.raises(IndexError):
        open_source("synthetic:val").load(10_000)


# ----------------------------------------------------------------------------- tar archives


def test_tar_source_matches_folder_and_ignores_unsafe_members(tiny_imagefolder: Path,
                                                              tiny_imagetar: Path,
                                                              tmp_path: Path) -> None:
    folder = open_source(str(tiny_imagefolder))
    tar = open_source(str(tiny_imagetar))
    assert isinstance(tar, TarSource) and tar.root == "train"
    assert len(tar) == len(folder) == 200
    assert tar.classes == folder.classes and tar.targets == folder.targets
    assert Counter(tar.targets) == {c: 20 for c in range(10)}
    for i in (0, 57, 199):
        assert tar.describe(i) == f"{tiny_imagetar}:train/" + "/".join(
            Path(folder.describe(i)).parts[-2:])
        assert np.array_equal(np.asarray(tar.load(i)), np.asarray(folder.load(i)))

    # Members with '..' or an absolute path are never indexed.
    evil = tmp_path / "evil.tar"
    good = _jpeg((1, 2, 3))
    with tarfile.open(evil, "w") as tf:
        for name in ("cls/ok.jpg", "../outside/x.jpg", "/abs/cls/y.jpg", "cls/../../z.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(good)
            tf.addfile(info, io.BytesIO(good))
    src = open_source(str(evil))
    assert src.classes == ["cls"] and len(src) == 1 and src.describe(0).endswith(":cls/ok.jpg")


def test_compressed_tar_is_refused(tiny_imagefolder: Path, tmp_path: Path) -> None:
    path = tmp_path / "x.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        tf.add(tiny_imagefolder / "n01440764", arcname="n01440764")
    with pytest.raises(ValueError, match="decompress"):
        open_source(str(path))


def test_real_val_tar_in_place(imagenette_val_tar: Path) -> None:
    src = open_source(str(imagenette_val_tar))
    assert isinstance(src, TarSource)
    assert len(src) == 3925 and len(src.classes) == 10 and len(src.targets) == 3925
    assert src.classes == sorted(src.classes) and src.classes[0] == "n01440764"
    # targets are sorted (samples grouped by class) and agree with each member's folder
    assert src.targets == sorted(src.targets)
    for i in range(0, 3925, 97):
        member = src.describe(i).split(":", 1)[1]
        assert member.split("/")[:2] == ["val", src.classes[src.targets[i]]]
    # read in place: bytes at the recorded offsets are exactly tarfile's member bytes
    idx = [0, 1234, 3924]
    with tarfile.open(imagenette_val_tar) as tf:
        for i in idx:
            fh = tf.extractfile(src.describe(i).split(":", 1)[1])
            assert fh is not None and src.read_bytes(i) == fh.read()
    imgs = [src.load(i) for i in idx]
    assert all(im.mode == "RGB" and im.size == (96, 96) for im in imgs)
    # pickling (what DataLoader workers with spawn receive) drops the open handle
    clone = pickle.loads(pickle.dumps(src))
    assert src._reader._fh is not None and clone._reader._fh is None
    for i, im in zip(idx, imgs, strict=True):
        assert np.array_equal(np.asarray(clone.load(i)), np.asarray(im))


def test_tar_source_in_dataloader_workers(tiny_imagetar: Path) -> None:
    src = open_source(str(tiny_imagetar))
    src.load(0)  # the parent's handle is open: forked workers must not share its position
    ds = ViewDataset(src, _to_tensor)
    loader = DataLoader(ds, batch_size=16, num_workers=2, collate_fn=collate_views)
    seen = []
    for batch in loader:
        assert batch["skipped"] == 0
        for j, i in enumerate(batch["index"].tolist()):
            if i % 37 == 0:  # spot-check pixels against a load in this process
                assert torch.equal(batch["image"][j], _to_tensor(src.load(i))["image"])
        seen += batch["index"].tolist()
        assert batch["label"].tolist() == [src.targets[i] for i in batch["index"].tolist()]
    assert seen == list(range(200))


# ----------------------------------------------------------------------------- views, bad files


def _bad_folder(tmp_path: Path) -> Path:
    """cls/ with 3 good images and 3 bad ones (truncated JPEG, text named .jpg, zero bytes)."""
    d = tmp_path / "bad" / "cls"
    d.mkdir(parents=True)
    for k in range(3):
        (d / f"good{k}.jpg").write_bytes(_jpeg((40 * k, 0, 0)))
    (d / "trunc.jpg").write_bytes(_jpeg((9, 9, 9), size=64)[:300])
    (d / "text.jpg").write_text("this is not a JPEG")
    (d / "zero.jpg").write_bytes(b"")
    return tmp_path / "bad"


def test_view_dataset_carries_index_and_label(tiny_imagefolder: Path) -> None:
    src = open_source(str(tiny_imagefolder))
    ds = ViewDataset(src, _to_tensor)
    item = ds[45]
    assert item is not None and item["index"] == 45 and item["label"] == 2 == src.targets[45]
    assert item["image"].shape == (3, 96, 96) and item["image"].dtype == torch.uint8
    batch = collate_views([ds[i] for i in (3, 45, 199)])
    assert batch["index"].tolist() == [3, 45, 199] and batch["label"].tolist() == [0, 2, 9]
    assert batch["image"].shape == (3, 3, 96, 96) and batch["skipped"] == 0


def test_bad_images_skipped_counted_or_fatal(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    src = open_source(str(_bad_folder(tmp_path)))
    names = [Path(src.describe(i)).name for i in range(len(src))]
    assert names == ["good0.jpg", "good1.jpg", "good2.jpg", "text.jpg", "trunc.jpg", "zero.jpg"]
    reasons = {}
    for i in (3, 4, 5):
        with pytest.raises(BadImageError) as err:
            src.load(i)
        assert err.value.path == src.describe(i) and names[i] in str(err.value)
        reasons[names[i]] = err.value.reason
    assert "not an image" in reasons["text.jpg"]
    assert "truncated" in reasons["trunc.jpg"]
    assert "0 bytes" in reasons["zero.jpg"]
    # the error survives pickling (raised inside a DataLoader worker, re-raised in the parent)
    e2 = pickle.loads(pickle.dumps(BadImageError("a.jpg", "why")))
    assert (e2.path, e2.reason) == ("a.jpg", "why")

    ds = ViewDataset(src, _to_tensor)
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(len(ds))]
    assert [it is None for it in items] == [False] * 3 + [True] * 3
    for name in ("text.jpg", "trunc.jpg", "zero.jpg"):
        assert name in caplog.text
    batch = collate_views(items)
    assert batch["skipped"] == 3 and batch["index"].tolist() == [0, 1, 2]
    assert isinstance(batch["skipped"], int)
    assert collate_views([None, None]) == {"skipped": 2}
    # per-item counts from a substituting wrapper are added to the dropped ones
    assert items[0] is not None
    first = {**items[0], "skipped": 2}
    assert collate_views([first, items[1], None])["skipped"] == 3
    assert first["skipped"] == 2  # the caller's item is not mutated

    loader = DataLoader(ds, batch_size=6, collate_fn=collate_views)
    assert next(iter(loader))["skipped"] == 3

    strict = ViewDataset(src, _to_tensor, strict=True)
    assert strict[0] is not None
    with pytest.raises(RuntimeError, match=r"trunc\.jpg.*--strict-data"):
        strict[4]


def test_check_source_finds_planted_files(tiny_imagefolder: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    for wnid in sorted(p.name for p in tiny_imagefolder.iterdir()):  # 5 per class = 50 images
        (root / wnid).mkdir(parents=True)
        for f in sorted((tiny_imagefolder / wnid).iterdir())[:5]:
            shutil.copy(f, root / wnid / f.name)
    assert check_source(str(root)) == []
    d = root / "n01440764"
    real = sorted(d.iterdir())[0].read_bytes()
    (d / "trunc.jpg").write_bytes(real[: len(real) // 2])
    (d / "text.jpg").write_text("hello")
    (d / "zero.jpeg").write_bytes(b"")
    (d / "tiny.png").write_bytes(_png(Image.new("RGB", (2, 3))))
    (d / "notes.txt").write_text("stray file")
    (d / ".hidden.jpg").write_text("ignored entirely")

    bad = dict(check_source(str(root), min_size=4))
    assert set(bad) == {str(d / n) for n in ("trunc.jpg", "text.jpg", "zero.jpeg", "tiny.png",
                                             "notes.txt")}
    assert "truncated" in bad[str(d / "trunc.jpg")]
    assert "not an image" in bad[str(d / "text.jpg")]
    assert "0 bytes" in bad[str(d / "zero.jpeg")]
    assert "too small (2x3 px" in bad[str(d / "tiny.png")]
    assert bad[str(d / "notes.txt")] == "not an image (ignored)"
    # min_size=1 (default): the 2x3 image is fine
    assert str(d / "tiny.png") not in dict(check_source(str(root)))

    # the same files inside a tar archive are found in place
    tar = tmp_path / "copy.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(root, arcname="train")
    bad_tar = dict(check_source(str(tar), min_size=4))
    assert set(bad_tar) == {f"{tar}:train/n01440764/{n}" for n in (
        "trunc.jpg", "text.jpg", "zero.jpeg", "tiny.png", "notes.txt")}


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_balanced_and_split() -> None:
    train, val = open_source("synthetic"), open_source("synthetic:val")
    assert isinstance(train, SyntheticSource) and isinstance(val, SyntheticSource)
    assert (len(train), len(val)) == (2000, 1000)
    assert train.classes == val.classes == CLASSES and len(CLASSES) == 10
    assert Counter(train.targets) == {c: 200 for c in range(10)}
    assert Counter(val.targets) == {c: 100 for c in range(10)}
    small = SyntheticSource("train", n=25)
    assert Counter(small.targets) == {c: 3 if c < 5 else 2 for c in range(10)}
    for i in (0, 7, 24):
        a = np.asarray(train.load(i))
        assert a.shape == (40, 40, 3) and a.dtype == np.uint8
        assert np.array_equal(a, np.asarray(small.load(i)))  # a pure function of (seed, split, i)
        assert np.array_equal(a, np.asarray(pickle.loads(pickle.dumps(train)).load(i)))
        assert not np.array_equal(a, np.asarray(val.load(i)))
        assert not np.array_equal(a, np.asarray(SyntheticSource(seed=1).load(i)))
    assert train.describe(3) != val.describe(3)
    assert SyntheticSource(size=64).load(0).size == (64, 64)


def test_synthetic_class_changes_only_the_shape() -> None:
    """With the nuisance draws fixed, every class gives the same background, colours and pose:
    the label decides only the outline, so pixels outside all shapes are identical."""
    imgs = np.stack([np.asarray(render(c, np.random.default_rng(5), 40), dtype=np.int16)
                     for c in range(10)])
    same = (imgs == imgs[0]).all(axis=(0, 3))  # [40, 40]: pixels equal across all 10 classes
    assert 0.3 < same.mean() < 0.95
    # every class differs from every other somewhere
    for a in range(10):
        for b in range(a + 1, 10):
            assert (imgs[a] != imgs[b]).any()


def test_synthetic_shape_keeps_a_luminance_gap() -> None:
    """The shape's colour differs from the background's mean luminance by more than the style's
    gap for any background (mid-grey included, where the random draws often miss and the
    fallback pushes the colour to black or white), so a grayscale view still shows the outline."""
    luma = np.array([0.299, 0.587, 0.114])
    rng = np.random.default_rng(0)
    backgrounds = [np.full(3, v) for v in (0.0, 100.0, 127.5, 128.0, 160.0, 255.0)]
    backgrounds += list(rng.uniform(0, 255, (200, 3)))
    for bg in backgrounds:
        for gap in (20.0, 80.0, 120.0):
            c = synthetic._luma_contrasting_colour(rng, bg, gap)
            assert ((c >= 0) & (c <= 255)).all()
            assert abs(c @ luma - bg @ luma) > gap, (bg, gap, c)
    # on rendered images: the shape's pixels (where the class changes the image) are far from
    # the background's in grayscale
    imgs = [np.asarray(render(c, np.random.default_rng(11), 40), dtype=np.float64)
            for c in (0, 1)]
    gray = [i @ luma for i in imgs]
    diff = np.abs(gray[0] - gray[1])
    assert np.median(diff[diff > 0]) > 40


def test_synthetic_colour_statistics_do_not_predict_the_class() -> None:
    """Nearest class-mean on per-image colour statistics (mean and std of R, G, B) is near chance
    (10 %): the demo's random-init baseline can't win on colour alone."""
    def stats(src: SyntheticSource) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack([np.asarray(src.load(i), dtype=np.float64).reshape(-1, 3)
                      for i in range(len(src))])
        return np.concatenate([x.mean(1), x.std(1)], 1), np.array(src.targets)

    xt, yt = stats(SyntheticSource("train", n=1000))
    xv, yv = stats(SyntheticSource("val", n=500))
    mu, sd = xt.mean(0), xt.std(0)
    xt, xv = (xt - mu) / sd, (xv - mu) / sd
    centroids = np.stack([xt[yt == c].mean(0) for c in range(10)])
    pred = ((xv[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yv).mean() < 0.2


def test_synthetic_is_fast() -> None:
    src = SyntheticSource("val")
    src.load(0)
    t = time.perf_counter()
    for i in range(200):
        src.load(i)
    per_image = (time.perf_counter() - t) / 200
    assert per_image < 0.01, f"{per_image * 1e3:.2f} ms per image (target < 2 ms)"
