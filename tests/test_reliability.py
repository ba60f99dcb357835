"""Reliability and security (issue 7): crash safety, checkpoint fallback, bad data, bad input,
non-finite losses, malicious checkpoints and archives.

The crash tests run ``python -m pirl pretrain`` in subprocesses and SIGKILL them at chosen
moments (after a step, halfway through writing a checkpoint, between the two renames of a save);
the restarted runs must end bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from pirl import checkpoint as ck
from pirl.cli import main
from pirl.logs import LOG_NAME, read_log

REPO = Path(__file__).resolve().parents[1]

# A killer wrapper: `python killer.py MODE N pirl-args...` runs `pirl pirl-args...` and SIGKILLs
# itself at the N-th occurrence of MODE's event (counted in this process):
#   step   - right after the N-th optimizer step and bank update
#   write  - halfway through writing the N-th checkpoint's temporary file (half its bytes on disk)
#   rename - in the N-th save, after checkpoint.pt was renamed to checkpoint.prev.pt and before
#            the new file was renamed into place (no checkpoint.pt on disk at all)
# SIGKILL cannot be caught: no finally blocks, no atexit, no flushing - like a power cut.
KILLER = r'''
import io, os, signal, sys
import torch
from pirl import checkpoint as ck
from pirl.methods.pirl import PIRLObjective

mode, at = sys.argv[1], int(sys.argv[2])
count = [0]

def hit():
    count[0] += 1
    return count[0] == at

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "step":
    after_step = PIRLObjective.after_step
    def patched_after_step(self, *a, **k):
        after_step(self, *a, **k)
        if hit():
            die()
    PIRLObjective.after_step = patched_after_step
elif mode == "write":
    save = torch.save
    def patched_save(obj, f, *a, **k):
        if ".tmp-" in str(getattr(f, "name", "")) and hit():
            buf = io.BytesIO()
            save(obj, buf, *a, **k)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()
        return save(obj, f, *a, **k)
    torch.save = patched_save
elif mode == "rename":
    replace = os.replace
    def patched_replace(src, dst):
        replace(src, dst)
        if str(dst).endswith(ck.PREVIOUS) and hit():
            die()
    os.replace = patched_replace
else:
    raise SystemExit(f"unknown mode {mode}")

from pirl.cli import main
sys.exit(main(sys.argv[3:]))
'''


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # One intra-op thread: the same arithmetic in every run (and 10x faster than two OpenMP
    # threads fighting over a busy 2-core machine).
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p))
    return env


def _pirl(args: list[str], kill: tuple[str, int] | None = None,
          killer: Path | None = None) -> subprocess.CompletedProcess[str]:
    if kill is None:
        cmd = [sys.executable, "-m", "pirl", *args]
    else:
        assert killer is not None
        cmd = [sys.executable, str(killer), kill[0], str(kill[1]), *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def _subset(src: Path, dst: Path, per_class: int) -> Path:
    """Copy the first ``per_class`` images of every class of ``src`` into ``dst``."""
    for cls in sorted(p.name for p in src.iterdir()):
        (dst / cls).mkdir(parents=True)
        for f in sorted((src / cls).iterdir())[:per_class]:
            shutil.copy(f, dst / cls / f.name)
    return dst


@pytest.fixture(scope="module")
def small_data(tiny_imagefolder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 real images (the first 7 of each class, minus 6): batch 16 gives 4 steps per epoch."""
    root = _subset(tiny_imagefolder, tmp_path_factory.mktemp("small") / "data", per_class=7)
    for f in sorted(root.rglob("*.jpg"))[:6]:
        f.unlink()
    return root


def _pretrain_args(data: Path, out: Path, workers: int = 0) -> list[str]:
    # ResNet-18 on 32-px views (cifar10-r18 geometry).  The ImageNet stem (7x7 stride 2 +
    # max-pool) instead of the small stem makes a step ~4x cheaper on CPU; exactness does not
    # depend on it.  2 epochs of 4 steps; checkpoints after steps 2, 4 (twice: every-2 and end of
    # epoch 1), 6 and 8.
    return ["pretrain", "--data", str(data), "--out", str(out), "--preset", "cifar10-r18",
            "--epochs", "2", "--batch-size", "16", "--workers", str(workers), "--quiet",
            "model.small_stem=false", "train.deterministic=true", "train.checkpoint_every=2",
            "num_negatives=32", "warmup_epochs=0", "log_every=1", "knn_every=0"]


