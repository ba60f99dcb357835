"""The first K images of every class of an ImageFolder tar, as a small tar of its own.

Used by the quality benchmark and ``pirl sweep`` to train and evaluate at a CPU scale: the choice
of images is the archive's sorted order, so it is reproducible and the same for every run that
asks for the same K.  The subset is an uncompressed ImageFolder tar read in place like the
original.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from pirl.data.datasets import TarSource, open_source
from pirl.data.source import ImageSource


def write_subset(src: ImageSource, per_class: int, dest: Path) -> Path:
    """An ImageFolder tar holding the first ``per_class`` images of every class of ``src``.

    The split name inside (``<split>/<class>/<name>``) is kept so the layout stays ImageFolder;
    images are copied byte for byte (no re-encoding).  Written atomically; an existing file with
    the same name is reused (its name encodes the source and K).
    """
    if per_class < 1:
        raise ValueError(f"--subset {per_class}: need at least 1 image per class")
    if not isinstance(src, TarSource):
        raise ValueError(f"{src!r}: --subset reads an ImageFolder .tar")
    if dest.exists():
        return dest
    seen: dict[int, int] = {}
    keep: list[int] = []
    for i, y in enumerate(src.targets):
        if seen.get(y, 0) < per_class:
            seen[y] = seen.get(y, 0) + 1
            keep.append(i)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tf:
        for i in keep:
            name = src.members[i]
            payload = src.read_bytes(i)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    os.replace(tmp, dest)
    return dest


def prepare_data(train: Path, val: Path, subset: int | None, val_subset: int | None,
                 data_dir: Path) -> tuple[str, str]:
    """Paths of the (sub-sampled) train and val archives; K = None or 0 keeps a whole split.
    A subset is written to ``data_dir`` as ``<folder>-<stem>-<K>pc.tar``."""
    out = []
    for path, k in ((train, subset), (val, val_subset)):
        if k:
            name = f"{path.parent.name}-{path.stem}-{k}pc.tar"
            out.append(str(write_subset(open_source(path), k, data_dir / name)))
        else:
            out.append(str(path))
    return out[0], out[1]
