"""Sharded pretraining input: `pirl data shard`, the manifest, the per-epoch stream over ranks
and workers, resume, bad members, and a pretraining run resumed from shards."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

pytest.importorskip("webdataset")

from pirl import checkpoint as ck  # noqa: E402
from pirl.cli import main  # noqa: E402
from pirl.data import DatasetError, FolderSource, open_source  # noqa: E402
from pirl.data.shard_stream import ShardViews, slot_shards  # noqa: E402
from pirl.data.shards import ShardSource  # noqa: E402
from pirl.train import pretrain  # noqa: E402
from tests.test_train import tiny_cfg  # noqa: E402

N, SHARD = 32, 4  # 8 shards of 4 images


def colour_of(j: int) -> tuple[int, int, int]:
    """The solid colour of source image ``j``: tells every image apart after decoding."""
    return (j * 7 % 256, j * 3 % 256, 100 + j)


def pixel(img: Image.Image) -> dict[str, Any]:
    """A cheap 'view': the top-left pixel (module level: picklable for DataLoader workers)."""
    return {"px": torch.tensor(np.asarray(img)[0, 0].astype(np.int64))}


@pytest.fixture()
def shard_set(tmp_path: Path) -> tuple[str, FolderSource]:
    """N solid-colour PNGs in 2 classes written as 8 shards; returns (--data spec, source)."""
    root = tmp_path / "folder"
    for j in range(N):
        d = root / f"c{j % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), colour_of(j)).save(d / f"{j:03d}.png")
    out = tmp_path / "shards"
    assert main(["data", "shard", str(root), str(out), "--shard-size", str(SHARD)]) == 0
    return f"{out}/train-{{000000..000007}}.tar", FolderSource(root)


def epoch_batches(views: ShardViews, rank: int, world: int, workers: int, start: int = 0,
                  epoch: int = 0) -> list[dict[str, Any]]:
    """One rank's batches through a real DataLoader (global batch 8), collated as in training
    (``skipped``: a tensor of per-sample counts)."""
    stream = views.epoch(epoch, 8, rank, world, start, default_collate, workers)
    return list(DataLoader(stream, batch_size=None, num_workers=workers))


def test_manifest_and_random_access_match_the_source(shard_set: tuple[str, FolderSource]
                                                     ) -> None:
    spec, folder = shard_set
    src = open_source(spec)
    assert isinstance(src, ShardSource) and len(src) == N and src.classes == ["c0", "c1"]
    by_name = {folder.describe(j): j for j in range(N)}
    assert sorted(by_name[name] for name in src.names) == list(range(N))  # a permutation
    for i in range(N):
        j = by_name[src.names[i]]
        assert src.targets[i] == folder.targets[j]
        assert src.load(i).getpixel((0, 0)) == colour_of(int(Path(src.names[i]).stem))
    assert src.counts == [SHARD] * 8
    # shuffled before writing: the first shard is not one class
    assert len({src.targets[i] for i in range(SHARD)}) == 2


def test_every_sample_once_per_epoch_over_2_ranks_x_2_workers(
        shard_set: tuple[str, FolderSource]) -> None:
    spec, _ = shard_set
    src = open_source(spec)
    assert isinstance(src, ShardSource)
    views = ShardViews(src, pixel, seed=5)
    orders = []
    for epoch in (0, 1):
        seen: list[int] = []
        for rank in (0, 1):
            batches = epoch_batches(views, rank, 2, 2, epoch=epoch)
            assert len(batches) == N // 8  # every rank: |D| // B steps
            for b in batches:
                assert b["index"].shape == (4,) and int(b["skipped"].sum()) == 0
                # the bank row is the manifest index: the pixels are that sample's
                for i, px in zip(b["index"].tolist(), b["px"].tolist(), strict=True):
                    assert tuple(px) == colour_of(int(Path(src.names[i]).stem))
                    assert src.targets[i] == int(b["label"][b["index"].tolist().index(i)])
                seen += b["index"].tolist()
        assert sorted(seen) == list(range(N))
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled per epoch ...
    again = [i for r in (0, 1) for b in epoch_batches(views, r, 2, 2, epoch=1)
             for i in b["index"].tolist()]
    assert again == orders[1]  # ... deterministically


def test_resume_mid_epoch_gives_the_same_batches(shard_set: tuple[str, FolderSource]) -> None:
    spec, _ = shard_set
    src = open_source(spec)
    assert isinstance(src, ShardSource)
    views = ShardViews(src, pixel, seed=1)
    full = epoch_batches(views, 1, 2, 2)
    for start in (1, 3):
        rest = epoch_batches(views, 1, 2, 2, start=start)
        assert [b["index"].tolist() for b in rest] == [b["index"].tolist() for b in full[start:]]


def test_too_many_readers_for_the_shards_is_refused(shard_set: tuple[str, FolderSource]) -> None:
    with pytest.raises(DatasetError, match="8 shard.*cannot feed 9 readers"):
        slot_shards(8, 0, 0, 9)
    spec, _ = shard_set
    with pytest.raises(DatasetError, match="exactly the shards"):
        open_source(spec.replace("000007", "000006"))


def corrupt_member(shard: Path, suffix: str = ".png") -> int:
    """Overwrite the first image member of ``shard`` with junk of the same size (the tar stays
    valid); returns that sample's global index."""
    with tarfile.open(shard) as tf:
        m = next(m for m in tf if m.name.endswith(suffix))
    with open(shard, "r+b") as fh:
        fh.seek(m.offset_data)
        fh.write(b"\x00not an image" + b"\x00" * (m.size - 13))
    return int(m.name.split(".")[0])


