"""benchmarks/quality.py: the subset archive, the per-method configs and a --quick smoke run."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import IMAGENETTE_DIR

from pirl import config as C
from pirl.data.datasets import TarSource, open_source
from pirl.methods import fit_to_dataset

REPO = Path(__file__).resolve().parents[1]
DATA = IMAGENETTE_DIR
needs_data = pytest.mark.skipif(not (DATA / "train.tar").is_file(),
                                reason=f"real images not found at {DATA}")


def _load_benchmark():  # benchmarks/ is not a package: import the script by path
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "benchmarks" /
                                                  "quality.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quality_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


Q = _load_benchmark()


@needs_data
def test_subset_keeps_k_first_images_per_class_byte_for_byte(tmp_path: Path) -> None:
    src = open_source(DATA / "val.tar")
    path = Q.write_subset(src, 3, tmp_path / "val-3pc.tar")
    sub = open_source(path)
    assert isinstance(src, TarSource) and isinstance(sub, TarSource)
    assert sub.classes == src.classes
    assert Counter(sub.targets) == {y: 3 for y in range(len(src.classes))}
    # the first 3 of each class in the source's order, with identical bytes
    expected = [i for y in range(len(src.classes))
                for i in [j for j, t in enumerate(src.targets) if t == y][:3]]
    assert sorted(sub.members) == sorted(src.members[i] for i in expected)
    by_name = {src.members[i]: i for i in expected}
    for k in range(len(sub)):
        assert sub.read_bytes(k) == src.read_bytes(by_name[sub.members[k]])
    with pytest.raises(ValueError, match="at least 1"):
        Q.write_subset(src, 0, tmp_path / "none.tar")


def test_methods_differ_only_in_their_own_settings() -> None:
    """Same trunk, views, optimiser and seed for every trained method: the fairness claim."""
    cfgs = {m: C.to_dict(Q.method_config(m, "tiny64-r18", ["tau=0.2"], 3, 32))
            for m, s in Q.METHOD_SETTINGS.items() if s is not None}
    for name, cfg in cfgs.items():
        assert cfg["optim"]["epochs"] == 3 and cfg["optim"]["batch_size"] == 32
        assert cfg["objective"]["tau"] == 0.2  # the user's override reaches every method
        for other_name, other in cfgs.items():
            for section in ("views", "model", "optim"):
                a, b = dict(cfg[section]), dict(other[section])
                if "pirl-bn-all" in (name, other_name):  # that ablation's one model setting
                    a.pop("bn_stats", None)
                    b.pop("bn_stats", None)
                assert a == b, (name, other_name, section)
    assert cfgs["npid"]["objective"]["num_negatives"] == 4096
    assert cfgs["npid++"]["objective"]["num_negatives"] == 32000
    # ... an upper bound, like a preset's: capped on a dataset smaller than 32,001 images
    npid_pp = Q.method_config("npid++", "tiny64-r18", [], 3, 32)
    assert fit_to_dataset(npid_pp, 9469) and npid_pp.objective.num_negatives == 9468
    assert cfgs["pirl-rotation"]["objective"]["pretext"] == "rotation"
    assert cfgs["pirl-jigsaw+rotation"]["objective"]["pretext"] == "jigsaw+rotation"
    assert cfgs["pirl-shared"]["objective"]["negatives"] == "shared"
    assert cfgs["pirl"]["objective"]["negatives"] == "per-sample"
    assert cfgs["pirl-bn-all"]["model"]["bn_stats"] == "all"
    assert cfgs["pirl"]["model"]["bn_stats"] == "image"


def test_table_has_one_row_per_method() -> None:
    rows = [{"method": "random", "epochs": 0, "wall_s": 0.0, "knn_top1": 30.0,
             "linear_top1": 40.5},
            {"method": "pirl", "epochs": 8, "wall_s": 90.0, "knn_top1": 35.25,
             "linear_top1": 44.0}]
    lines = Q.table(rows).splitlines()
    assert lines[0] == "| method | epochs | wall time (min) | kNN top-1 | linear top-1 |"
    assert lines[2] == "| random | 0 | 0.0 | 30.00 | 40.50 |"
    assert lines[3] == "| pirl | 8 | 1.5 | 35.25 | 44.00 |"


@needs_data
def test_quick_run_trains_loads_and_evaluates_each_kind(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    methods = ["random", "pirl", "npid", "jigsaw", "rotation"]
    result = Q.main(["--quick", "--methods", ",".join(methods), "--workers", "0",
                     "--train-data", str(DATA / "train.tar"), "--val-data", str(DATA / "val.tar"),
                     "--threads", "1", "--out", str(tmp_path)])
    assert [r["method"] for r in result["rows"]] == methods
    assert result["num_train"] == 40 and result["num_val"] == 20
    for r in result["rows"]:
        assert 0.0 <= r["knn_top1"] <= 100.0 and 0.0 <= r["linear_top1"] <= 100.0
        trained = r["method"] != "random"
        assert r["epochs"] == (1 if trained else 0)
        assert (r["wall_s"] > 0) == trained
        if trained:  # 40 images / batch 8 = 5 steps, and the run folder holds the checkpoint
            assert r["steps"] == 5
            assert (tmp_path / "runs" / r["method"] / "checkpoint.pt").is_file()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert "| pirl | 1 |" in capsys.readouterr().out
