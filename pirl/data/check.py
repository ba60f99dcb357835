"""``pirl data check``: find every file in a dataset that training would skip.

Every image is decoded in full (truncation only shows when the last pixels are decoded), so a
clean report means no image will be skipped.  Serial on purpose: small images decode fast enough
without workers (the time for Imagenette-96's train split: docs/performance.md, "Measurements
behind design choices"); on a large dataset the progress bar shows how far it got.
"""

from __future__ import annotations

import logging

from pirl.console import Progress
from pirl.data.datasets import open_source
from pirl.data.source import BadImageError, decode_image

log = logging.getLogger(__name__)

IGNORED = "not an image (ignored)"


def check_source(path: str, min_size: int = 1, progress: bool = False) -> list[tuple[str, str]]:
    """Scan a dataset and return ``(name, reason)`` for every bad file, in dataset order.

    Args:
        path: an ImageFolder folder or uncompressed ``.tar`` (anything :func:`open_source`
            takes; the built-in synthetic data is checked by drawing every image).
        min_size: images whose shorter side is below this many pixels are reported as too small.
        progress: show a progress bar.

    Reasons: ``empty file (0 bytes)``, ``not an image ...``, ``truncated ...``, ``cannot decode
    ...``, ``too small ...``, ``cannot read ...``, and for files without an image extension
    inside class folders ``not an image (ignored)`` (listed because they are silently left out
    of the dataset: an image in an unsupported format would be lost).

    Raises:
        FileNotFoundError / ValueError: as :func:`open_source` (missing path, no images at all).
    """
    source = open_source(path)
    bad: list[tuple[str, str]] = []
    read = getattr(source, "read_bytes", None)
    for i in Progress(range(len(source)), desc=f"checking {path}", unit="image",
                      disable=not progress, leave=True):
        name = source.describe(i)
        try:
            if read is None:
                img = source.load(i)
                if min(img.size) < min_size:
                    raise BadImageError(name, f"too small ({img.size[0]}x{img.size[1]} px)")
            else:
                decode_image(read(i), name, min_size=min_size)
        except BadImageError as e:
            bad.append((e.path, e.reason))
    bad.extend((name, IGNORED) for name in getattr(source, "ignored", []))
    return bad
