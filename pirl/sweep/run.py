"""Running a sweep: each cell pretrained, evaluated and recorded; resumable; spread over GPUs.

A cell's folder (``<out>/<cell.folder>``) holds ``run/`` (the pretraining run: config.yaml,
log.jsonl, checkpoint.pt, trunk.pt) and, once evaluated, ``result.json`` (written atomically, so
it exists only for a finished cell).  Rerunning the same sweep skips every cell with a
``result.json``, resumes a half-trained one from its checkpoint (:func:`pirl.train.pretrain`
resumes a run folder) and trains the rest.  A ``result.json`` written for another config, data or
evaluation is refused rather than reused.

On several GPUs (``gpus``), the unfinished cells are dealt round-robin to one worker process per
GPU (:func:`pirl.sweep.spec.assign_round_robin`); each worker sees only its GPU
(``CUDA_VISIBLE_DEVICES``) and runs its cells one after the other.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pirl import config as C
from pirl.data.datasets import open_source
from pirl.errors import ConfigError
from pirl.evaluate.features import EvalSettings
from pirl.evaluate.loading import load_eval_model
from pirl.evaluate.standard import TrunkEval, evaluate_trunk
from pirl.methods import fit_to_dataset
from pirl.sweep.spec import (
    Cell,
    Scale,
    SweepSpec,
    assign_round_robin,
    cell_config,
    copy_config,
    plan_cells,
)
from pirl.train import pretrain

log = logging.getLogger("pirl.sweep")

RESULT = "result.json"


@dataclass(frozen=True)
class SweepData:
    """The labelled images: ``train`` (pretraining, kNN neighbours, probe training) and ``val``
    (scored).  Paths as :func:`pirl.data.open_source` takes them."""

    train: str
    val: str


@dataclass
class SweepOutcome:
    """What :func:`run_sweep` did: cells trained now, skipped (already finished), and whether a
    stop signal ended it early."""

    trained: list[str]
    skipped: list[str]
    stopped: bool = False


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def write_json_atomic(obj: Any, path: Path) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename: a reader (or a
    rerun after a crash) sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _comparable(cfg: C.Config | dict[str, Any]) -> dict[str, Any]:
    """A config as JSON, less what does not change a run's result (its DataLoader workers: the
    views are a function of seed, epoch and index), so a rerun may use other workers."""
    d = _jsonable(C.to_dict(cfg) if isinstance(cfg, C.Config) else cfg)
    d.get("train", {}).pop("workers", None)
    return d


def _identity(spec: SweepSpec, cell: Cell, cfg: C.Config, data: SweepData,
              protocol: TrunkEval) -> dict[str, Any]:
    """What a finished cell's result must match to be reused."""
    s, v = spec.series[cell.si], spec.series[cell.si].values[cell.vi]
    return _jsonable({"series": s.label, "key": s.key, "value": v.label,
                      "overrides": list(v.overrides), "seed": cell.seed,
                      "config": _comparable(cfg), "train_data": data.train,
                      "val_data": data.val, "protocol": asdict(protocol)})


def check_half_trained(cfg: C.Config, data: SweepData, run_dir: Path) -> None:
    """A run folder left by a stopped cell must hold this cell's config (after fitting it to the
    data, as pretraining does) before it is resumed: resuming with, say, other epochs would mix
    two schedules in one trunk."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    fitted = copy_config(cfg)
    source = open_source(data.train)
    fit_to_dataset(fitted, len(source), source, data.train)
    saved = _comparable(C.load_yaml(saved_path))
    differ = sorted(f"{sec}.{k}" for sec, fields in _comparable(fitted).items()
                    for k, v in fields.items() if saved.get(sec, {}).get(k) != v)
    if differ:
        raise ConfigError(f"{saved_path}: a stopped run of another config ({', '.join(differ)} "
                          "differ); use another --out or delete that cell's folder")


def read_result(path: Path) -> dict[str, Any]:
    """A cell's result.json, or a :class:`ConfigError` naming the file if it is not one."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable result file ({e})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: not a result file (expected a JSON object)")
    return obj


def finished_result(spec: SweepSpec, cell: Cell, cfg: C.Config, data: SweepData,
                    protocol: TrunkEval, out: Path) -> dict[str, Any] | None:
    """The cell's saved result if it is finished, None if not; a result of another config, data
    or evaluation raises :class:`ConfigError` (a different sweep in the same folder)."""
    path = out / cell.folder / RESULT
    if not path.is_file():
        return None
    saved = read_result(path)
    want = _identity(spec, cell, cfg, data, protocol)
    differ = sorted(k for k in want if saved.get(k) != want[k])
    if differ:
        raise ConfigError(f"{path}: written by a different sweep ({', '.join(differ)} differ); "
                          "use another --out or delete that cell's folder")
    return saved


