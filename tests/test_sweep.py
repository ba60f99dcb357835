"""``pirl sweep``: a tiny real sweep resumes without redoing finished cells, its table is the
mean / std of the cells' JSON, cells are dealt round-robin to GPUs, bad input is refused."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from pirl import config as C
from pirl.cli import main
from pirl.data.subset import prepare_data
from pirl.errors import ConfigError
from pirl.evaluate.standard import TrunkEval
from pirl.sweep import SWEEPS, Cell, Scale
from pirl.sweep import run as sweep_run
from pirl.sweep.cli import SPEC_FILE, spec_from_dict
from pirl.sweep.report import PAPER, write_summary
from pirl.sweep.spec import assign_round_robin, cell_config, custom_spec, parse_seeds, plan_cells

# 20 images (2 per class), 32-px views, batch 8: 2 steps per epoch, 2 epochs.
SCALE = Scale(overrides=("warmup_epochs=0", "num_permutations=10", "embed_dim=16"), epochs=2,
              batch_size=8, workers=0)
PROTOCOL = TrunkEval(knn_k=5, linear_epochs=1, aug_copies=1)


def _parse_table(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[2:]]


def test_tiny_sweep_resumes_and_its_table_is_the_json(tiny_imagetar: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    train, val = prepare_data(tiny_imagetar, tiny_imagetar, 2, 4, tmp_path / "data")
    data = sweep_run.SweepData(train, val)
    spec = custom_spec(["objective.lam=0,1"])
    seeds = (0, 1)
    out = tmp_path / "sweep"
    real = sweep_run.pretrain
    calls: list[str] = []

    def interrupted(cfg: Any, data_path: str, run_dir: Path, **kw: Any) -> Any:
        """The third cell is stopped after one step, as a kill would leave it."""
        calls.append(str(run_dir.parent.relative_to(out)))
        if len(calls) == 3:
            kw["stop_after_steps"] = 1
        return real(cfg, data_path, run_dir, **kw)

    monkeypatch.setattr(sweep_run, "pretrain", interrupted)
    first = sweep_run.run_sweep(spec, seeds, SCALE, data, out, PROTOCOL)
    cells = [c.folder for c in plan_cells(spec, seeds)]
    assert cells == ["objective.lam=0/seed0", "objective.lam=1/seed0",
                     "objective.lam=0/seed1", "objective.lam=1/seed1"]
    assert first.stopped and first.trained == cells[:2] and calls == cells[:3]
    assert not (out / cells[2] / "result.json").exists()
    assert (out / cells[2] / "run" / "checkpoint.pt").is_file()
    before = {c: (out / c / "result.json").read_text() for c in cells[:2]}
    # The half-trained cell resumes only under its own config (workers may differ).
    third = plan_cells(spec, seeds)[2]
    sweep_run.check_half_trained(cell_config(spec, third, Scale(**{**SCALE.__dict__,
                                                                   "workers": 1})),
                                 data, out / cells[2] / "run")
    with pytest.raises(ConfigError, match=r"another config \(optim.epochs differ"):
        sweep_run.check_half_trained(cell_config(spec, third, Scale(**{**SCALE.__dict__,
                                                                       "epochs": 3})),
                                     data, out / cells[2] / "run")

    calls.clear()
    monkeypatch.setattr(sweep_run, "pretrain", lambda *a, **kw: calls.append(
        str(a[2].parent.relative_to(out))) or real(*a, **kw))
    second = sweep_run.run_sweep(spec, seeds, SCALE, data, out, PROTOCOL)
    assert calls == cells[2:], "finished cells were trained again"
    assert second.skipped == cells[:2] and second.trained == cells[2:] and not second.stopped
    assert {c: (out / c / "result.json").read_text() for c in cells[:2]} == before
    results = {c: json.loads((out / c / "result.json").read_text()) for c in cells}
    assert results[cells[2]]["resumed_from_step"] == 1  # the half-trained cell resumed
    assert results[cells[3]]["resumed_from_step"] == 0
    assert all(r["steps"] == 4 and r["epochs"] == 2 for r in results.values())
    assert [results[c]["config"]["objective"]["lam"] for c in cells] == [0.0, 1.0, 0.0, 1.0]
    assert [results[c]["seed"] for c in cells] == [0, 0, 1, 1]

    # The summary is the cells' JSON: mean and sample std (n - 1) over the two seeds, by hand.
    md, png, text = write_summary(spec, seeds, out)
    assert png.is_file() and png.stat().st_size > 0 and text in md.read_text()
    rows = _parse_table(text)
    assert [r[0] for r in rows] == ["0", "1"] and all(r[1] == "2" for r in rows)
    for row, lam in zip(rows, ("0", "1"), strict=True):
        for col, key in ((2, "knn_top1"), (3, "linear_top1")):
            a, b = (results[f"objective.lam={lam}/seed{s}"][key] for s in seeds)
            mean = (a + b) / 2
            std = math.sqrt(((a - mean) ** 2 + (b - mean) ** 2) / (2 - 1))
            assert row[col] == f"{mean:.2f} ± {std:.2f}", (lam, key)

    # A finished cell of another config is refused, not reused (here: more epochs).
    calls.clear()
    with pytest.raises(ConfigError, match="different sweep .*config"):
        sweep_run.run_sweep(spec, seeds, Scale(**{**SCALE.__dict__, "epochs": 3}), data, out,
                            PROTOCOL)
    assert calls == []
    # Every cell is fitted to the data before any training: N = |D| = 20 fails at once.
    bad = custom_spec(["objective.num_negatives=19,20"])
    with pytest.raises(ConfigError, match=r"objective.num_negatives=20/seed0: .*below"):
        sweep_run.run_sweep(bad, seeds, SCALE, data, tmp_path / "bad", PROTOCOL)
    assert calls == [] and not (tmp_path / "bad").exists()


def test_cells_are_dealt_round_robin_to_the_gpus() -> None:
    cells = [Cell(0, i, 0, f"c{i}") for i in range(5)]
    shares = assign_round_robin(cells, 2)
    assert [[c.folder for c in s] for s in shares] == [["c0", "c2", "c4"], ["c1", "c3"]]
    shares = assign_round_robin(cells, 3)
    assert sorted(c.folder for s in shares for c in s) == [f"c{i}" for i in range(5)]
    assert [len(s) for s in shares] == [2, 2, 1]
    assert [len(s) for s in assign_round_robin(cells[:1], 4)] == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="at least one worker"):
        assign_round_robin(cells, 0)


def test_presets_plan_distinct_cells_with_their_keys() -> None:
    for name, spec in SWEEPS.items():
        cells = plan_cells(spec, (0, 1, 2))
        assert len(cells) == 3 * sum(len(s.values) for s in spec.series), name
        assert len({c.folder for c in cells}) == len(cells), name
        if spec.paper:
            assert spec.paper in PAPER
    lam = SWEEPS["fig6-lambda"]
    cfgs = [cell_config(lam, c, SCALE) for c in plan_cells(lam, (5,))]
    assert [c.objective.lam for c in cfgs] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(c.train.seed == 5 and c.optim.epochs == 2 and c.objective.method == "pirl"
               for c in cfgs)
    pretexts = [cell_config(SWEEPS["table5-pretexts"], c, SCALE)
                for c in plan_cells(SWEEPS["table5-pretexts"], (0,))]
    assert [(c.objective.method, c.objective.pretext) for c in pretexts][:3] == [
        ("pirl", "jigsaw"), ("pirl", "rotation"), ("pirl", "jigsaw+rotation")]
    assert pretexts[3].objective.method == "npid"
    jig = SWEEPS["fig7-permutations"]
    jig_cells = [c for c in plan_cells(jig, (0,)) if jig.series[c.si].label == "Jigsaw"]
    assert [cell_config(jig, c, SCALE).objective.num_permutations for c in jig_cells] == [
        10, 100, 1000]


def test_unknown_key_and_bad_input_are_refused(capsys: pytest.CaptureFixture) -> None:
    spec = custom_spec(["objective.no_such_key=1,2"])
    with pytest.raises(ConfigError, match="'objective.no_such_key'.*does not have that key"):
        cell_config(spec, plan_cells(spec, (0,))[0], Scale())
    with pytest.raises(ConfigError, match="--seeds"):
        parse_seeds("0,0")
    assert main(["sweep"]) == 2
    assert main(["sweep", "--vary", "objective.no_such_key=1,2", "--dry-run"]) == 2
    assert "objective.no_such_key" in capsys.readouterr().err
    assert main(["sweep", "fig6-lambda", "--seeds", "a", "--dry-run"]) == 2
    assert main(["sweep", "table5-pretexts", "--values", "1,2", "--dry-run"]) == 2
    assert main(["sweep", "fig6-lambda", "--dry-run", "--seeds", "0,1"]) == 0
    assert capsys.readouterr().out.strip().endswith("10 cells")


def test_named_values_table_and_plot_carry_the_papers_numbers(tmp_path: Path) -> None:
    """Table 5's sweep from hand-written results: the paper column holds Table 5's numbers, the
    row without one says so, and the plot (named x values, second axis) is drawn."""
    spec = SWEEPS["table5-pretexts"]
    seeds = (0, 1, 2)
    knn = {c.folder: 10.0 + 3 * c.vi + 0.5 * c.seed for c in plan_cells(spec, seeds)}
    for cell in plan_cells(spec, seeds)[:-1]:  # the last cell (NPID, seed 2) is not finished
        sweep_run.write_json_atomic({"seed": cell.seed, "knn_top1": knn[cell.folder],
                                     "linear_top1": 2 * knn[cell.folder]},
                                    tmp_path / cell.folder / "result.json")
    md, png, text = write_summary(spec, seeds, tmp_path)
    assert png.stat().st_size > 0 and "11 of 12 cells finished" in md.read_text()
    rows = _parse_table(text)
    assert [(r[0], r[1], r[4]) for r in rows] == [
        ("PIRL-Jigsaw", "3", "62.2"), ("PIRL-Rotation", "3", "60.2"),
        ("PIRL-Jigsaw+Rotation", "3", "63.1"), ("NPID", "2", "-")]
    # NPID: seeds 0 and 1 -> knn 19.0 and 19.5: mean 19.25, std sqrt(2 * 0.25^2 / 1)
    assert rows[3][2] == f"19.25 ± {math.sqrt(2 * 0.25 ** 2):.2f}"
    assert rows[0][3] == "21.00 ± 1.00"  # linear 20, 21, 22


def test_two_keys_give_one_line_each_and_the_summary_can_be_redrawn(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--vary twice: the second key's values are series (a column of the table); sweep.json
    holds the spec, and --summary-only redraws the table from the cells' JSON alone."""
    spec = custom_spec(["objective.lam=0,0.5", "objective.pretext=jigsaw,rotation"])
    assert [s.label for s in spec.series] == ["objective.pretext=jigsaw",
                                              "objective.pretext=rotation"]
    cells = plan_cells(spec, (0,))
    assert cell_config(spec, cells[3], Scale()).objective.pretext == "rotation"
    assert cell_config(spec, cells[3], Scale()).objective.lam == 0.5
    for k, cell in enumerate(cells):
        sweep_run.write_json_atomic({"seed": 0, "knn_top1": float(k), "linear_top1": 1.5 * k},
                                    tmp_path / cell.folder / "result.json")
    for s in SWEEPS.values():
        assert spec_from_dict(json.loads(json.dumps(asdict(s)))) == s
    (tmp_path / SPEC_FILE).write_text(json.dumps({"spec": asdict(spec), "seeds": [0]}))
    assert main(["sweep", "--summary-only", "--out", str(tmp_path)]) == 0
    rows = _parse_table(capsys.readouterr().out.split("\n\nwrote")[0])
    assert [r[:3] for r in rows] == [["objective.pretext=jigsaw", "0", "1"],
                                     ["objective.pretext=jigsaw", "0.5", "1"],
                                     ["objective.pretext=rotation", "0", "1"],
                                     ["objective.pretext=rotation", "0.5", "1"]]
    assert [r[4] for r in rows] == ["0.00 ± 0.00", "1.50 ± 0.00", "3.00 ± 0.00", "4.50 ± 0.00"]


