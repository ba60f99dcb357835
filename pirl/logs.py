"""Run logs: one JSON line per record in ``<run_dir>/log.jsonl``, mirrored to TensorBoard.

A record is a flat dict of scalars plus three fields every consumer relies on::

    {"kind": "train" | "eval" | "event" | "resume", "step": int (global), "epoch": int,
     "time": float (unix seconds), ...scalars such as "loss", "loss_t", "loss_img", "lr",
     "samples_per_s", "knn_top1"}

The file is append-only, so a run that crashed after its last checkpoint and was resumed holds
the steps between that checkpoint and the crash twice.  The resumed run therefore first writes a
``{"kind": "resume", "step": S, "epoch": E}`` marker (S = the checkpoint's step, E = its number
of completed epochs), and :func:`read_log` returns the effective history: the records the
resumed run went on from, without the ones the crashed run wrote after its checkpoint.

JSON lines are always written (they need nothing installed and survive a crash: each line is
flushed as it is written).  TensorBoard event files go to ``<run_dir>/tb`` when the optional
``tensorboard`` package is installed (``pip install 'pirl[tensorboard]'``).

What the command prints while it works (progress, log lines) is :mod:`pirl.console`.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import time
from pathlib import Path
from typing import IO, Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

LOG_NAME = "log.jsonl"
TB_DIR = "tb"
KINDS = ("train", "eval", "event", "resume")
RESUME = "resume"
# Bookkeeping fields: they index a record rather than measure something, so they are not
# mirrored to TensorBoard as scalars.
_INDEX_FIELDS = frozenset({"kind", "step", "epoch", "time"})

Scalar = float | int | str | bool | None


class LogFormatError(ValueError):
    """A line of a ``log.jsonl`` file is not a JSON object; the message names file and line."""


def _tensorboard_writer_class() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or ImportError when TensorBoard is missing.

    Imported lazily: importing it pulls in the ``tensorboard`` package (protobuf, grpc), which
    we only pay for when a run actually writes event files."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


def tensorboard_available() -> bool:
    """True when ``torch.utils.tensorboard`` imports (the ``tensorboard`` package is installed)."""
    try:
        _tensorboard_writer_class()
    except ImportError:
        return False
    return True


def _clean_value(key: str, value: Any) -> Scalar:
    """One record value as a JSON-safe scalar.

    Accepts Python/numpy scalars and 0-dim tensors (anything with ``.item()``).  Non-finite
    floats become ``null``: bare ``NaN``/``Infinity`` are not JSON, and tools like ``jq`` reject
    them."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, RuntimeError) as e:  # a tensor/array with more than one element
            raise TypeError(f"log record field {key!r} is not a scalar: {e}") from e
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return f if math.isfinite(f) else None
    raise TypeError(f"log record field {key!r} has a value of type {type(value).__name__} "
                    f"({value!r}); only numbers, strings, booleans and None can be logged")


