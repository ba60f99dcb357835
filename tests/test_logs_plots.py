"""Run logs (JSON lines, TensorBoard mirror, crash tolerance) and the ``pirl plot`` figure."""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from pirl.console import Progress, setup_logging
from pirl.logs import (
    LOG_NAME,
    LogFormatError,
    RunLogger,
    read_log,
    tensorboard_available,
)
from pirl.plots import add_plot_parser, load_curves, plot_runs, smooth

# ---------------------------------------------------------------------------------------------
# Logs


def test_records_round_trip(tmp_path: Path) -> None:
    np_float = np.float32(0.25)
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log({"kind": "train", "step": 1, "epoch": 1, "loss": 3.5, "lr": 0.03,
                    "loss_t": np_float, "note": "hello"})
        logger.log({"kind": "eval", "step": 10, "epoch": 1, "knn_top1": 41.5})
        logger.log({"kind": "event", "step": 10, "epoch": 1, "event": "resumed",
                    "bad": float("nan")})
    records = read_log(tmp_path / LOG_NAME)
    assert [r["kind"] for r in records] == ["train", "eval", "event"]
    assert records[0]["step"] == 1 and records[0]["loss"] == 3.5 and records[0]["lr"] == 0.03
    assert records[0]["loss_t"] == 0.25 and isinstance(records[0]["loss_t"], float)
    assert records[0]["note"] == "hello"
    assert records[1]["knn_top1"] == 41.5
    assert records[2]["bad"] is None  # NaN is not JSON: written as null
    for r in records:  # "time" is added: unix seconds, close to now
        assert isinstance(r["time"], float) and abs(r["time"] - records[0]["time"]) < 60
    # Every line is strict JSON (no NaN tokens), one object per line.
    for line in (tmp_path / LOG_NAME).read_text().splitlines():
        assert isinstance(json.loads(line, parse_constant=_reject), dict)


def _reject(token: str) -> None:
    raise AssertionError(f"non-standard JSON token {token}")


def test_each_line_is_on_disk_before_close(tmp_path: Path) -> None:
    # A crash loses nothing already logged: the line is readable while the logger is open.
    logger = RunLogger(tmp_path, tensorboard=False)
    logger.log({"step": 5, "epoch": 1, "loss": 1.0})
    assert read_log(tmp_path / LOG_NAME)[0]["step"] == 5
    logger.close()
    logger.close()  # twice is fine


def test_bad_records_are_rejected(tmp_path: Path) -> None:
    with RunLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(ValueError, match="kind"):
            logger.log({"kind": "trian", "step": 1})
        with pytest.raises(ValueError, match="step"):
            logger.log({"kind": "train", "loss": 1.0})
        with pytest.raises(TypeError, match="'loss'"):
            logger.log({"step": 1, "loss": [1.0, 2.0]})
        with pytest.raises(TypeError, match="'z' is not a scalar"):
            logger.log({"step": 1, "z": np.zeros(3)})
    assert read_log(tmp_path / LOG_NAME) == []


def test_disabled_logger_writes_nothing(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path / "run", enabled=False, tensorboard=None)
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_reopen_appends(tmp_path: Path) -> None:
    with RunLogger(tmp_path, tensorboard=False) as logger:
        for s in (1, 2):
            logger.log({"step": s, "epoch": 1, "loss": 1.0 / s})
    with RunLogger(tmp_path, tensorboard=False) as logger:  # a resumed run
        logger.log({"step": 3, "epoch": 1, "loss": 0.3})
    assert [r["step"] for r in read_log(tmp_path / LOG_NAME)] == [1, 2, 3]


