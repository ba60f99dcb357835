"""List files (``relative/path label``, Places205-style) and iNaturalist JSON splits as datasets,
through the one resolution function ``open_source`` (so pretraining and every protocol read
them), and ``--subset-list`` for fine-tuning.  Real images: the tiny ImageNette fixtures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pirl.cli import main
from pirl.data.datasets import open_source
from pirl.data.lists import ListedSource
from pirl.data.source import DatasetError
from pirl.evaluate.features import check_labelled_splits
from pirl.evaluate.finetune import read_subset_list


def _images(root: Path) -> list[str]:
    """Relative paths of the tiny folder's images, sorted (class folders are wnids)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- list files


def test_list_file_reads_images_and_labels_in_file_order(tiny_imagefolder: Path) -> None:
    rels = _images(tiny_imagefolder)[::25]  # 8 images of several classes
    labels = [(7 * k) % 5 for k in range(len(rels))]
    lst = _write(tiny_imagefolder.parent / "train.txt",  # beside the folder: root = its parent
                 "# comment\n\n" + "".join(f"tiny/{r} {y}\n" for r, y in zip(rels, labels,
                                                                            strict=True)))
    src = open_source(str(lst))
    assert isinstance(src, ListedSource)
    assert src.targets == labels and src.classes == [str(k) for k in range(max(labels) + 1)]
    for i, rel in enumerate(rels):
        assert src.describe(i) == str(tiny_imagefolder / rel)
        # the reference: PIL reading the same file
        ref = np.asarray(Image.open(tiny_imagefolder / rel).convert("RGB"))
        assert np.array_equal(np.asarray(src.load(i)), ref)


def test_list_with_a_root_folder_or_tar(tiny_imagefolder: Path, tiny_imagetar: Path,
                                        tmp_path: Path) -> None:
    rels = _images(tiny_imagefolder)[:3]
    lst = _write(tmp_path / "l.csv", "".join(f"{r},{k}\n" for k, r in enumerate(rels)))
    folder = open_source(f"{tiny_imagefolder}::{lst}")
    assert folder.targets == [0, 1, 2] and folder.describe(1) == str(tiny_imagefolder / rels[1])
    # the tar holds train/<wnid>/<name>.jpg: the same images, read in place
    lst2 = _write(tmp_path / "t.txt", "".join(f"train/{r} {k}\n" for k, r in enumerate(rels)))
    tar = open_source(f"{tiny_imagetar}::{lst2}")
    assert tar.describe(2) == f"{tiny_imagetar}:train/{rels[2]}"
    for i in range(3):
        assert np.array_equal(np.asarray(tar.load(i)), np.asarray(folder.load(i)))


def test_bad_list_lines_are_all_named_with_file_and_line(tiny_imagefolder: Path,
                                                         tmp_path: Path) -> None:
    good = _images(tiny_imagefolder)[0]
    lst = _write(tmp_path / "bad.txt", "\n".join([
        f"{good} 0",              # 1 fine
        f"{good}",                # 2 no label
        f"{good} cat",            # 3 not an integer
        "n0/missing.jpg 1",       # 4 no such file
        f"{good} -3",             # 5 negative
        "../escape.jpg 0",        # 6 leaves the root
    ]) + "\n")
    with pytest.raises(DatasetError) as err:
        open_source(f"{tiny_imagefolder}::{lst}")
    msg = str(err.value)
    assert "5 bad line(s)" in msg and "\n" not in msg  # one line, as every CLI error
    for n, why in ((2, "no label"), (3, "'cat' is not an integer"), (4, "does not exist"),
                   (5, "negative"), (6, "leaves the root")):
        assert f"{lst}:{n}: " in msg and why in msg
    assert f"{lst}:1:" not in msg


def test_cli_exits_2_on_a_bad_list_for_pretraining_and_evaluation(
        tiny_imagefolder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lst = _write(tmp_path / "bad.txt", f"{_images(tiny_imagefolder)[0]} x\n")
    spec = f"{tiny_imagefolder}::{lst}"
    assert main(["pretrain", "--data", spec, "--preset", "demo", "--epochs", "1",
                 "--out", str(tmp_path / "run")]) == 2
    assert f"{lst}:1: label 'x' is not an integer" in capsys.readouterr().err
    assert main(["eval", "knn", "--checkpoint", "random", "--arch", "resnet18",
                 "--train-data", spec, "--val-data", spec, "--out", str(tmp_path / "ev")]) == 2
    assert f"{lst}:1: label 'x'" in capsys.readouterr().err
    assert main(["data", "check", str(tmp_path / "absent.txt")]) == 2


def test_pretraining_runs_on_a_list(tiny_imagefolder: Path, tmp_path: Path) -> None:
    rels = _images(tiny_imagefolder)[::10]  # 20 images
    lst = _write(tmp_path / "pre.txt", "".join(f"{r} 0\n" for r in rels))
    out = tmp_path / "run"
    assert main(["pretrain", "--data", f"{tiny_imagefolder}::{lst}", "--preset", "demo",
                 "--epochs", "1", "--batch-size", "10", "--workers", "0", "--device", "cpu",
                 "--quiet", "--out", str(out)]) == 0
    assert (out / "trunk.pt").is_file()


# ----------------------------------------------------------------------------- iNaturalist JSON


def _inat(images: list[dict], annotations: list[dict]) -> dict:
    # category ids deliberately unsorted and sparse: labels are their rank after sorting
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 9, "name": "Zea"}, {"id": 2, "name": "Aster"},
                           {"id": 5, "name": "Morus"}]}


