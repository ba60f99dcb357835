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

Also :func:`setup_logging`, the ``logging`` configuration used by the ``pirl`` command, and
:class:`Progress`, every progress display of the package: a bar on a terminal, log lines in a
file or a pipe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

log = logging.getLogger(__name__)
_progress_log = logging.getLogger("pirl.progress")

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


def stderr_is_terminal() -> bool:
    """Whether ``sys.stderr`` (where progress bars and log lines go) is an interactive terminal."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # no stream at all, or a closed one
        return False


class Progress(Generic[T]):
    """Progress of a loop: a tqdm bar on a terminal, plain log lines anywhere else.

    A bar redraws itself with carriage returns, which in a file or a pipe (``pirl demo > log``, a
    cluster job's log) pile up as one frame per update.  When stderr is not a terminal, progress
    is logged instead (INFO on the ``pirl.progress`` logger, so it reads like the other messages)
    as whole lines such as::

        epoch 3/12  step 120/560  loss 4.210  samples/s 31

    A line is written whenever the caller reports new numbers (:meth:`set_postfix`), otherwise
    at most every ``PLAIN_INTERVAL_S`` seconds (the count and the time so far), and by
    :meth:`close` when the count moved since the last line.  Iterating over a ``Progress`` counts
    one per item and closes it at the end, as tqdm does; without an iterable, call
    :meth:`update` and :meth:`close`.

    Args:
        iterable: what to loop over; its length is the default ``total``.
        total: the count at completion (None: unknown).
        desc: what progresses: the bar's label, the start of every line.
        unit: what is counted ("step", "batch", "image").
        initial: the count to start from (an epoch resumed halfway).
        disable: show nothing (``train.quiet``, ranks other than 0).
        leave: keep the finished bar on the terminal.
    """

    PLAIN_INTERVAL_S = 30.0

    def __init__(self, iterable: Iterable[T] | None = None, *, total: int | None = None,
                 desc: str = "", unit: str = "it", initial: int = 0, disable: bool = False,
                 leave: bool = False) -> None:
        if total is None and isinstance(iterable, Sized):
            with contextlib.suppress(TypeError):  # e.g. a DataLoader over an iterable dataset
                total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = initial
        self.disable = disable
        self._bar: Any = None
        self._postfix: dict[str, Any] = {}
        self._start = self._last_line_time = time.monotonic()
        self._last_line_n = initial
        if not disable and stderr_is_terminal():
            from tqdm import tqdm

            self._bar = tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial,
                             dynamic_ncols=True, leave=leave)

    def __iter__(self) -> Iterator[T]:
        if self.iterable is None:
            raise TypeError("Progress: nothing to iterate over (no iterable was given)")
        if self._bar is not None:
            yield from self._bar  # tqdm counts and closes itself
            return
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif not self.disable and time.monotonic() - self._last_line_time >= self.PLAIN_INTERVAL_S:
            self._line(with_postfix=False)

    def set_postfix(self, values: dict[str, Any]) -> None:
        """Show these numbers after the count (a bar's postfix; a line of its own otherwise)."""
        self._postfix = dict(values)
        if self._bar is not None:
            self._bar.set_postfix(self._postfix)
        elif not self.disable:
            self._line(with_postfix=True)

    def close(self) -> None:
        """Remove the bar, or log the final count if no line showed it yet (safe to call twice)."""
        if self._bar is not None:
            self._bar.close()
        elif not self.disable and self.n != self._last_line_n:
            self._line(with_postfix=False)
        self.disable = True  # nothing more after closing

    def _line(self, with_postfix: bool) -> None:
        count = f"{self.unit} {self.n}" + (f"/{self.total}" if self.total is not None else "")
        parts = [self.desc, count] if self.desc else [count]
        if with_postfix:
            parts += [f"{key} {value}" for key, value in self._postfix.items()]
        else:
            parts.append(f"{time.monotonic() - self._start:.0f} s")
        _progress_log.info("  ".join(parts))
        self._last_line_time, self._last_line_n = time.monotonic(), self.n


class _StderrHandler(logging.Handler):
    """Writes to the *current* ``sys.stderr`` (looked up per record, so redirection and test
    capture work), through ``tqdm.write`` when progress bars may be on screen (stderr is a
    terminal) so a log line does not tear a bar in half."""

    def __init__(self, use_tqdm: bool) -> None:
        super().__init__()
        self.use_tqdm = use_tqdm

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if self.use_tqdm and stderr_is_terminal():
                from tqdm import tqdm

                tqdm.write(msg, file=sys.stderr)
            else:
                sys.stderr.write(msg + "\n")
                sys.stderr.flush()
        except Exception:  # a logging failure must never kill a training run
            self.handleError(record)


class _ConciseFormatter(logging.Formatter):
    """``12:03:04 message`` for INFO; the level (and logger name for DEBUG) only when it adds
    something; ``[rank N]`` on non-zero ranks so multi-process warnings can be told apart."""

    def __init__(self, rank: int) -> None:
        super().__init__(datefmt="%H:%M:%S")
        self.prefix = f"[rank {rank}] " if rank else ""

    def format(self, record: logging.LogRecord) -> str:
        when = self.formatTime(record, self.datefmt)
        level = "" if record.levelno == logging.INFO else f"{record.levelname} "
        name = f"{record.name}: " if record.levelno <= logging.DEBUG else ""
        text = f"{when} {self.prefix}{level}{name}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


_HANDLER_MARK = "_pirl_handler"


def setup_logging(quiet: bool = False, rank: int = 0) -> logging.Logger:
    """Configure the ``pirl`` logger for the command line; returns it.

    Rank 0 shows INFO and above, other ranks WARNING and above (N copies of every message would
    bury the one that matters).  ``quiet`` (logs and CI: no progress bars) keeps the messages but
    writes them straight to stderr; otherwise, on a terminal, they go through ``tqdm.write`` so
    they print above the progress bars (see :class:`Progress`).  Calling it again replaces the
    earlier handler rather than adding one.
    """
    logger = logging.getLogger("pirl")
    for handler in list(logger.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            logger.removeHandler(handler)
    handler = _StderrHandler(use_tqdm=not quiet)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(_ConciseFormatter(rank))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # Propagation stays on so an application's own root handlers (and pytest's caplog) still
    # see the records; the CLI configures no root handler, so nothing prints twice there.
    return logger