def test_truncated_last_line_is_skipped_with_warning(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / LOG_NAME
    good = [json.dumps({"kind": "train", "step": s, "loss": 1.0}) for s in (1, 2)]
    path.write_text("\n".join(good) + '\n{"kind": "train", "st')  # crash mid-write
    with caplog.at_level(logging.WARNING, logger="pirl"):
        records = read_log(path)
    assert [r["step"] for r in records] == [1, 2]
    assert any("line 3" in m and "incomplete" in m for m in caplog.messages)
    # A truncated last line followed by a newline is still the last line.
    path.write_text("\n".join(good) + '\n{"kind": "tr\n\n')
    assert [r["step"] for r in read_log(path)] == [1, 2]


def test_corrupt_middle_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / LOG_NAME
    lines = [json.dumps({"step": 1}), "{not json", json.dumps({"step": 3})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LogFormatError, match=r"log\.jsonl, line 2") as e:
        read_log(path)
    assert str(path) in str(e.value)
    # A JSON value that is not an object is also corrupt.
    path.write_text("\n".join([json.dumps({"step": 1}), "[1, 2]", json.dumps({"step": 3})]))
    with pytest.raises(LogFormatError, match="line 2"):
        read_log(path)


def test_missing_log_file_error_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.jsonl")):
        read_log(tmp_path / "nope.jsonl")


def test_reopen_after_crash_mid_write_keeps_file_readable(tmp_path: Path) -> None:
    # A crash left half a line without its newline; the resumed run must not glue its first
    # record onto it (that would turn a tolerated last line into a corrupt middle line).
    path = tmp_path / LOG_NAME
    path.write_text(json.dumps({"kind": "train", "step": 1}) + '\n{"kind": "train", "step": 2, "lo')
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log({"step": 2, "epoch": 1, "loss": 0.5})
    assert [r["step"] for r in read_log(path)] == [1, 2]
    assert path.read_text().count("\n") == 2
    # Same when the whole file is one fragment.
    path.write_text('{"kind": "tr')
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log({"step": 7})
    assert [r["step"] for r in read_log(path)] == [7]


def _log_run(logger: RunLogger, steps: range, run: str, evals: dict[int, int]) -> None:
    """Train records for ``steps`` (loss = step + an offset per run) and an eval record after
    the steps in ``evals`` (step -> completed epochs), as the training loop writes them."""
    offset = {"first": 0.0, "second": 100.0, "third": 200.0}[run]
    for s in steps:
        logger.log({"kind": "train", "step": s, "epoch": 1 + (s - 1) // 5, "loss": s + offset,
                    "run": run})
        if s in evals:
            logger.log({"kind": "eval", "step": s, "epoch": evals[s], "knn_top1": s + offset,
                        "run": run})


def test_resume_marker_gives_each_step_once(tmp_path: Path) -> None:
    """Steps 1..10, a crash, a resume from the checkpoint at step 6, then steps 7..12: the
    effective history has steps 1..12 once each, 7..10 from the run that continued."""
    evals = {5: 1, 10: 2}  # 5 steps per epoch; kNN after each epoch
    with RunLogger(tmp_path, tensorboard=False) as logger:
        _log_run(logger, range(1, 11), "first", evals)
    with RunLogger(tmp_path, tensorboard=False, resume={"step": 6, "epoch": 1}) as logger:
        _log_run(logger, range(7, 13), "second", evals)
    path = tmp_path / LOG_NAME
    raw = read_log(path, effective=False)
    assert len(raw) == 10 + 2 + 1 + 6 + 1  # append-only: every line is still in the file
    assert [r["step"] for r in raw if r["kind"] == "resume"] == [6]
    records = read_log(path)
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    assert train == [(s, float(s)) for s in range(1, 7)] + [(s, s + 100.0) for s in range(7, 13)]
    assert [(r["epoch"], r["run"]) for r in records if r["kind"] == "eval"] == \
        [(1, "first"), (2, "second")]
    assert [r["kind"] for r in records].count("resume") == 1
    # a second crash after step 9, resumed from step 8: the third run supersedes 9..12
    with RunLogger(tmp_path, tensorboard=False, resume={"step": 8, "epoch": 1}) as logger:
        _log_run(logger, range(9, 14), "third", evals)
    records = read_log(path)
    train = [(r["step"], r["run"]) for r in records if r["kind"] == "train"]
    assert train == ([(s, "first") for s in range(1, 7)] + [(7, "second"), (8, "second")]
                     + [(s, "third") for s in range(9, 14)])
    assert [r["step"] for r in records if r["kind"] == "resume"] == [6, 8]  # markers stay
    assert [(r["epoch"], r["run"]) for r in records if r["kind"] == "eval"] == \
        [(1, "first"), (2, "third")]
    # the plot reads the same history
    x, y = load_curves(tmp_path).train["loss"]
    np.testing.assert_array_equal(x, np.arange(1, 14))
    assert y[6] == 107.0 and y[9] == 210.0


def test_resume_marker_drops_eval_of_an_unsaved_epoch_end(tmp_path: Path) -> None:
    """The checkpoint at an epoch's last step is written before its kNN when checkpoint_every
    divides it (position epoch 1, not 2); a crash after the kNN record but before the
    end-of-epoch save repeats that kNN at the same step.  The epoch tells the copies apart."""
    with RunLogger(tmp_path, tensorboard=False) as logger:
        _log_run(logger, range(1, 11), "first", {5: 1, 10: 2})
    with RunLogger(tmp_path, tensorboard=False, resume={"step": 10, "epoch": 1}) as logger:
        _log_run(logger, range(11, 11), "second", {})
        logger.log({"kind": "eval", "step": 10, "epoch": 2, "knn_top1": 1.0, "run": "second"})
    records = read_log(tmp_path / LOG_NAME)
    assert [(r["epoch"], r["run"]) for r in records if r["kind"] == "eval"] == \
        [(1, "first"), (2, "second")]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 11))


