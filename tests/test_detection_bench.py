"""benchmarks/detection.py: the mean ± std table, and a --quick run end to end that a rerun
skips."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import IMAGENETTE_DIR

REPO = Path(__file__).resolve().parents[1]
DET_DIR = IMAGENETTE_DIR.parent / "detection"
needs_data = pytest.mark.skipif(
    not (IMAGENETTE_DIR / "train.tar").is_file() or not (DET_DIR / "raccoon.tar").is_file(),
    reason=f"real images not found at {IMAGENETTE_DIR} / {DET_DIR}")


def _load_benchmark():  # benchmarks/ is not a package: import the script by path
    spec = importlib.util.spec_from_file_location("detection_bench",
                                                  REPO / "benchmarks" / "detection.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["detection_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


B = _load_benchmark()


def test_summary_is_mean_and_sample_std_over_finished_seeds() -> None:
    cells = [{"method": "pirl", "dataset": "bccd", "seed": s, "AP": ap, "AP50": 2 * ap,
              "AP75": None} for s, ap in ((0, 10.0), (1, 14.0))]
    cells += [{"method": "random", "dataset": "bccd", "seed": 0, "AP": 1.0, "AP50": 3.0,
               "AP75": 0.5}, {"method": "random", "dataset": "bccd", "seed": 1, "failed": 1}]
    rows = B.summarise(cells, ["pirl", "random"], ["bccd"])
    assert rows[0]["seeds"] == [0, 1] and rows[0]["AP"] == 12.0
    assert rows[0]["AP_std"] == pytest.approx(2 ** 0.5 * 2)  # sample std of 10, 14
    assert rows[1]["seeds"] == [0] and rows[1]["AP_std"] is None  # the failed seed is left out
    lines = B.table(rows).splitlines()
    assert lines[0] == "| pre-training | dataset | seeds | AP | AP50 | AP75 |"
    assert lines[2] == "| pirl | bccd | 2 | 12.00 ± 2.83 | 24.00 ± 5.66 | - |"
    assert lines[3] == "| random | bccd | 1 | 1.00 | 3.00 | 0.50 |"


def test_modes_fill_what_was_not_given() -> None:
    args = B.resolve(B.build_parser().parse_args(
        ["--device", "cuda", "--iters", "10", "--data-root", "/data"]))
    assert (args.mode, args.preset, args.min_size, args.iters) == ("cuda", "imagenette96-r18",
                                                                     480, 10)
    assert args.detection_root == "/data/detection" and args.workers == 8
    args = B.resolve(B.build_parser().parse_args(["--data-root", "/data"]))
    assert (args.mode, args.preset, args.subset, args.schedule, args.seeds) == (
        "cpu", "imagenette-small", 200, "short", "0,1,2")
    assert args.workers == 1 and args.overrides == []
    assert args.train_data == "/data/imagenette-96/train.tar"
    assert "--lr-rule" not in B.finetune_args(args)  # the paper's rule per starting point
    assert "--bn-recalibrate" not in B.finetune_args(args)
    args = B.resolve(B.build_parser().parse_args(["--data-root", "/data", "--lr-rule",
                                                  "contrastive", "--bn-recalibrate", "64"]))
    shared = B.finetune_args(args)
    assert shared[shared.index("--lr-rule") + 1] == "contrastive"
    assert shared[shared.index("--bn-recalibrate") + 1] == "64"


@needs_data
def test_quick_run_end_to_end_then_resumed(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--quick", "--methods", "pirl,supervised,random", "--data-root",
            str(IMAGENETTE_DIR.parent), "--workers", "0", "--out", str(tmp_path)]
    result = B.main(argv)
    cells = result["cells"]
    assert [(c["method"], c["dataset"]) for c in cells] == [
        (m, d) for d in ("raccoon", "bccd") for m in ("pirl", "supervised", "random")]
    for c in cells:
        assert "failed" not in c or c["failed"] is None, c
        assert c["iterations"] == 2 and 0.0 <= c["AP50"] <= 100.0 and not c["skipped"]
    # The lr rule follows the pre-training: contrastive for PIRL, supervised otherwise.
    assert {c["method"]: c["lr_rule"] for c in cells} == {
        "pirl": "contrastive", "supervised": "supervised", "random": "supervised"}
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == \
        json.loads(json.dumps(result["summary"]))
    out = capsys.readouterr().out
    assert "| supervised | bccd | 1 |" in out and "pirl eval detection --checkpoint CKPT" in out
    # Rerunning skips every finished cell and reports the same numbers.
    again = B.main(argv)
    assert all(c["skipped"] for c in again["cells"])
    assert again["summary"] == result["summary"]


def test_child_argv_keeps_everything_but_methods_and_parallel() -> None:
    argv = ["--quick", "--methods", "pirl,random", "--parallel=2", "--seeds", "0", "--out", "o"]
    assert B.child_argv(argv, "pirl") == ["--quick", "--seeds", "0", "--out", "o", "--methods",
                                          "pirl"]
    assert B.child_argv(["--parallel", "3", "--methods=npid++"], "jigsaw") == [
        "--methods", "jigsaw"]


@needs_data
def test_parallel_runs_one_process_per_pretraining_and_collects(tmp_path: Path) -> None:
    """--parallel 2: each pre-training and its fine-tunes run in a process of its own (their
    logs are written), and this process collects every cell as already finished."""
    argv = ["--quick", "--methods", "pirl,random", "--datasets", "raccoon", "--parallel", "2",
            "--data-root", str(IMAGENETTE_DIR.parent), "--workers", "0", "--out", str(tmp_path)]
    result = B.main(argv)
    assert [(c["method"], c["skipped"]) for c in result["cells"]] == [("pirl", True),
                                                                       ("random", True)]
    assert all(c["failed"] is None and c["AP50"] is not None for c in result["cells"])
    for m in ("pirl", "random"):
        assert "raccoon, seed 0: AP" in (tmp_path / f"log_{m}.txt").read_text()
    assert (tmp_path / "pretrain" / "pirl" / "trunk.pt").is_file()