def test_inat_json_labels_follow_sorted_category_ids(tiny_imagefolder: Path,
                                                     tmp_path: Path) -> None:
    root = tmp_path / "inat"
    shutil.copytree(tiny_imagefolder, root / "train_val2018")
    rels = [f"train_val2018/{r}" for r in _images(tiny_imagefolder)[:4]]
    images = [{"id": 100 + k, "file_name": r} for k, r in enumerate(rels)]
    cats = [9, 2, 5, 2]
    ann = [{"id": k, "image_id": 100 + k, "category_id": c} for k, c in enumerate(cats[:3])]
    train = _write(root / "train2018.json", json.dumps(_inat(images, ann)))  # image 103: none
    val = _write(root / "val2018.json", json.dumps(_inat(images[:2], ann[:2])))
    tr, va = open_source(str(train)), open_source(str(val))
    assert tr.classes == ["Aster", "Morus", "Zea"]  # ids 2, 5, 9
    assert tr.targets == [2, 0, 1, -1]
    assert tr.describe(3) == str(root / rels[3])
    assert np.array_equal(np.asarray(tr.load(0)),
                          np.asarray(Image.open(root / rels[0]).convert("RGB")))
    check_labelled_splits(tr, va)  # same categories -> same classes, same order


def test_bad_inat_entries_are_named(tiny_imagefolder: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    rel = _images(tiny_imagefolder)[0]
    images = [{"id": 1, "file_name": rel}, {"id": 2}, {"id": 3, "file_name": "no/such.jpg"}]
    ann = [{"image_id": 1, "category_id": 77}, {"image_id": 42, "category_id": 2},
           {"image_id": 1}]
    bad = _write(tmp_path / "bad.json", json.dumps(_inat(images, ann)))
    with pytest.raises(DatasetError) as err:
        open_source(f"{tiny_imagefolder}::{bad}")
    msg = str(err.value)
    for entry in ("images[1]: needs an 'id' and a 'file_name'", "images[2]: image",
                  "annotations[0]: category_id 77", "annotations[1]: image_id 42",
                  "annotations[2]: needs"):
        assert f"{bad}: {entry}" in msg
    broken = _write(tmp_path / "broken.json", "{\"images\": [")
    assert main(["data", "check", f"{tiny_imagefolder}::{broken}"]) == 2
    assert f"{broken}: not readable JSON" in capsys.readouterr().err


# ----------------------------------------------------------------------------- subset lists


def test_subset_list_by_file_name_or_relative_path(tiny_imagefolder: Path,
                                                   tmp_path: Path) -> None:
    src = open_source(str(tiny_imagefolder))
    rels = _images(tiny_imagefolder)
    names = _write(tmp_path / "1percent.txt",
                   f"{Path(rels[3]).name}\n{rels[40]}\n\n{Path(rels[199]).name} 9\n")
    got = read_subset_list(names, src)
    want = sorted(i for i in range(len(src))
                  if src.describe(i) in {str(tiny_imagefolder / rels[k]) for k in (3, 40, 199)})
    assert got == want and len(got) == 3
    unknown = _write(tmp_path / "u.txt",
                     f"{rels[0]}\nn000_nothing.JPEG\nwrong/{Path(rels[1]).name}\n")
    with pytest.raises(DatasetError) as err:
        read_subset_list(unknown, src)
    assert f"{unknown}:2: 'n000_nothing.JPEG' matches no image" in str(err.value)
    assert f"{unknown}:3: " in str(err.value) and f"{unknown}:1:" not in str(err.value)


def test_cli_finetune_takes_a_subset_list(tiny_imagefolder: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    rels = _images(tiny_imagefolder)  # 20 per class, classes in order
    train = _write(tmp_path / "train.txt", "".join(f"{r} {k // 20}\n" for k, r in enumerate(rels)))
    val = _write(tmp_path / "val.txt",  # one image per class keeps the scoring short
                 "".join(f"{r} {k // 20}\n" for k, r in enumerate(rels) if k % 20 == 19))
    names = _write(tmp_path / "sub.txt", "".join(f"{Path(r).name}\n" for r in rels[::20]))
    args = ["eval", "finetune", "--checkpoint", "random", "--arch", "resnet18",
            "--train-data", f"{tiny_imagefolder}::{train}",
            "--val-data", f"{tiny_imagefolder}::{val}",
            "--image-size", "32", "--epochs", "1", "--ft-batch-size", "5", "--workers", "0",
            "--device", "cpu", "--quiet", "--out", str(tmp_path / "ev")]
    assert main([*args, "--subset-list", str(names)]) == 0
    r = json.loads((tmp_path / "ev" / "finetune.json").read_text())
    assert r["subset_size"] == 10 and r["fraction"] == pytest.approx(10 / 200)
    assert sum(r["per_class"].values()) == 10
    bad = _write(tmp_path / "bad.txt", "nothing.JPEG\n")
    assert main([*args, "--subset-list", str(bad)]) == 2
    assert f"{bad}:1: 'nothing.JPEG' matches no image" in capsys.readouterr().err