@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard is not installed")
def test_resume_marker_purges_tensorboard_steps(tmp_path: Path) -> None:
    with RunLogger(tmp_path, tensorboard=True) as logger:
        _log_run(logger, range(1, 11), "first", {})
    with RunLogger(tmp_path, tensorboard=True, resume={"step": 6, "epoch": 1}) as logger:
        _log_run(logger, range(7, 13), "second", {})
    scalars = _tb_scalars(tmp_path / "tb")
    assert set(scalars) == {"train/loss"}  # the marker is not mirrored
    assert scalars["train/loss"] == [(s, float(s)) for s in range(1, 7)] + \
        [(s, s + 100.0) for s in range(7, 13)]


def _tb_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Read scalar summaries back from the event files with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard is not installed")
def test_tensorboard_mirror(tmp_path: Path) -> None:
    with RunLogger(tmp_path, tensorboard=None) as logger:  # auto: installed -> on
        assert logger.tensorboard_dir == tmp_path / "tb"
        logger.log({"kind": "train", "step": 1, "epoch": 1, "loss": 2.0, "lr": 0.1, "note": "x"})
        logger.log({"kind": "train", "step": 2, "epoch": 1, "loss": 1.5, "lr": 0.05})
        logger.log({"kind": "eval", "step": 2, "epoch": 1, "knn_top1": 33.0})
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    scalars = _tb_scalars(tmp_path / "tb")
    assert set(scalars) == {"train/loss", "train/lr", "eval/knn_top1"}  # no step/epoch/time/str
    assert scalars["train/loss"] == [(1, 2.0), (2, 1.5)]
    assert scalars["eval/knn_top1"] == [(2, 33.0)]
    assert [s for s, _ in scalars["train/lr"]] == [1, 2]
    assert scalars["train/lr"][1][1] == pytest.approx(0.05)  # stored as float32


def test_tensorboard_off_or_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with RunLogger(tmp_path / "a", tensorboard=False) as logger:
        logger.log({"step": 1, "loss": 1.0})
        assert logger.tensorboard_dir is None
    assert not (tmp_path / "a" / "tb").exists()

    import pirl.logs as logs_mod

    def missing() -> None:
        raise ImportError("No module named 'tensorboard'")

    monkeypatch.setattr(logs_mod, "_tensorboard_writer_class", missing)
    with RunLogger(tmp_path / "b", tensorboard=None) as logger:  # auto: quietly JSON only
        logger.log({"step": 1, "loss": 1.0})
        assert logger.tensorboard_dir is None
    with pytest.raises(ImportError, match=r"pirl\[tensorboard\]"):
        RunLogger(tmp_path / "c", tensorboard=True)


