"""Which colour engine runs (``views.colour_backend``), and the one call that runs it.

``torch`` (:mod:`pirl.kernels.colour_torch`: batched, cache-blocked torch operations; always
there) and ``numba`` (:mod:`pirl.kernels.colour_numba`: the same formulas compiled into one loop
per image row; ``pip install pirl[fast]``); ``auto`` (the default) takes numba when it is
installed.  The names are :data:`pirl.config.COLOUR_BACKENDS`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from pirl.config import COLOUR_BACKENDS, ConfigError
from pirl.kernels.colour_job import ColourJob, check_jobs
from pirl.kernels.colour_ops import apply_ops_, without_grayscale
from pirl.kernels.colour_torch import colour_checked_jobs, flip_job_outputs_


@functools.cache
def numba_available() -> bool:
    """Whether the numba colour kernel can be imported (numba installed and working).  The
    import compiles the kernel, or loads it from numba's disk cache, so the first call does that
    work: made in the parent process (ColourCollate), it is inherited by forked workers."""
    # Imported here, not at the top: numba is optional, and importing the kernel costs the
    # compilation (or the cache load), which only a run that uses the backend should pay.
    try:
        import pirl.kernels.colour_numba  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_colour_backend(backend: str) -> str:
    """``"auto"`` -> ``"numba"`` when :func:`numba_available`, else ``"torch"``; ``"numba"`` and
    ``"torch"`` are returned as they are, after checking that numba is there."""
    # ConfigError (a ValueError): the CLI prints it as a one-line error naming the key.
    if backend not in COLOUR_BACKENDS:
        raise ConfigError(f"views.colour_backend={backend!r}: expected one of {COLOUR_BACKENDS}")
    if backend == "auto":
        return "numba" if numba_available() else "torch"
    if backend == "numba" and not numba_available():
        raise ConfigError("views.colour_backend='numba' needs numba: pip install 'pirl[fast]' "
                          "(or numba), or set views.colour_backend=torch")
    return backend


def photometric_jobs(jobs: Sequence[ColourJob], backend: str = "auto") -> None:
    """Colour jitter, grayscale and flip every job's sources into its outs: one call for all the
    views of a sample, or of a batch of samples (:class:`~pirl.kernels.colour_job.ColourJob`).
    ``backend``: one of :data:`pirl.config.COLOUR_BACKENDS`; numba runs on CPU tensors only
    (``"auto"`` falls back to torch for other devices).  Each backend gives a batch of jobs bit
    for bit the pixels of one call per job; the two backends agree to float rounding (one grey
    level on a few values in a million).  Jobs whose parameters carry ``ops`` (the optional
    posterize / sharpness / solarize / autocontrast / equalize) get them after the jitter and
    before their grayscale, on uint8 (:mod:`pirl.kernels.colour_ops`; numba:
    :mod:`pirl.kernels.colour_ops_numba`).
    """
    if not jobs:
        return
    shapes = check_jobs(jobs)
    with_ops = [job for job in jobs if job.params.ops is not None]
    if with_ops:  # the optional operations run on uint8, after the engine (colour_ops)
        jobs = without_grayscale(jobs)
    resolved = resolve_colour_backend(backend)
    on_cpu = all(t.device.type == "cpu" for job in jobs for t in (*job.sources, *job.outs))
    if resolved == "numba" and not on_cpu:
        if backend == "numba":
            raise ValueError("views.colour_backend='numba' works on CPU tensors only")
        resolved = "torch"
    if resolved == "numba":
        # Optional dependency, imported only on this path (resolve_colour_backend has checked
        # that it imports).
        from pirl.kernels import colour_numba

        colour_numba.photometric_jobs(jobs)
        if with_ops:
            from pirl.kernels import colour_ops_numba

            colour_ops_numba.apply_ops_(with_ops)
        return
    colour_checked_jobs(jobs, shapes)
    flip_job_outputs_(jobs)
    apply_ops_(with_ops)