def test_a_corrupted_member_is_skipped_and_counted(shard_set: tuple[str, FolderSource]) -> None:
    spec, _ = shard_set
    src = open_source(spec)
    assert isinstance(src, ShardSource)
    bad = corrupt_member(src.shards[3])
    views = ShardViews(src, pixel, seed=2)
    batches = [b for r in (0, 1) for b in epoch_batches(views, r, 2, 2)]
    seen = [i for b in batches for i in b["index"].tolist()]
    assert bad not in seen
    assert sum(int(b["skipped"].sum()) for b in batches) == 1  # counted once
    assert len(seen) == N  # full batches: the slot's next sample took its place
    assert set(seen) == set(range(N)) - {bad}
    # a resume skips the same samples (the bad one too, counted once only, by the run that
    # got there first), wherever the stop falls
    for rank in (0, 1):
        full = epoch_batches(views, rank, 2, 2)
        for start in (1, 2, 3):
            rest = epoch_batches(views, rank, 2, 2, start=start)
            assert ([int(b["skipped"].sum()) for b in rest]
                    == [int(b["skipped"].sum()) for b in full[start:]])
            assert ([b["index"].tolist() for b in rest]
                    == [b["index"].tolist() for b in full[start:]])
    views.strict = True
    with pytest.raises(Exception, match="unreadable image .*train-000003.tar"):
        [b for r in (0, 1) for b in epoch_batches(views, r, 2, 1)]


def test_a_truncated_shard_counts_its_missing_samples(shard_set: tuple[str, FolderSource]
                                                      ) -> None:
    spec, _ = shard_set
    src = open_source(spec)
    assert isinstance(src, ShardSource)
    with tarfile.open(src.shards[5]) as tf:
        members = tf.getmembers()  # KEY.cls, KEY.png per sample: 8 members
    keys = [int(m.name.split(".")[0]) for m in members]
    with open(src.shards[5], "r+b") as fh:
        fh.truncate(members[4].offset)  # the last 2 samples are gone
    lost = set(keys[4:])
    views = ShardViews(src, pixel, seed=3)
    batches = [b for r in (0, 1) for b in epoch_batches(views, r, 2, 2)]
    seen = [i for b in batches for i in b["index"].tolist()]
    assert len(seen) == N and set(seen) == set(range(N)) - lost
    assert sum(int(b["skipped"].sum()) for b in batches) == 2


def test_pretrain_from_shards_resumes_with_the_same_bank(tiny_imagefolder: Path,
                                                         tmp_path: Path) -> None:
    folder = tmp_path / "folder"  # 64 real images of 4 classes: 4 steps of 16 per epoch
    for d in sorted(tiny_imagefolder.iterdir())[:4]:
        (folder / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[:16]:
            (folder / d.name / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "shards"
    assert main(["data", "shard", str(folder), str(out), "--shard-size", "8"]) == 0
    manifest = json.loads((out / "train-manifest.json").read_text())
    assert manifest["total"] == 64 and len(manifest["shards"]) == 8
    spec = f"{out}/train-{{000000..000007}}.tar"

    def cfg() -> Any:
        return tiny_cfg(epochs=1, batch_size=16, num_negatives=16)

    whole = pretrain(cfg(), spec, tmp_path / "whole")
    assert whole.steps == 64 // 16
    run = tmp_path / "resumed"
    first = pretrain(cfg(), spec, run, stop_after_steps=2)
    assert first.stopped and first.steps == 2
    first_rows = ck.safe_load(run / ck.LATEST)["objective"]["bank"]["rows"]
    assert ck.safe_load(run / ck.LATEST)["position"]["readers"] == 1
    resume_cfg = cfg()
    resume_cfg.train.workers = 2  # more workers now: the epoch ends with the 1 reader it began with
    second = pretrain(resume_cfg, spec, run)
    assert second.resumed_from_step == 2 and second.steps == whole.steps
    rows = {name: ck.safe_load(tmp_path / name / ck.LATEST)["objective"]["bank"]["rows"]
            for name in ("whole", "resumed")}
    assert not torch.equal(rows["whole"], first_rows)  # the steps after the stop moved rows
    torch.testing.assert_close(rows["resumed"], rows["whole"], rtol=0, atol=1e-6)


def test_clear_errors_without_webdataset_and_for_a_bad_manifest(
        shard_set: tuple[str, FolderSource], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    spec, _ = shard_set
    manifest = Path(spec).parent / "train-manifest.json"
    m = json.loads(manifest.read_text())
    m["shards"][2]["count"] = 5  # no longer adds up to the next shard's start
    manifest.write_text(json.dumps(m))
    assert main(["data", "check", spec]) == 2
    assert "train-manifest.json: shard train-000003.tar starts at 12, expected 13" in (
        capsys.readouterr().err)
    monkeypatch.setitem(sys.modules, "webdataset", None)  # as if not installed
    assert main(["pretrain", "--data", spec, "--out", str(Path(spec).parent / "run")]) == 2
    assert "webdataset package: pip install 'pirl[shards]'" in capsys.readouterr().err