def run_cell(spec: SweepSpec, cell: Cell, scale: Scale, data: SweepData, out: Path,
             protocol: TrunkEval, device: str) -> dict[str, Any] | None:
    """Pretrain (or resume) one cell, evaluate its trunk, write its result.json atomically.
    Returns the result, or None when a stop signal stopped the pretraining (the checkpoint
    stays; a rerun resumes it)."""
    cfg = cell_config(spec, cell, scale)
    cell_dir = out / cell.folder
    check_half_trained(cfg, data, cell_dir / "run")
    t0, c0 = time.perf_counter(), time.process_time()
    result = pretrain(copy_config(cfg), data.train, cell_dir / "run", device=device)
    if result.stopped:
        return None
    row = _identity(spec, cell, cfg, data, protocol)
    row.update(epochs=result.epochs, steps=result.steps,
               resumed_from_step=result.resumed_from_step,
               wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0,
               last_train_log={k: v for k, v in result.last_record.items()
                               if isinstance(v, (int, float))})
    model = load_eval_model(str(cell_dir / "run" / "checkpoint.pt"), name=cell.folder)
    settings = EvalSettings(device=torch.device(device), batch_size=256,
                            workers=scale.workers, quiet=True, cache_dir=None)
    t0 = time.perf_counter()
    row.update(evaluate_trunk(model.trunk, open_source(data.train), open_source(data.val),
                              cfg.views, settings, protocol, seed=cell.seed))
    row["eval_wall_s"] = time.perf_counter() - t0
    write_json_atomic(row, cell_dir / RESULT)
    return row


def check_cells(spec: SweepSpec, cells: list[Cell], scale: Scale, data: SweepData) -> None:
    """Resolve every cell's config and fit it to the training set before any training, so a
    bad key or value (an N above |D| - 1, an unknown key) fails now, not hours in."""
    n = len(open_source(data.train))
    for cell in cells:
        cfg = cell_config(spec, cell, scale)
        try:
            fit_to_dataset(cfg, n)
        except ConfigError as e:
            raise ConfigError(f"sweep {spec.name!r}, cell {cell.folder}: {e}") from None


def run_cells(spec: SweepSpec, cells: list[Cell], scale: Scale, data: SweepData, out: Path,
              protocol: TrunkEval, device: str) -> SweepOutcome:
    """Run ``cells`` one after the other on ``device``, skipping the finished ones."""
    outcome = SweepOutcome(trained=[], skipped=[])
    for k, cell in enumerate(cells):
        cfg = cell_config(spec, cell, scale)
        if finished_result(spec, cell, cfg, data, protocol, out) is not None:
            outcome.skipped.append(cell.folder)
            continue
        log.info("cell %d/%d: %s", k + 1, len(cells), cell.folder)
        row = run_cell(spec, cell, scale, data, out, protocol, device)
        if row is None:
            outcome.stopped = True
            log.warning("stopped in %s; rerun the same command to resume", cell.folder)
            break
        outcome.trained.append(cell.folder)
        log.info("%s: kNN %.2f, linear %.2f (%.1f min)", cell.folder, row["knn_top1"],
                 row["linear_top1"], (row["wall_s"] + row["eval_wall_s"]) / 60)
    return outcome


def _gpu_worker(gpu: int, spec: SweepSpec, cells: list[Cell], scale: Scale, data: SweepData,
                out: str, protocol: TrunkEval, threads: int, device: str) -> None:
    """One GPU's process: sees only that GPU, runs its cells in order."""
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # before the first CUDA call of this process
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s gpu{gpu}: %(message)s")
    run_cells(spec, cells, scale, data, Path(out), protocol, device)


def run_sweep(spec: SweepSpec, seeds: tuple[int, ...], scale: Scale, data: SweepData,
              out: Path, protocol: TrunkEval = TrunkEval(), device: str = "cpu",
              gpus: list[int] | None = None, threads: int = 1,
              worker_device: str = "cuda") -> SweepOutcome:
    """Every cell of ``spec`` x ``seeds`` into ``out``: on ``device`` one after the other, or
    dealt round-robin to one worker process per GPU of ``gpus``, each running on
    ``worker_device`` with only its GPU visible (``"cpu"`` exercises the spreading on a machine
    without GPUs).  Cells already finished are skipped; the caller writes the summary
    (:func:`pirl.sweep.report.write_summary`)."""
    cells = plan_cells(spec, seeds)
    check_cells(spec, cells, scale, data)
    if not gpus:
        return run_cells(spec, cells, scale, data, out, protocol, device)
    pending: list[Cell] = []
    skipped: list[Cell] = []
    for cell in cells:
        done = finished_result(spec, cell, cell_config(spec, cell, scale), data, protocol, out)
        (skipped if done is not None else pending).append(cell)
    ctx = mp.get_context("spawn")  # a fresh interpreter per GPU: no CUDA state inherited
    procs = []
    for gpu, share in zip(gpus, assign_round_robin(pending, len(gpus)), strict=True):
        if share:
            p = ctx.Process(target=_gpu_worker, args=(gpu, spec, share, scale, data, str(out),
                                                      protocol, threads, worker_device))
            p.start()
            procs.append((gpu, p))
    failed = []
    for gpu, p in procs:
        p.join()
        if p.exitcode != 0:
            failed.append(f"gpu {gpu} (exit code {p.exitcode})")
    trained = [c.folder for c in pending if (out / c.folder / RESULT).is_file()]
    if failed:
        raise RuntimeError(f"sweep workers failed: {', '.join(failed)}; the finished cells are "
                           "kept, rerun the same command to resume")
    return SweepOutcome(trained=trained, skipped=[c.folder for c in skipped],
                        stopped=len(trained) < len(pending))