def test_setup_logging_levels_and_format(capsys: pytest.CaptureFixture[str]) -> None:
    logger = setup_logging(quiet=True, rank=0)
    try:
        child = logging.getLogger("pirl.train")
        child.info("epoch %d done", 3)
        child.debug("hidden")
        setup_logging(quiet=True, rank=2)  # replaces the handler, does not add a second one
        assert sum(getattr(h, "_pirl_handler", False) for h in logger.handlers) == 1
        child.info("not shown on rank 2")
        child.warning("disk %s", "full")
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 2, err
        assert err[0].endswith(" epoch 3 done") and "INFO" not in err[0]
        assert err[1].endswith("[rank 2] WARNING disk full")
    finally:
        for h in list(logger.handlers):
            if getattr(h, "_pirl_handler", False):
                logger.removeHandler(h)
        logger.setLevel(logging.NOTSET)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_off_a_terminal_logs_plain_lines(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a terminal: a line per reported postfix, the final count once, nothing when
    disabled, and never a carriage return."""
    logger = setup_logging(quiet=False, rank=0)
    try:
        assert list(Progress(range(5), desc="features res5", unit="batch")) == list(range(5))
        bar: Progress[None] = Progress(total=4, initial=1, desc="epoch 2/3", unit="step")
        bar.update(1)
        bar.set_postfix({"loss": "4.210", "samples/s": "31"})
        bar.close()  # the count did not move since the last line: nothing more
        bar.close()
        assert list(Progress(range(3), desc="quiet", disable=True)) == [0, 1, 2]
        monkeypatch.setattr(Progress, "PLAIN_INTERVAL_S", 0.0)  # a slow loop: a line per update
        list(Progress(range(2), desc="slow", unit="image"))
        err = capsys.readouterr().err
        assert "\r" not in err
        lines = [line.split(" ", 1)[1] for line in err.splitlines()]  # without the time
        assert lines == ["features res5  batch 5/5  0 s", "epoch 2/3  step 2/4  loss 4.210  "
                         "samples/s 31", "slow  image 1/2  0 s", "slow  image 2/2  0 s"]
    finally:
        for h in list(logger.handlers):
            if getattr(h, "_pirl_handler", False):
                logger.removeHandler(h)
        logger.setLevel(logging.NOTSET)


def test_progress_on_a_terminal_is_a_tqdm_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert list(Progress(range(3), desc="bar", unit="batch")) == [0, 1, 2]
    assert "\r" in terminal.getvalue() and "bar" in terminal.getvalue()


# ---------------------------------------------------------------------------------------------
# Plots


def _fake_run(run_dir: Path, steps: int, peak_lr: float, rate: float, seed: int,
              epochs: int = 5, knn: bool = True) -> None:
    """A realistic log: warm-up + cosine lr, noisy decreasing losses, noisy throughput, kNN per
    epoch, and a resume that re-logs a few steps (as a run interrupted before resume markers
    existed did: no ``"resume"`` record, so read_log keeps both copies and the plot dedupes)."""
    rng = np.random.default_rng(seed)
    per_epoch = steps // epochs
    warm = per_epoch

    def lr_at(s: int) -> float:
        if s < warm:
            return peak_lr * (s + 1) / warm
        return 0.5 * peak_lr * (1 + math.cos(math.pi * (s - warm) / (steps - warm)))

    def write(logger: RunLogger, lo: int, hi: int) -> None:
        for s in range(lo, hi):
            progress = s / steps
            loss_t = 6.0 * math.exp(-3 * progress) + 2.5 + rng.normal(0, 0.15)
            loss_img = 5.5 * math.exp(-2.5 * progress) + 2.3 + rng.normal(0, 0.15)
            epoch = s // per_epoch + 1
            logger.log({"kind": "train", "step": s + 1, "epoch": epoch, "lr": lr_at(s),
                        "loss": 0.5 * (loss_t + loss_img), "loss_t": loss_t,
                        "loss_img": loss_img, "samples_per_s": rate * (1 + rng.normal(0, 0.05))})
            if knn and (s + 1) % per_epoch == 0:
                logger.log({"kind": "eval", "step": s + 1, "epoch": epoch,
                            "knn_top1": 20 + 40 * (1 - math.exp(-epoch / 2)) + rng.normal(0, 1)})

    crash = steps // 2 + 7
    with RunLogger(run_dir, tensorboard=False) as logger:
        write(logger, 0, crash)
    with RunLogger(run_dir, tensorboard=False) as logger:  # resumed from the checkpoint
        logger.log({"kind": "event", "step": steps // 2, "epoch": 3, "event": "resumed"})
        write(logger, steps // 2, steps)


def test_smooth_matches_hand_formula() -> None:
    y = np.array([1.0, 3.0, 2.0, 6.0])
    span = 2.0  # beta = 0.5
    b = 0.5
    s1 = (1 - b) * 1.0
    s2 = b * s1 + (1 - b) * 3.0
    s3 = b * s2 + (1 - b) * 2.0
    s4 = b * s3 + (1 - b) * 6.0
    want = [s1 / (1 - b), s2 / (1 - b**2), s3 / (1 - b**3), s4 / (1 - b**4)]
    np.testing.assert_allclose(smooth(y, span), want)
    np.testing.assert_array_equal(smooth(y, 1), y)
    np.testing.assert_allclose(smooth(np.full(50, 4.2), 10), 4.2)  # constant stays constant


def test_load_curves_dedupes_resumed_steps(tmp_path: Path) -> None:
    _fake_run(tmp_path / "r", steps=100, peak_lr=0.1, rate=500.0, seed=0)
    curves = load_curves(tmp_path / "r")
    assert curves.name == "r"
    x, y = curves.train["loss"]
    np.testing.assert_array_equal(x, np.arange(1, 101))  # each step once, sorted
    raw = [r for r in read_log(tmp_path / "r" / LOG_NAME) if r["kind"] == "train"]
    assert len(raw) > 100  # the resume did re-log steps
    last_57 = [r for r in raw if r["step"] == 57][-1]
    assert y[56] == last_57["loss"]  # the later record wins
    assert set(curves.train) == {"loss", "loss_t", "loss_img", "lr", "samples_per_s"}
    assert curves.knn is not None
    np.testing.assert_array_equal(curves.knn[0], [1, 2, 3, 4, 5])


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_plot_two_runs(tmp_path: Path) -> None:
    _fake_run(tmp_path / "pirl-r18", steps=300, peak_lr=0.12, rate=850.0, seed=1)
    _fake_run(tmp_path / "pirl-r18-lr0.03", steps=240, peak_lr=0.03, rate=900.0, seed=2)
    out = plot_runs([tmp_path / "pirl-r18", tmp_path / "pirl-r18-lr0.03"],
                    tmp_path / "sub" / "plot.png")
    assert out == tmp_path / "sub" / "plot.png"
    w, h = _png_size(out)
    assert (w, h) == (1430, 935)  # 13 x 8.5 inches at 110 dpi
    assert 30_000 < out.stat().st_size < 2_000_000


def test_plot_missing_metrics_and_errors(tmp_path: Path) -> None:
    run = tmp_path / "noknn"
    with RunLogger(run, tensorboard=False) as logger:
        for s in range(1, 4):
            logger.log({"step": s, "epoch": 1, "loss": 5.0 - s})  # no lr, throughput, kNN
    out = plot_runs([run], tmp_path / "p.png")
    assert out.stat().st_size > 10_000
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no log.jsonl"):
        plot_runs([run, tmp_path / "empty"], tmp_path / "q.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_runs([tmp_path / "missing"], tmp_path / "q.png")
    assert not (tmp_path / "q.png").exists()


def test_plot_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="pirl")
    add_plot_parser(parser.add_subparsers(dest="command"))
    _fake_run(tmp_path / "a", steps=60, peak_lr=0.1, rate=100.0, seed=3, knn=False)
    args = parser.parse_args(["plot", str(tmp_path / "a"), "--out", str(tmp_path / "a.png")])
    assert args.func(args) == 0
    assert (tmp_path / "a.png").stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out
    args = parser.parse_args(["plot", str(tmp_path / "nothing"), "--out", str(tmp_path / "b.png")])
    assert args.func(args) == 2
    assert "nothing does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / LOG_NAME).write_text('{"step": 1}\ngarbage\n{"step": 2}\n')
    args = parser.parse_args(["plot", str(bad)])
    assert args.func(args) == 2
    assert "line 2" in capsys.readouterr().err
