"""`pirl demo` end to end on a shrunken built-in dataset: it trains, compares with random init
through the same kNN protocol, and writes its JSON and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pirl.data.synthetic as synthetic
from pirl.cli import main


def test_demo_runs_and_reports_both_trunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(synthetic.DEFAULT_SIZES, "train", 120)
    monkeypatch.setitem(synthetic.DEFAULT_SIZES, "val", 60)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--device", "cpu", "--quiet",
                 "workers=0"]) == 0
    text = capsys.readouterr().out
    assert "| PIRL pretrained |" in text and "| random init |" in text
    summary = json.loads((out / "demo.json").read_text())
    rows = summary["knn"]
    assert set(rows) == {"PIRL pretrained", "random init"}
    for r in rows.values():
        assert r["num_val"] == 60 and 0 <= r["top1"] <= r["top5"] <= 100
    assert summary["gain_top1"] == pytest.approx(rows["PIRL pretrained"]["top1"]
                                                 - rows["random init"]["top1"])
    # 120 images, batch 32, drop_last: 3 steps; the negatives were capped at |D| - 1
    assert summary["steps"] == 3 and summary["config"]["objective"]["num_negatives"] == 119
    assert (out / "training.png").stat().st_size > 5000 and (out / "trunk.pt").is_file()