def test_a_cell_at_the_default_scale_is_the_quality_benchmarks_run() -> None:
    """fig6-lambda at lambda 0.5, seed 0, default scale trains exactly the quality benchmark's
    `pirl` row (same config), and the evaluation defaults are the benchmark's."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
    spec_ = importlib.util.spec_from_file_location("quality_for_sweep", path)
    assert spec_ is not None and spec_.loader is not None
    quality = importlib.util.module_from_spec(spec_)
    sys.modules["quality_for_sweep"] = quality
    spec_.loader.exec_module(quality)
    bench = quality.method_config("pirl", quality.DEFAULT_PRESET, [], None, None)
    bench.train.seed, bench.train.workers = 0, 1
    lam = SWEEPS["fig6-lambda"]
    cell = next(c for c in plan_cells(lam, (0,)) if lam.series[0].values[c.vi].label == "0.5")
    assert C.to_dict(cell_config(lam, cell, Scale())) == C.to_dict(bench)
    args = quality.build_parser().parse_args([])
    assert (args.knn_k, args.linear_epochs, args.aug_copies) == (200, 30, 2)
    assert TrunkEval() == TrunkEval(args.knn_k, args.linear_epochs, args.aug_copies)
    from pirl.cli import build_parser

    sweep_args = build_parser().parse_args(["sweep", "fig6-lambda"])
    assert (sweep_args.subset, sweep_args.val_subset) == (quality.DEFAULT_SUBSET,
                                                          quality.DEFAULT_VAL_SUBSET)
    assert (sweep_args.knn_k, sweep_args.linear_epochs, sweep_args.aug_copies,
            sweep_args.threads, sweep_args.workers) == (args.knn_k, args.linear_epochs,
                                                        args.aug_copies, args.threads,
                                                        args.workers)


def test_baseline_comparison_is_a_paired_t_test_by_hand(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """--baseline: per-seed differences and the paired t-test's p.  Differences 1, 2, 3 (3
    seeds): mean 2, sd 1, t = 2 / (1 / sqrt(3)) with 2 degrees of freedom, whose CDF is
    1/2 + t / (2 sqrt(t^2 + 2)), so p = 1 - t / sqrt(t^2 + 2).  A value of no spread (all
    differences 0) has no p; a seed only one side has is left out of the pairing."""
    spec = custom_spec(["objective.lam=0,0.5,1"])
    knn = {"0": [30.0, 31.0, 32.0], "0.5": [31.0, 33.0, 35.0, 99.0], "1": [20.0, 20.5, 22.0]}
    for cell in plan_cells(spec, (0, 1, 2, 3)):
        value = spec.series[0].values[cell.vi].label
        if cell.seed < len(knn[value]):
            sweep_run.write_json_atomic({"seed": cell.seed, "knn_top1": knn[value][cell.seed],
                                         "linear_top1": 40.0},
                                        tmp_path / cell.folder / "result.json")
    (tmp_path / SPEC_FILE).write_text(json.dumps({"spec": asdict(spec), "seeds": [0, 1, 2, 3]}))
    assert main(["sweep", "--summary-only", "--out", str(tmp_path), "--baseline", "0"]) == 0
    printed = capsys.readouterr().out
    section = printed.split("paired t-test's two-sided p-value)\n\n")[1].split("\n\nwrote")[0]
    rows = _parse_table(section)
    t = 2.0 * math.sqrt(3.0)
    p = 1.0 - t / math.sqrt(t * t + 2.0)
    assert rows[0] == ["0.5", "3", f"+2.00 (+1.00, +2.00, +3.00; p = {p:.3f})",
                       "+0.00 (+0.00, +0.00, +0.00)"]
    d = [-10.0, -10.5, -10.0]
    sd = math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    t1 = abs(sum(d) / 3) / (sd / math.sqrt(3.0))
    assert rows[1][2].endswith(f"p = {1.0 - t1 / math.sqrt(t1 * t1 + 2.0):.3f})")
    assert (tmp_path / "summary.md").read_text().count("paired by seed") == 1
    assert main(["sweep", "--summary-only", "--out", str(tmp_path), "--baseline", "0.3"]) == 2
    assert "--baseline '0.3'" in capsys.readouterr().err
