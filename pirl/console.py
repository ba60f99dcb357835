"""What the ``pirl`` command prints while it works: the ``logging`` set-up
(:func:`setup_logging`) and :class:`Progress`, every progress display of the package: a tqdm bar
on a terminal, plain log lines in a file or a pipe (SLURM logs, ``> run.log``), so that a
redirected run writes readable lines instead of carriage-return frames.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import Any, Generic, TypeVar

_progress_log = logging.getLogger("pirl.progress")

T = TypeVar("T")


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
