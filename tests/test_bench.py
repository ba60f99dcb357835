"""Speed work of issue 6: the fast colour maths against torchvision / exact rounding, the
benchmarks' reference loss against the package's, and ``pirl bench`` end to end (tiny sizes)."""

from __future__ import annotations

import argparse
import math
from typing import Any

import pytest
import torch
import torchvision.transforms.functional as TF

import pirl.data.views
from pirl import losses as L
from pirl.bench import BENCHMARKS, add_bench_parser, load_benchmark
from pirl.data.views import COLOUR_KEY, colour_batch
from pirl.kernels.colour_torch import _hue_cases, _round_to_uint8, _shift_hue


def test_round_to_uint8_is_round_half_even() -> None:
    x = torch.rand(5, 3, 257) * 255.0
    x[0, 0, :6] = torch.tensor([0.0, 0.5, 1.5, 254.5, 255.0, 127.49999])
    x[0, 1, :2] = torch.tensor([-0.2, 255.3])  # float noise just outside the range
    out = torch.empty(5, 3, 257, dtype=torch.uint8)
    _round_to_uint8(x.clone(), out)
    expected = torch.round(x).clamp(0, 255).to(torch.int16).to(torch.uint8)
    assert torch.equal(out, expected)
    assert out[0, 0, :6].tolist() == [0, 0, 2, 254, 255, 127]


@pytest.mark.parametrize("turns", [i / 24 - 0.5 for i in range(25)] + [0.013, -0.37, 0.49])
def test_hue_every_case_matches_torchvision(turns: float) -> None:
    """Every rotation / direction case of the fast hue formula (shifts on a 1/24-turn grid hit
    the sextant boundaries exactly) against torchvision's rgb -> hsv -> rgb, incl. grey pixels
    and ties between channels."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 200, generator=g)
    x[0, :, :4] = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 0.0], [0.2, 0.7, 0.7],
                                [0.3, 0.3, 0.9]]).t()
    mats, half = _hue_cases([turns])
    out = _shift_hue(x.clone(), mats, half)
    ref = TF.adjust_hue(x.view(3, 10, 20), turns).view(1, 3, 200)
    torch.testing.assert_close(out, ref, atol=3e-6, rtol=0)


def _train_step_module():  # type: ignore[no-untyped-def]
    return load_benchmark("train-step")


def test_reference_nce_equals_package_nce() -> None:
    ts = _train_step_module()
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    pos = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    neg = torch.nn.functional.normalize(torch.randn(4, 30, 8, generator=g), dim=2)
    ref = ts.ReferenceStep.__new__(ts.ReferenceStep)
    ref.tau = 0.07
    torch.testing.assert_close(ref.nce(z, pos, neg), L.nce(z, pos, neg, 0.07).mean(),
                               rtol=1e-5, atol=1e-5)


def test_train_step_benchmark_runs_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    ts = _train_step_module()
    ap = argparse.ArgumentParser()
    ts.add_arguments(ap)
    args = ap.parse_args(["--image-size", "32", "--patch", "0", "--batch", "4", "--negatives",
                          "16", "--bank", "64", "--steps", "1", "--rounds", "1", "--warmup", "0",
                          "--threads", "1"])
    medians = ts.run(args)
    assert set(medians) == {"pirl", "reference (gather B x N, naive NCE)",
                            "trunk only (same pixels)"}
    assert all(math.isfinite(v) and v > 0 for v in medians.values())
    out = capsys.readouterr().out
    assert "| pirl |" in out and "PyContrast" in out


def test_train_step_loader_colours_in_the_collate(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's real-data loader builds its views as pirl.train does: crops drawn per
    sample, the colour of the whole batch in one ColourCollate call (nothing left deferred),
    normalised floats of the configured shapes."""
    ts = _train_step_module()
    calls: list[int] = []

    def counting(samples: list[dict[str, Any]], backend: str) -> dict[str, torch.Tensor]:
        calls.append(len(samples))
        return colour_batch(samples, backend)

    monkeypatch.setattr(pirl.data.views, "colour_batch", counting)
    ap = argparse.ArgumentParser()
    ts.add_arguments(ap)
    cfg = ts.build_config(ap.parse_args(["--image-size", "32", "--patch", "0", "--batch", "3"]))
    batch = next(ts.loader_batches(cfg, "synthetic", 0, torch.device("cpu"), bank_rows=2000))
    assert calls == [3]  # one batched colour call for the 3 samples
    assert COLOUR_KEY not in batch and "skipped" not in batch
    v = cfg.views
    assert batch["image"].shape == (3, 3, v.image_size, v.image_size)
    assert batch["patches"].shape == (3, v.grid * v.grid, 3, v.patch, v.patch)
    assert batch["image"].dtype == batch["patches"].dtype == torch.float32


def test_pirl_bench_parser_and_views_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="pirl")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    args = parser.parse_args(["bench", "views", "--rounds", "1", "--per-round", "1"])
    assert args.benchmark == "views" and args.args == ["--rounds", "1", "--per-round", "1"]
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| baseline (PIL, view by view) |" in out and "pirl fast path" in out
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("nope")
    assert set(BENCHMARKS) == {"views", "loss", "train-step"}


def test_train_step_refuses_a_bank_smaller_than_the_data() -> None:
    """Dataset indices are bank rows: a bank smaller than the data fails up front, naming --bank
    (it used to fail deep inside the step with an IndexError)."""
    ts = _train_step_module()
    ap = argparse.ArgumentParser()
    ts.add_arguments(ap)
    cfg = ts.build_config(ap.parse_args(["--image-size", "32", "--patch", "0", "--batch", "3"]))
    with pytest.raises(SystemExit, match="--bank 64 rows; pass --bank 2000"):
        next(ts.loader_batches(cfg, "synthetic", 0, torch.device("cpu"), bank_rows=64))


def test_data_root_comes_from_pirl_data_or_fails_with_one_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmarks' data folder: --data-root, else $PIRL_DATA; with neither, one line naming
    the variable and how to set it (and no default pointing into this team's machines)."""
    from pirl.bench import DATA_ENV, add_data_root_argument, data_root

    monkeypatch.setenv(DATA_ENV, "/data/here")
    ap = argparse.ArgumentParser()
    add_data_root_argument(ap, "imagenette-96/train.tar")
    assert ap.parse_args([]).data_root == "/data/here"
    assert ap.parse_args(["--data-root", "/elsewhere"]).data_root == "/elsewhere"
    assert str(data_root("/data/here", "x.py")) == "/data/here"
    monkeypatch.delenv(DATA_ENV)
    ap = argparse.ArgumentParser()
    add_data_root_argument(ap, "imagenette-96/train.tar")
    assert ap.parse_args([]).data_root is None
    with pytest.raises(SystemExit) as err:
        data_root(None, "quality.py")
    msg = str(err.value)
    assert "\n" not in msg and "PIRL_DATA" in msg and "export PIRL_DATA=" in msg
    assert "--data-root" in msg and msg.startswith("quality.py: ")