class RunLogger:
    """Appends records to ``<run_dir>/log.jsonl`` and, optionally, TensorBoard event files.

    Args:
        run_dir: the run folder (created if missing).
        enabled: False on non-zero ranks of a distributed run: then nothing is written and
            every method is a no-op, so callers need no ``if rank == 0`` around each call.
        tensorboard: True = require TensorBoard (ImportError naming the extra if missing),
            False = JSON lines only, None = use TensorBoard when it is importable.
        resume: for a run that restarts in a folder that already has a log: the fields of the
            ``"resume"`` marker written first, at least ``step`` (the checkpoint's step, 0 when
            there was none) and ``epoch`` (its completed epochs).  TensorBoard is told to hide
            the earlier events after that step (``purge_step``), the counterpart of what
            :func:`read_log` does with the marker.

    Reopening a run folder (a resumed run) appends; existing lines are never rewritten.  The one
    exception is a fragment without its newline left by a crash in the middle of a write: it is
    cut off (with a warning) so the next record starts on a line of its own instead of being
    glued onto broken JSON.
    """

    def __init__(self, run_dir: Path | str, enabled: bool = True,
                 tensorboard: bool | None = None,
                 resume: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOG_NAME
        self.enabled = enabled
        self._file: IO[str] | None = None
        self._tb: Any = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._drop_partial_last_line()
        # Line buffering + an explicit flush per record: a crash loses at most the record being
        # written, never earlier ones sitting in a buffer.
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        purge_step = None
        if resume is not None:
            self.log({**resume, "kind": RESUME})
            # TensorBoard drops the events with step >= purge_step that precede its marker: the
            # resumed run's first step is S + 1.
            purge_step = int(resume["step"]) + 1
        if tensorboard is not False:
            try:
                writer_cls = _tensorboard_writer_class()
            except ImportError as e:
                if tensorboard:
                    raise ImportError(
                        "TensorBoard logging was requested but torch.utils.tensorboard cannot be "
                        f"imported ({e}); install it with: pip install 'pirl[tensorboard]'") from e
                log.debug("TensorBoard not installed; writing %s only", self.path)
            else:
                # flush_secs: TensorBoard's default of 120 s hides the first minutes of a run.
                self._tb = writer_cls(log_dir=str(self.run_dir / TB_DIR), flush_secs=30,
                                      purge_step=purge_step)

    @property
    def tensorboard_dir(self) -> Path | None:
        """Where event files go, or None when TensorBoard is off."""
        return self.run_dir / TB_DIR if self._tb is not None else None

    def _drop_partial_last_line(self) -> None:
        """Cut off a trailing fragment that has no newline (a crash mid-write)."""
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            # Walk back to the last newline; logs are small enough to read the tail in chunks.
            pos, chunk = size, 4096
            while pos > 0:
                start = max(0, pos - chunk)
                f.seek(start)
                block = f.read(pos - start)
                nl = block.rfind(b"\n")
                if nl >= 0:
                    keep = start + nl + 1
                    break
                pos = start
            else:
                keep = 0
            f.truncate(keep)
        log.warning("%s: removed an incomplete last line (%d bytes, left by an interrupted "
                    "write) before appending", self.path, size - keep)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (and mirror its numeric fields to TensorBoard).

        ``kind`` defaults to "train" and ``time`` to now; ``step`` is required because every
        consumer (plots, TensorBoard) indexes by it."""
        if not self.enabled or self._file is None:
            return
        rec: dict[str, Scalar] = {"kind": "train", "time": time.time()}
        for key, value in record.items():
            if not isinstance(key, str):
                raise TypeError(f"log record keys must be strings, got {key!r}")
            rec[key] = _clean_value(key, value)
        if rec["kind"] not in KINDS:
            raise ValueError(f"log record kind {rec['kind']!r} is not one of {KINDS}")
        if not isinstance(rec.get("step"), int) or isinstance(rec.get("step"), bool):
            raise ValueError(f"log record needs an integer 'step', got {record.get('step')!r} "
                             f"in {record!r}")
        self._file.write(json.dumps(rec, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None and rec["kind"] != RESUME:  # bookkeeping, not a measurement
            step = int(rec["step"])  # type: ignore[arg-type]
            walltime = rec["time"] if isinstance(rec["time"], (int, float)) else None
            for key, value in rec.items():
                # bool is an int subclass but not a curve worth drawing; None = non-finite.
                if key in _INDEX_FIELDS or isinstance(value, (str, bool)) or value is None:
                    continue
                # "train/loss", "eval/knn_top1": TensorBoard groups the tags by prefix.
                self._tb.add_scalar(f"{rec['kind']}/{key}", value, global_step=step,
                                    walltime=walltime)

    def close(self) -> None:
        """Flush and close the file and the TensorBoard writer (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_log(path: Path | str, effective: bool = True) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` file, in file order.

    With ``effective`` (the default), a ``"resume"`` marker at step S removes the records before
    it that the crashed run wrote after its checkpoint: every kind but other resume markers with
    a step above S, and also ``"eval"`` records whose epoch is above the marker's epoch (the
    end-of-epoch kNN is logged at the epoch's last step, before that epoch's checkpoint is
    written, so a crash in between repeats it at the same step).  Each step then appears once,
    with the values of the run that continued.  ``effective=False`` returns every line as written.

    Blank lines are skipped.  An unparsable *last* line is what a crash in the middle of a write
    leaves behind: it is skipped with a warning.  Anywhere else a bad line means the file was
    damaged or is not a pirl log, so :class:`LogFormatError` names the file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no run log at {path}")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    # The index of the last non-blank line: a trailing newline must not hide a truncated line.
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            if i == last:
                log.warning("%s, line %d: skipping an incomplete last line (probably an "
                            "interrupted write): %.60r", path, i + 1, line)
                continue
            raise LogFormatError(f"{path}, line {i + 1}: not a JSON object ({e}): "
                                 f"{line[:80]!r}") from e
        if effective and rec.get("kind") == RESUME:
            records = _drop_superseded(records, rec)
        records.append(rec)
    return records


def _after(rec: dict[str, Any], key: str, bound: Any) -> bool:
    """``rec[key] > bound`` for numeric values; False when either is missing or not a number."""
    value = rec.get(key)
    numeric = (int, float)
    return (isinstance(value, numeric) and not isinstance(value, bool)
            and isinstance(bound, numeric) and not isinstance(bound, bool) and value > bound)


def _drop_superseded(records: list[dict[str, Any]], marker: dict[str, Any]) -> list[dict[str, Any]]:
    """``records`` without those a resume ``marker`` says were written after its checkpoint."""
    step, epoch = marker.get("step"), marker.get("epoch")
    return [r for r in records if r.get("kind") == RESUME
            or not (_after(r, "step", step)
                    or (r.get("kind") == "eval" and _after(r, "epoch", epoch)))]
