"""Crash-safe checkpoints: atomic write, previous copy kept, safe load.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, and only then
renamed over ``checkpoint.pt`` (after the old one has been renamed to ``checkpoint.prev.pt``).  A
process killed at any moment therefore leaves either the new checkpoint, or the previous one (plus
a stray temporary file that is ignored and cleaned up), never a half-written file under the real
name.  Loading always uses ``torch.load(..., weights_only=True)``: nothing in a checkpoint file is
executed.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pirl.config import Config, to_dict

if TYPE_CHECKING:  # only the type: checkpoint readers (export, evaluation) need no objective
    from pirl.methods import Objective

log = logging.getLogger(__name__)

LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
FORMAT = "pirl"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the run (message names the file)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose unpickling would run code.  Never silently replaced by an older file:
    a crafted file in a run folder is a security problem to look at, not a disk fault."""


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path, keep_previous: Path | None = None) -> None:
    """``torch.save`` ``obj`` to ``path`` so that a crash never leaves a partial file there.

    If ``keep_previous`` is given, the file currently at ``path`` is moved there first.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    if keep_previous is not None and path.exists():
        os.replace(path, keep_previous)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def safe_load(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that name the file.

    weights_only's unpickler only rebuilds tensors and plain containers/numbers/strings, so a
    malicious pickle cannot run code here.  Its refusal of a *global* (a function or class the
    pickle wants to call: ``os.system``, ``eval``, any custom class) becomes an
    :class:`UnsafeCheckpointError`; its other failures (garbage bytes: "Unsupported operand")
    mean a damaged file and become a plain :class:`CheckpointError`.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        wanted = _GLOBAL.search(text)
        if wanted or "global" in text.lower():
            what = f" ({wanted.group(1)})" if wanted else ""
            raise UnsafeCheckpointError(
                f"{p}: refused to load: unpickling it would run arbitrary code{what}; nothing "
                "in it was executed. pirl only reads weights-only checkpoints (tensors, numbers, "
                "strings and containers)") from None
        raise CheckpointError(f"{p}: not a PyTorch checkpoint (damaged or not a checkpoint: "
                              f"{_weights_only_reason(text)})") from None
    except Exception as e:
        # A text or truncated file surfaces as KeyError, EOFError, RuntimeError (zip reader), ...
        raise CheckpointError(
            f"{p}: not a PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})") from None


# torch words it "unsupported GLOBAL posix.system whose module ..." or "Unsupported global:
# GLOBAL builtins.eval was not an allowed global"
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _weights_only_reason(text: str) -> str:
    """The unpickler's own reason inside torch's long weights_only message."""
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return m.group(1).strip() if m else _first_line(ValueError(text))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "empty or truncated file"


def save_run_checkpoint(state: dict[str, Any], run_dir: Path) -> Path:
    """Write a training checkpoint into ``run_dir``, keeping the previous one."""
    path = Path(run_dir) / LATEST
    atomic_save({"format": FORMAT, "version": VERSION, **state}, path,
                keep_previous=Path(run_dir) / PREVIOUS)
    return path


def load_run_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint in ``run_dir``, or ``None`` when there is none.

    If the latest cannot be read (a disk fault, a truncated copy), the previous one is used with a
    warning; if neither can be read, the error names both files.  A checkpoint refused because
    unpickling it would run code raises :class:`UnsafeCheckpointError` at once: someone put it
    there, and quietly training on from the previous file would hide that.
    """
    run_dir = Path(run_dir)
    latest, previous = run_dir / LATEST, run_dir / PREVIOUS
    for stray in run_dir.glob(f".{LATEST}.tmp-*"):
        # Left behind by a process killed mid-write; never a valid checkpoint.
        stray.unlink(missing_ok=True)
    errors = []
    for path in (latest, previous):
        if not path.exists():
            continue
        try:
            ckpt = safe_load(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            errors.append(str(e))
            if path == latest:
                log.warning("%s; trying the previous checkpoint", e)
            continue
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            errors.append(f"{path}: not a pirl training checkpoint")
            if path == latest:
                log.warning("%s: not a pirl training checkpoint; trying the previous checkpoint",
                            path)
            continue
        if path == previous:
            log.warning("resuming from the previous checkpoint %s", path)
        return ckpt
    if errors:
        raise CheckpointError("; ".join(errors))
    return None


def training_state(cfg: Config, dataset_size: int, model: nn.Module, objective: Objective,
                   optimizer: torch.optim.Optimizer, permutations: torch.Tensor | None,
                   position: dict[str, int]) -> dict[str, Any]:
    """Everything a resumed run needs, for :func:`save_run_checkpoint`.  ``position``: epoch,
    step, batch and ``skipped`` summed over ranks (rank 0 writes the file, and its own count
    alone would lose the other ranks' skips)."""
    return {
        "config": to_dict(cfg),
        "dataset_size": dataset_size,
        "model": model.state_dict(),
        "objective": objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "permutations": permutations,
        "position": position,
    }


def restore_training_state(ckpt: dict[str, Any], model: nn.Module, objective: Objective,
                           optimizer: torch.optim.Optimizer) -> None:
    """Inverse of :func:`training_state` except the position, which the caller reads; strict:
    a partial load must fail loudly, never pass silently."""
    try:
        model.load_state_dict(ckpt["model"], strict=True)
        objective.load_state_dict(ckpt["objective"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint does not match this model: {str(e)[:300]}") from None
    set_rng_state(ckpt["rng"])


def rng_state() -> dict[str, Any]:
    """Every global RNG state, in types ``weights_only`` loading accepts."""
    np_state: Any = np.random.get_state()  # typed as dict | tuple; legacy form is a tuple
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