def _final_state(run: Path) -> dict[str, Any]:
    ckpt = ck.safe_load(run / ck.LATEST)
    return {"model": ckpt["model"], "bank": ckpt["objective"]["bank"]["rows"],
            "generator": ckpt["objective"]["generator"], "optimizer": ckpt["optimizer"],
            "position": ckpt["position"], "trunk": ck.safe_load(run / "trunk.pt")}


def _assert_equal(a: Any, b: Any, where: str = "") -> None:
    """Exact (bitwise) equality of nested dicts / lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(a), sorted(b))
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _ok(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 0, res.stderr[-3000:]


def _killed(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr[-3000:])


def test_sigkill_anywhere_then_resume_is_bit_identical(small_data: Path, tmp_path: Path) -> None:
    """Kill a run three times (mid-epoch, mid-write, mid-rename; the third run with two
    DataLoader workers), rerun the same command: weights, memory bank, sampling generator and
    optimizer state equal those of an uninterrupted run bit for bit."""
    reference = tmp_path / "reference"
    _ok(_pirl(_pretrain_args(small_data, reference)))
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    run = tmp_path / "run"
    args = _pretrain_args(small_data, run)

    # 1. mid-epoch, right after step 3 (the last checkpoint is step 2's)
    _killed(_pirl(args, ("step", 3), killer))
    assert ck.safe_load(run / ck.LATEST)["position"]["step"] == 2

    # 2. resumes at step 2; killed halfway through writing step 4's checkpoint
    _killed(_pirl(args, ("write", 1), killer))
    strays = list(run.glob(".checkpoint.pt.tmp-*"))
    assert len(strays) == 1 and strays[0].stat().st_size > 0  # the half-written file
    assert ck.safe_load(run / ck.LATEST)["position"]["step"] == 2  # untouched

    # 3. with 2 workers: resumes at step 2 (the stray is removed), saves twice after step 4
    #    (every-2 and end of epoch), then is killed in step 6's save between its two renames:
    #    checkpoint.pt is gone, checkpoint.prev.pt is the end-of-epoch-1 one
    _killed(_pirl(_pretrain_args(small_data, run, workers=2), ("rename", 3), killer))
    assert not (run / ck.LATEST).exists()
    assert ck.safe_load(run / ck.PREVIOUS)["position"] == {"epoch": 1, "step": 4, "batch": 0,
                                                           "skipped": 0}

    # 4. the same command, no kill: falls back to the previous checkpoint and finishes
    res = _pirl(args)
    _ok(res)
    assert "previous checkpoint" in res.stderr
    assert not list(run.glob(".checkpoint.pt.tmp-*"))
    _assert_equal(_final_state(reference), _final_state(run))

    # The log is append-only: the killed runs' records after their checkpoints are still in it
    # (steps 3-4 three times, 5-6 twice), but the effective history is the reference's, step by
    # step and loss by loss (the runs are bit-identical), with a resume marker per restart.
    raw = [r["step"] for r in read_log(run / LOG_NAME, effective=False) if r["kind"] == "train"]
    assert raw == [1, 2, 3, 4, 3, 4, 5, 6, 5, 6, 7, 8]
    records = read_log(run / LOG_NAME)
    assert [r["step"] for r in records if r["kind"] == "resume"] == [2, 2, 4]

    def losses(recs: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
        return [(r["step"], r["loss"], r["lr"]) for r in recs if r["kind"] == "train"]

    assert losses(records) == losses(read_log(reference / LOG_NAME))


# ----------------------------------------------------------------------------- checkpoints


def _tiny_state(step: int) -> dict[str, Any]:
    return {"position": {"epoch": 0, "step": step, "batch": step},
            "model": {"w": torch.full((3,), float(step))}}


def test_atomic_save_keeps_previous_and_leaves_no_temporary(tmp_path: Path) -> None:
    ck.save_run_checkpoint(_tiny_state(1), tmp_path)
    assert not (tmp_path / ck.PREVIOUS).exists()
    ck.save_run_checkpoint(_tiny_state(2), tmp_path)
    assert ck.safe_load(tmp_path / ck.LATEST)["position"]["step"] == 2
    assert ck.safe_load(tmp_path / ck.PREVIOUS)["position"]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ck.LATEST, ck.PREVIOUS])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "foreign"])
def test_unreadable_latest_checkpoint_falls_back_to_previous(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    ck.save_run_checkpoint(_tiny_state(1), tmp_path)
    ck.save_run_checkpoint(_tiny_state(2), tmp_path)
    latest = tmp_path / ck.LATEST
    data = latest.read_bytes()
    if damage == "truncated":  # e.g. a copy cut short by a full disk
        latest.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        latest.write_bytes(b"\x00\xff" * 100)
    elif damage == "empty":
        latest.write_bytes(b"")
    else:  # a readable file that is not a pirl training checkpoint
        torch.save({"w": torch.zeros(1)}, latest)
    (tmp_path / ".checkpoint.pt.tmp-12345").write_bytes(b"half a checkpoint")
    with caplog.at_level("WARNING", logger="pirl"):
        ckpt = ck.load_run_checkpoint(tmp_path)
    assert ckpt is not None and ckpt["position"]["step"] == 1
    assert str(latest) in caplog.text and "previous checkpoint" in caplog.text
    assert not (tmp_path / ".checkpoint.pt.tmp-12345").exists()  # the stray is cleaned up
    # both unreadable: an error naming both files, never a silent fresh start
    (tmp_path / ck.PREVIOUS).write_bytes(b"junk")
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_run_checkpoint(tmp_path)
    assert str(latest) in str(err.value) and str(tmp_path / ck.PREVIOUS) in str(err.value)


def test_empty_run_folder_has_no_checkpoint(tmp_path: Path) -> None:
    assert ck.load_run_checkpoint(tmp_path) is None


# ----------------------------------------------------------------------------- helpers for CLI


@pytest.fixture()
def one_thread() -> Any:
    """In-process training on one intra-op thread (two OpenMP threads on a busy 2-core machine
    are 10x slower), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _error_lines(err: str) -> list[str]:
    """The error lines of a CLI run's stderr; a traceback fails the test."""
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if "error" in line.lower()]


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("pirl: error: "), lines
    return lines[0]


def _train_args(data: Path, out: Path, *extra: str, epochs: int = 1, batch: int = 16,
                workers: int = 0) -> list[str]:
    return ["pretrain", "--data", str(data), "--out", str(out), "--preset", "cifar10-r18",
            "--epochs", str(epochs), "--batch-size", str(batch), "--workers", str(workers),
            "--quiet", "model.small_stem=false", "num_negatives=16", "warmup_epochs=0",
            "knn_every=0", "log_every=1", *extra]


# ----------------------------------------------------------------------------- bad data


def _png_bytes(img: Any) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def data_with_bad_files(tiny_imagefolder: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    """32 real images, two extreme-but-valid ones (1x1, 5000x3) and two unreadable ones in
    different classes: 34 images, two batches of 17 per epoch."""
    from PIL import Image

    root = _subset(tiny_imagefolder, tmp_path / "data", per_class=3)
    real = sorted((root / "n01440764").iterdir())[0]
    trunc = root / "n01440764" / "zz_trunc.jpg"
    trunc.write_bytes(real.read_bytes()[:300])  # a JPEG cut off after 300 bytes
    text = root / "n02102040" / "zz_text.jpg"
    text.write_text("this is not an image")
    (root / "n03000684" / "one_pixel.png").write_bytes(_png_bytes(Image.new("RGB", (1, 1), 7)))
    (root / "n03028079" / "sliver.png").write_bytes(
        _png_bytes(Image.new("L", (5000, 3), 200)))
    assert sum(1 for _ in root.rglob("*.*")) == 34
    return root, [trunc, text]


def test_bad_images_are_skipped_counted_and_summarised(
        data_with_bad_files: tuple[Path, list[Path]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], one_thread: None) -> None:
    import json

    data, bad = data_with_bad_files
    out = tmp_path / "run"
    assert main(_train_args(data, out, batch=17)) == 0
    err = capsys.readouterr().err
    for f in bad:  # one warning per bad file, naming it and the reason
        assert f"skipping unreadable image {f}:" in err
    assert "cannot decode" in err or "truncated" in err
    assert "not an image" in err
    assert "2 unreadable image(s) were skipped in total" in err
    assert "pirl data check" in err
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r for r in records if r["kind"] == "train"][-1]["skipped_total"] == 2
    assert (out / "trunk.pt").exists()


def test_skipped_count_survives_a_resume(data_with_bad_files: tuple[Path, list[Path]],
                                         tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                         one_thread: None) -> None:
    """Every epoch passes over the 2 unreadable images (34 images, 2 batches of 17): a run
    stopped after epoch 1 and resumed for epoch 2 counts 4, as an uninterrupted run would; a
    checkpoint written before the count was saved resumes from 0."""
    from pirl import config as C
    from pirl.train import pretrain

    data, _ = data_with_bad_files
    cfg = C.from_preset("cifar10-r18")
    for kv in ("small_stem=false", "batch_size=17", "epochs=2", "workers=0", "quiet=true",
               "num_negatives=16", "warmup_epochs=0", "knn_every=0", "log_every=1"):
        C.set_value(cfg, *kv.split("="))
    run, old = tmp_path / "run", tmp_path / "old-format"
    first = pretrain(cfg, str(data), run, stop_after_steps=2)
    assert first.stopped and first.steps == 2
    assert ck.safe_load(run / ck.LATEST)["position"]["skipped"] == 2
    shutil.copytree(run, old)
    ckpt = ck.safe_load(old / ck.LATEST)
    del ckpt["position"]["skipped"]
    torch.save(ckpt, old / ck.LATEST)

    def last_total(folder: Path) -> int:
        return [r for r in read_log(folder / LOG_NAME) if r["kind"] == "train"][-1]["skipped_total"]

    with caplog.at_level("WARNING", logger="pirl"):
        second = pretrain(cfg, str(data), run)
    assert not second.stopped and second.steps == 4
    assert last_total(run) == 4
    assert ck.safe_load(run / ck.LATEST)["position"]["skipped"] == 4
    assert "4 unreadable image(s) were skipped in total" in caplog.text
    assert [r["skipped_total"] for r in read_log(run / LOG_NAME) if r["kind"] == "resume"] == [2]
    pretrain(cfg, str(data), old)  # backward compatible: no "skipped" -> counts from 0
    assert last_total(old) == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_strict_data_stops_at_the_first_bad_file(
        data_with_bad_files: tuple[Path, list[Path]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, one_thread: None,
        workers: int) -> None:
    import gc

    from torch.utils.data import _utils

    # The abandoned DataLoader's workers may be blocked writing prefetched batches; torch waits
    # MP_STATUS_CHECK_INTERVAL (5 s) per worker before terminating them when it is collected.
    monkeypatch.setattr(_utils, "MP_STATUS_CHECK_INTERVAL", 0.2)
    data, bad = data_with_bad_files
    rc = main(_train_args(data, tmp_path / "run", "--strict-data", batch=17, workers=workers))
    assert rc == 1
    line = _one_error(capsys)
    assert any(f"unreadable image {f}:" in line for f in bad), line
    assert "--strict-data" in line
    gc.collect()  # shut the workers down now, under the short interval


def _sigterm_on_first_step() -> tuple[Callable[..., None], list[int]]:
    """A ``PIRLObjective.after_step`` that sends this process SIGTERM after the first step it
    runs, and the call counter it uses (reset it to fire again)."""
    from pirl.methods.pirl import PIRLObjective

    after_step = PIRLObjective.after_step
    calls = [0]

    def patched(self: PIRLObjective, *a: Any, **k: Any) -> None:
        after_step(self, *a, **k)
        calls[0] += 1
        if calls[0] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    return patched, calls


def test_stopped_run_says_how_to_resume_not_where_trunk_is(
        small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """SIGTERM (pre-emption) stops the run with a checkpoint; the last line gives the step and
    how to go on, and names trunk.pt only once it exists."""
    from pirl.methods.pirl import PIRLObjective

    after_step = PIRLObjective.after_step
    sigterm_on_first_step, calls = _sigterm_on_first_step()

    out = tmp_path / "run"
    trunk = out / "trunk.pt"
    monkeypatch.setattr(PIRLObjective, "after_step", sigterm_on_first_step)
    assert main(_train_args(small_data, out, batch=16)) == 0  # 64 images: 4 steps per epoch
    step = ck.safe_load(out / ck.LATEST)["position"]["step"]
    assert 1 <= step < 4  # stopped early
    printed = capsys.readouterr().out.strip()
    assert printed == (f"stopped at step {step}; checkpoint in {out}. Rerun the same command to "
                       "resume from it")
    assert not trunk.exists()

    monkeypatch.setattr(PIRLObjective, "after_step", after_step)
    assert main(_train_args(small_data, out, batch=16)) == 0  # the same command finishes
    assert capsys.readouterr().out.strip() == f"run folder: {out}  (trunk weights: {trunk})"
    assert trunk.is_file()

    calls[0] = 0  # a longer run in the same folder, stopped again: trunk.pt is the old one
    monkeypatch.setattr(PIRLObjective, "after_step", sigterm_on_first_step)
    assert main(_train_args(small_data, out, batch=16, epochs=2)) == 0
    step = ck.safe_load(out / ck.LATEST)["position"]["step"]
    assert 4 < step < 8
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"stopped at step {step}; ")
    assert printed.endswith(f"({trunk} is from an earlier, finished run of this folder)")


def test_a_stop_signal_takes_effect_at_the_next_logging_step(
        small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """SIGTERM during step 1 with log_every=3: the ranks agree on stopping at step 3, which
    is checkpointed."""
    from pirl.methods.pirl import PIRLObjective

    sigterm_on_first_step, _ = _sigterm_on_first_step()

    out = tmp_path / "run"
    monkeypatch.setattr(PIRLObjective, "after_step", sigterm_on_first_step)
    assert main(_train_args(small_data, out, "log_every=3", batch=16)) == 0
    assert ck.safe_load(out / ck.LATEST)["position"]["step"] == 3
    assert capsys.readouterr().out.startswith("stopped at step 3; ")


def test_data_check_cli_lists_planted_files(tiny_imagefolder: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    root = _subset(tiny_imagefolder, tmp_path / "copy", per_class=4)
    assert main(["data", "check", str(root)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"0 bad file(s) in {root}")
    d = root / "n03417042"
    real = sorted(d.iterdir())[0].read_bytes()
    planted = {
        d / "cut.jpg": real[: len(real) // 3],
        d / "words.jpg": b"<html>404 not found</html>",
        d / "zero.png": b"",
        root / "n01440764" / "image.heic": b"ftypheic....",  # a format pirl does not read
        root / "n01440764" / "pixel.png": _png_bytes(Image.new("RGB", (1, 1))),  # valid
    }
    for path, data in planted.items():
        path.write_bytes(data)
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out.splitlines()
    listed = dict(line.split(": ", 1) for line in out[:-1])
    assert set(listed) == {str(p) for p in planted} - {str(root / "n01440764" / "pixel.png")}
    assert "truncated" in listed[str(d / "cut.jpg")]
    assert "not an image" in listed[str(d / "words.jpg")]
    assert "0 bytes" in listed[str(d / "zero.png")]
    assert out[-1] == f"4 bad file(s) in {root}"
    # --min-size: the 1x1 image is too small for a 3x3 jigsaw grid of real pixels
    assert main(["data", "check", str(root), "--min-size", "3"]) == 1
    assert "pixel.png: too small (1x1 px" in capsys.readouterr().out


def test_empty_datasets_fail_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           caplog: pytest.LogCaptureFixture) -> None:
    empty = tmp_path / "empty"
    (empty / "class_a").mkdir(parents=True)
    (empty / "class_b").mkdir()
    (empty / "class_b" / "readme.txt").write_text("no images here")
    for argv in (["pretrain", "--data", str(empty), "--out", str(tmp_path / "run")],
                 ["data", "check", str(empty)]):
        assert main(argv) == 2
        line = _one_error(capsys)
        assert f"no images found in {empty}" in line
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    # a class folder without images next to real ones: skipped with a warning naming it
    from PIL import Image

    from pirl.data import open_source

    (empty / "class_c").mkdir()
    (empty / "class_c" / "a.png").write_bytes(_png_bytes(Image.new("RGB", (4, 4))))

    with caplog.at_level("WARNING", logger="pirl"):
        src = open_source(str(empty))
    assert src.classes == ["class_c"]
    assert f"class folder {empty / 'class_a'} has no images" in caplog.text
    # neither a folder nor an archive
    (tmp_path / "notes.md").write_text("hi")  # (.txt / .json would be read as a list)
    assert main(["data", "check", str(tmp_path / "notes.md")]) == 2
    assert "neither a folder nor a tar archive" in _one_error(capsys)


# ----------------------------------------------------------------------------- bad input


def _fake_run_checkpoint(out: Path, dataset_size: int, **changes: Any) -> None:
    """A run folder whose checkpoint records a config with ``changes`` (resume checks read
    only the config and the dataset size, before any model is built)."""
    from pirl import config as C

    cfg = C.from_preset("cifar10-r18")
    cfg.model.small_stem = False
    for key, value in changes.items():
        C.set_value(cfg, key, value)
    out.mkdir(parents=True, exist_ok=True)
    ck.save_run_checkpoint({"config": C.to_dict(cfg), "dataset_size": dataset_size,
                            "position": {"epoch": 0, "step": 1, "batch": 1}}, out)


@pytest.mark.parametrize("extra, message", [
    (["bse_lr=0.1"], "unknown config key 'bse_lr' (did you mean 'base_lr'?)"),
    (["optim.batch_siz=8"], "did you mean 'optim.batch_size'?"),
    (["optim.base_lr=fast"], "optim.base_lr='fast': expected a number"),
    (["epochs=1.5"], "optim.epochs=1.5: expected an integer"),
    (["deterministic=maybe"], "train.deterministic='maybe': expected true or false"),
    (["objective.tau=-1"], "objective.tau=-1.0: must be positive"),
    (["base_lr=.nan"], "optim.base_lr=nan: expected a finite number"),
    (["weight_decay=1e999"], "expected a finite number"),
    (["base_lr=[0.1"], "is not a valid YAML scalar"),
    (["method=[pirl]"], "objective.method=['pirl']: expected a string"),
    (["objective.method=simclr"], "objective.method='simclr': choose one of"),
    (["lam=2"], "objective.lam=2.0: must be in [0, 1]"),
    (["patch=100"], "views.patch=100: a patch must fit in its cell"),
    (["base_lr"], "override 'base_lr': expected key=value"),
    (["--workers", "-1"], "train.workers=-1: must be non-negative"),
])
def test_bad_config_is_one_line_and_exit_2(extra: list[str], message: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["pretrain", "--data", "synthetic", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # exactly one line, nothing else printed
    assert err.startswith("pirl: error: ") and message in err, err
    assert not out.exists()  # refused before anything was created


def test_bad_config_file_and_unwritable_out(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("optim:\n  base_lr: 0.1\n  warmup: 3\n")
    assert main(["pretrain", "--data", "synthetic", "--config", str(cfg_file),
                 "--out", str(tmp_path / "a")]) == 2
    assert "unknown config key 'optim.warmup' (did you mean 'optim.warmup_epochs'?)" in \
        _one_error(capsys)
    cfg_file.write_text("optim: 0.1\n")
    assert main(["pretrain", "--data", "synthetic", "--config", str(cfg_file),
                 "--out", str(tmp_path / "a")]) == 2
    assert "section 'optim' must be a mapping" in _one_error(capsys)
    # --out below a regular file: it can never be a folder
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["pretrain", "--data", "synthetic", "--preset", "demo",
                 "--out", str(blocker / "run")]) == 2
    line = _one_error(capsys)
    assert f"--out {blocker / 'run'}: cannot write there" in line


@pytest.mark.parametrize("changes, message", [
    ({"model.arch": "resnet34"}, "checkpoint has model.arch='resnet34' but this run asks for "
                                 "'resnet18'"),
    ({"objective.method": "npid"}, "checkpoint has objective.method='npid'"),
    ({"objective.pretext": "rotation"}, "checkpoint has objective.pretext='rotation'"),
    ({"model.embed_dim": 64}, "checkpoint has model.embed_dim=64"),
    ({}, "checkpoint was trained on 999 images (memory bank rows) but the data now has 200"),
])
def test_resume_of_another_run_is_refused(changes: dict[str, Any], message: str,
                                          tiny_imagefolder: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    _fake_run_checkpoint(out, 999 if not changes else 200, **changes)
    before = (out / ck.LATEST).read_bytes()
    assert main(_train_args(tiny_imagefolder, out)) == 2
    line = _one_error(capsys)
    assert f"{out / ck.LATEST}: {message}" in line, line
    assert (out / ck.LATEST).read_bytes() == before  # untouched
    assert not (out / "config.yaml").exists()  # nothing written for the refused run


# ----------------------------------------------------------------------------- non-finite


def test_non_finite_loss_keeps_last_good_checkpoint(tiny_imagefolder: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    one_thread: None) -> None:
    out = tmp_path / "run"
    # lr 1e28: the first update blows the weights up; the next forward pass gives NaN.  The loss
    # is read on logging steps only (here every step): the NaN step is the one named.
    rc = main(_train_args(tiny_imagefolder, out, "base_lr=1e30", "checkpoint_every=1"))
    assert rc == 1
    line = _one_error(capsys)
    step = int(line.split(" at or before step ")[1].split()[0])
    assert f"loss at step {step}: nan" in line and "lower optim.base_lr" in line
    assert str(out / ck.LATEST) in line
    ckpt = ck.load_run_checkpoint(out)  # loadable ...
    assert ckpt is not None and ckpt["position"]["step"] == step - 1  # ... the last good step
    for key, value in ckpt["model"].items():
        assert torch.isfinite(value.float()).all(), key
    assert not (out / "trunk.pt").exists()


def test_non_finite_loss_between_logging_steps_is_caught_at_the_next(
        tiny_imagefolder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        one_thread: None) -> None:
    """The NaN of step 2 is noticed on the device and reported at logging step 3, never saved:
    no checkpoint was due, so the folder holds none."""
    out = tmp_path / "run"
    assert main(_train_args(tiny_imagefolder, out, "base_lr=1e30", "log_every=3")) == 1
    line = _one_error(capsys)
    assert "non-finite loss at or before step 3 (epoch 1)" in line, line
    assert ck.load_run_checkpoint(out) is None


def test_non_finite_weights_are_never_checkpointed(tiny_imagefolder: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   one_thread: None) -> None:
    """An update that produces inf weights after a finite loss: the checkpoint of that step is
    refused, so checkpoint.pt stays the previous, finite one."""
    from pirl import config as C
    from pirl.train import NonFiniteLossError, pretrain

    step = torch.optim.SGD.step

    def poisoned_step(self: torch.optim.SGD, *a: Any, **k: Any) -> Any:
        result = step(self, *a, **k)
        poisoned_step.calls += 1  # type: ignore[attr-defined]
        if poisoned_step.calls == 2:  # type: ignore[attr-defined]
            self.param_groups[0]["params"][0].data.fill_(float("inf"))
        return result

    poisoned_step.calls = 0  # type: ignore[attr-defined]
    monkeypatch.setattr(torch.optim.SGD, "step", poisoned_step)
    cfg = C.from_preset("cifar10-r18")
    for kv in ("small_stem=false", "batch_size=16", "epochs=1", "workers=0", "quiet=true",
               "num_negatives=16", "warmup_epochs=0", "checkpoint_every=1", "knn_every=0"):
        C.set_value(cfg, *kv.split("="))
    with pytest.raises(NonFiniteLossError, match=r"became non-finite at step 2"):
        pretrain(cfg, str(tiny_imagefolder), tmp_path / "run")
    ckpt = ck.load_run_checkpoint(tmp_path / "run")
    assert ckpt is not None and ckpt["position"]["step"] == 1
    assert all(torch.isfinite(v.float()).all() for v in ckpt["model"].values())


# ----------------------------------------------------------------------------- security


class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like a pirl checkpoint whose unpickling would run code."""
    torch.save({"format": "pirl", "version": 1, "config": {}, "dataset_size": 200,
                "model": {"trunk.conv1.weight": torch.zeros(1)}, "payload": _Evil(marker)}, path)
    return path


def test_malicious_checkpoint_is_refused_everywhere(tiny_imagefolder: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker)
    # the payload is real: plain pickle loading would run it
    assert main(["eval", "knn", "--checkpoint", str(evil), "--train-data", str(tiny_imagefolder),
                 "--val-data", str(tiny_imagefolder), "--out", str(tmp_path / "eval"),
                 "--workers", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{evil}: refused to load" in err
    assert "arbitrary code" in err
    assert main(["export", "--checkpoint", str(evil), "--out", str(tmp_path / "t.pth")]) == 2
    assert f"{evil}: refused to load" in _one_error(capsys)
    assert not (tmp_path / "t.pth").exists()
    # resuming a run folder holding it, even with a good previous checkpoint next to it: refused
    run = tmp_path / "run"
    _fake_run_checkpoint(run, 200)
    _fake_run_checkpoint(run, 200)  # the first one becomes checkpoint.prev.pt
    _evil_checkpoint(run / ck.LATEST, marker)
    assert main(_train_args(tiny_imagefolder, run)) == 2
    line = _one_error(capsys)
    assert f"{run / ck.LATEST}: refused to load" in line
    assert not marker.exists()
    # the payload does work: a plain unpickler runs it (so the test above can fail)
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_tar_members_never_touch_the_filesystem(tiny_imagefolder: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from pirl.data import check_source, open_source

    jpg = sorted((tiny_imagefolder / "n01440764").iterdir())[0].read_bytes()
    work = tmp_path / "work" / "inner"
    work.mkdir(parents=True)
    outside = tmp_path / "outside" / "abs.jpg"
    archive = tmp_path / "evil.tar"

    def add(tf: tarfile.TarFile, name: str, data: bytes = jpg, **kw: Any) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data) if not kw else 0
        for k, v in kw.items():
            setattr(info, k, v)
        tf.addfile(info, io.BytesIO(data) if not kw else None)

    with tarfile.open(archive, "w") as tf:
        add(tf, "train/a/good1.jpg")
        add(tf, "train/a/good2.jpg")
        add(tf, "train/b/good3.jpg")
        add(tf, str(outside))                      # absolute path
        add(tf, "../escape.jpg")                   # parent of the working folder
        add(tf, "train/a/../../../escape2.jpg")    # .. hidden in the middle
        add(tf, "train/b/link.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add(tf, "train/b/hard.jpg", type=tarfile.LNKTYPE, linkname="../escape.jpg")
    monkeypatch.chdir(work)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    src = open_source(str(archive))
    assert src.classes == ["a", "b"] and len(src) == 3
    assert all(src.load(i).size == (96, 96) for i in range(len(src)))
    assert check_source(str(archive)) == []
    assert main(["data", "check", str(archive)]) == 0
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not outside.exists() and not any(work.iterdir())
    assert "unsafe member" in capsys.readouterr().err


def test_ctrl_c_checkpoints_once_and_aborts_twice(
        small_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """A first Ctrl-C (SIGINT) stops like SIGTERM, with a checkpoint within a step; a
    second one aborts at once with KeyboardInterrupt and writes nothing new."""
    from pirl.methods.pirl import PIRLObjective

    after_step = PIRLObjective.after_step
    calls = [0]

    def ctrl_c(times: int) -> Any:
        def patched(self: PIRLObjective, *a: Any, **k: Any) -> None:
            after_step(self, *a, **k)
            calls[0] += 1
            if calls[0] == 1:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)
        return patched

    out = tmp_path / "run"
    monkeypatch.setattr(PIRLObjective, "after_step", ctrl_c(1))
    assert main(_train_args(small_data, out, batch=16)) == 0
    step = ck.safe_load(out / ck.LATEST)["position"]["step"]
    assert 1 <= step < 4  # 64 images, batch 16: stopped within the first epoch
    assert capsys.readouterr().out.startswith(f"stopped at step {step}; ")

    calls[0] = 0
    other = tmp_path / "other"
    monkeypatch.setattr(PIRLObjective, "after_step", ctrl_c(2))
    assert main(_train_args(small_data, other, batch=16)) == 130  # the CLI's "interrupted"
    assert not (other / ck.LATEST).exists()
