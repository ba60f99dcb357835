"""Image sources: random access to labelled (or unlabelled) images, and the view dataset.

An image source (:class:`~pirl.data.source.ImageSource`) maps an index ``i`` in ``[0, len)`` to
an RGB PIL image and a label ``targets[i]`` (``-1`` when the data has no labels).  The index is
the sample's identity everywhere downstream (memory-bank row, feature row), so the order is fixed
and documented: samples are sorted by class, then by path inside the class.

Sources:

* :class:`FolderSource`: an ImageFolder directory ``ROOT/<class>/**/<image>``.  When ROOT holds a
  single sub-folder that itself holds folders (``DIR/train/<class>/``) it is descended into.
  A folder of loose images with no class folders is an unlabelled source (``classes == []``,
  every target ``-1``).
* :class:`TarSource`: the same layout inside an *uncompressed* ``.tar`` archive, read in place:
  the member index (name, data offset, size) is built once, and each image is one ``seek`` +
  ``read`` on a per-process file handle, so nothing is extracted to disk.
* :class:`pirl.data.synthetic.SyntheticSource`: the built-in procedural dataset.

Hidden entries (names starting with ``.``, e.g. macOS ``._x.jpg`` AppleDouble files, which carry
an image extension but are not images) and ``__MACOSX`` folders are ignored.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, default_collate

from pirl.data.shards import ShardSource, is_shard_spec
from pirl.data.source import (
    ArchiveReader,
    BadImageError,
    DatasetError,
    ImageSource,
    UnreadableDataError,
    decode_image,
    safe_parts,
)
from pirl.data.synthetic import SPLITS, SyntheticSource

log = logging.getLogger(__name__)

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
                                   ".tiff")


def is_image_name(name: str) -> bool:
    """True for a file name with an image extension (case-insensitive) that is not hidden."""
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMG_EXTENSIONS)



# ----------------------------------------------------------------------------- indexing


def _visible(part: str) -> bool:
    return not part.startswith(".") and part != "__MACOSX"


class Layout(NamedTuple):
    """An ImageFolder tree read by :func:`index_layout` (paths as tuples of parts)."""

    root: tuple[str, ...]            # wrapper folders descended into, e.g. ("train",)
    classes: list[str]
    samples: list[tuple[str, ...]]   # full relative path of each sample, sorted by class, path
    targets: list[int]
    ignored: list[tuple[str, ...]]   # non-image files under root (not hidden), never loaded


def index_layout(files: Iterable[tuple[str, ...]], dirs: Iterable[tuple[str, ...]],
                 where: str) -> Layout:
    """The ImageFolder reading of a file tree, shared by folders and archives.

    Args:
        files: relative paths (as tuples of parts) of every regular file.
        dirs: relative paths of directories (parents of files are added automatically).
        where: the folder / archive, for messages.

    Returns:
        the :class:`Layout`; ``samples[k]`` is the full relative path of sample ``k``.

    Raises:
        DatasetError: no images at all.
    """
    files = [f for f in files if f and all(_visible(p) for p in f)]
    all_dirs = {d for d in dirs if all(_visible(p) for p in d)}
    for f in files:
        all_dirs.update(f[:k] for k in range(1, len(f)))

    def children(prefix: tuple[str, ...]) -> list[str]:
        n = len(prefix)
        return sorted({d[n] for d in all_dirs if len(d) > n and d[:n] == prefix})

    images = [f for f in files if is_image_name(f[-1])]
    root: tuple[str, ...] = ()
    # Descend through a lone wrapper folder (DIR/train/<class>/...): it has exactly one
    # sub-folder, no images of its own, and that sub-folder in turn holds folders.
    while True:
        subs = children(root)
        loose = [f for f in images if len(f) == len(root) + 1 and f[:len(root)] == root]
        if len(subs) == 1 and not loose and children(root + (subs[0],)):
            root = root + (subs[0],)
        else:
            break
    n = len(root)
    under = [f for f in images if f[:n] == root]
    loose = [f for f in under if len(f) == n + 1]
    by_class: dict[str, list[tuple[str, ...]]] = {c: [] for c in children(root)}
    for f in under:
        if len(f) > n + 1:
            by_class[f[n]].append(f)
    classes: list[str] = []
    samples: list[tuple[str, ...]] = []
    targets: list[int] = []
    for c, members in by_class.items():
        if not members:
            log.warning("class folder %s has no images (extensions %s); skipped",
                        "/".join((where, *root, c)), ", ".join(IMG_EXTENSIONS))
            continue
        for f in sorted(members):
            samples.append(f)
            targets.append(len(classes))
        classes.append(c)
    if classes and set(classes) <= {"train", "val", "valid", "validation", "test"}:
        log.warning("the classes of %s are %s: these look like split folders, not classes; "
                    "pass the split folder itself (e.g. %s)", where, classes,
                    "/".join((where, *root, classes[0])))
    if classes and loose:
        log.warning("%d image(s) directly in %s are ignored: images must be inside class "
                    "folders", len(loose), "/".join((where, *root)))
    elif not classes:
        # No class folders: an unlabelled collection (fine for pretraining).
        samples = sorted(loose)
        targets = [-1] * len(samples)
    if not samples:
        raise DatasetError(f"no images found in {where} (expected an ImageFolder layout "
                         f"<class>/<image> with extensions {', '.join(IMG_EXTENSIONS)})")
    # Stray non-image files inside class folders (or anywhere, for an unlabelled folder): never
    # loaded, but `pirl data check` lists them, e.g. images in a format we don't read (.heic).
    ignored = sorted(f for f in files if f[:n] == root and not is_image_name(f[-1])
                     and (len(f) > n + 1 or not classes))
    return Layout(root, classes, samples, targets, ignored)


class FolderSource(ImageSource):
    """An ImageFolder directory (see module doc for the layout rules)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"dataset path does not exist: {self.path}")
        if not self.path.is_dir():
            raise NotADirectoryError(f"not a folder: {self.path}")
        files: list[tuple[str, ...]] = []
        dirs: list[tuple[str, ...]] = []
        for top, dnames, fnames in os.walk(self.path, followlinks=True):
            rel = Path(top).relative_to(self.path).parts
            dnames[:] = [d for d in dnames if _visible(d)]  # don't walk into hidden folders
            dirs.extend(rel + (d,) for d in dnames)
            files.extend(rel + (f,) for f in fnames)
        lay = index_layout(files, dirs, str(self.path))
        self.classes, self.targets = lay.classes, lay.targets
        self.root = self.path.joinpath(*lay.root)
        self.files = [str(self.path.joinpath(*f)) for f in lay.samples]
        self.ignored = [str(self.path.joinpath(*f)) for f in lay.ignored]

    def describe(self, i: int) -> str:
        return self.files[self._check_index(i)]

    def read_bytes(self, i: int) -> bytes:
        """The raw (encoded) bytes of image ``i``.  Raises :class:`BadImageError`."""
        name = self.describe(i)
        try:
            with open(name, "rb") as fh:
                return fh.read()
        except OSError as e:
            raise BadImageError(name, f"cannot read ({e.strerror or e})") from e

    def load(self, i: int) -> Image.Image:
        return decode_image(self.read_bytes(i), self.describe(i))


class TarSource(ImageSource):
    """An ImageFolder layout inside an uncompressed tar archive, read in place.

    The archive is scanned once (member names, data offsets, sizes); each :meth:`load` is a
    ``seek`` + ``read`` through an :class:`~pirl.data.source.ArchiveReader`, whose handle each
    process (each DataLoader worker) opens for itself, so no two processes share a file
    position.  Members with absolute paths or ``..`` components are
    ignored (they cannot belong to a well-formed dataset and would escape the archive's tree).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"dataset path does not exist: {self.path}")
        files: list[tuple[str, ...]] = []
        dirs: list[tuple[str, ...]] = []
        where: dict[tuple[str, ...], tuple[int, int]] = {}
        try:
            # "r:" = no compression: random access into a compressed stream would mean
            # decompressing from the start for every image.
            with tarfile.open(self.path, "r:") as tf:
                for m in tf:
                    parts = safe_parts(m.name)
                    if parts is None:
                        log.warning("ignoring unsafe member %r in %s", m.name, self.path)
                        continue
                    if m.isdir():
                        dirs.append(parts)
                    elif m.isfile() and not m.issparse():
                        files.append(parts)
                        where[parts] = (m.offset_data, m.size)
        except tarfile.ReadError as e:
            raise DatasetError(f"{self.path}: not an uncompressed tar archive ({e}); if it is "
                             "compressed (.tar.gz ...), decompress it first") from e
        lay = index_layout(files, dirs, str(self.path))
        self.classes, self.targets = lay.classes, lay.targets
        self.root = "/".join(lay.root)
        self.members = ["/".join(f) for f in lay.samples]
        self.ignored = [f"{self.path}:{'/'.join(f)}" for f in lay.ignored]
        # numpy arrays, not lists of ints: one object each instead of millions for ImageNet
        self.offsets = np.array([where[f][0] for f in lay.samples], dtype=np.int64)
        self.sizes = np.array([where[f][1] for f in lay.samples], dtype=np.int64)
        self._reader = ArchiveReader(self.path)

    def describe(self, i: int) -> str:
        return f"{self.path}:{self.members[self._check_index(i)]}"

    def read_bytes(self, i: int) -> bytes:
        """The raw (encoded) bytes of member ``i``.  Raises :class:`BadImageError`."""
        i = self._check_index(i)
        return self._reader.read(int(self.offsets[i]), int(self.sizes[i]), self.describe(i))

    def load(self, i: int) -> Image.Image:
        return decode_image(self.read_bytes(i), self.describe(i))


# ----------------------------------------------------------------------------- entry point


SYNTHETIC = "synthetic"


def open_source(path: str | os.PathLike[str]) -> ImageSource:
    """Open a dataset: an ImageFolder folder, an uncompressed ImageFolder ``.tar``, a list /
    JSON file (``[ROOT::]list.txt`` or ``[ROOT::]split.json``, see :mod:`pirl.data.lists`), a
    shard set ``DIR/PREFIX-{000000..000099}.tar`` (:mod:`pirl.data.shards`), or
    the built-in ``synthetic`` (training split) / ``synthetic:val`` (held-out labelled split).

    The built-in names win over a folder of the same name in the working directory; write
    ``./synthetic`` for the folder.

    Raises:
        FileNotFoundError: the path does not exist.
        DatasetError (a ValueError): no images found (the message names the path), unknown
            synthetic split, a file that is not a tar archive, or bad lines / entries of a list
            or JSON file (each named ``file:line``).
    """
    s = os.fspath(path)
    if s == SYNTHETIC or s.startswith(SYNTHETIC + ":"):
        split = s.partition(":")[2] or "train"
        if split not in SPLITS:
            raise DatasetError(f"unknown synthetic split {split!r} in {s!r}: use one of "
                             f"{', '.join(SYNTHETIC + ':' + x for x in SPLITS)}")
        return SyntheticSource(split)
    from pirl.data.lists import is_listed_spec, open_listed

    if is_listed_spec(s):  # LIST.txt / SPLIT.json, optionally ROOT::FILE (pirl.data.lists)
        return open_listed(s)
    if is_shard_spec(s):  # DIR/train-{000000..000099}.tar (pirl.data.shards)
        return ShardSource(s)
    p = Path(s)
    if not p.exists():
        raise FileNotFoundError(f"dataset path does not exist: {s}")
    if p.is_dir():
        return FolderSource(p)
    if p.is_file() and tarfile.is_tarfile(p):
        return TarSource(p)
    raise DatasetError(f"{s}: neither a folder nor a tar archive (expected an ImageFolder folder, "
                     f"an uncompressed .tar of one, or {SYNTHETIC!r})")


# ----------------------------------------------------------------------------- views


class ViewDataset(Dataset):
    """Applies a view transform to every image of a source, keeping index and label.

    ``ds[i]`` -> ``{**transform(img), "index": i, "label": targets[i]}`` (tensor shapes are the
    transform's, e.g. ``image`` uint8 [3,S,S]).  An unreadable image gives ``None`` (a warning
    names the file; :func:`collate_views` drops and counts it), or with ``strict=True`` an
    :class:`UnreadableDataError` (a RuntimeError).
    """

    def __init__(self, source: ImageSource, transform: Callable[[Image.Image], dict[str, Any]],
                 strict: bool = False) -> None:
        self.source, self.transform, self.strict = source, transform, strict

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        i = int(i)
        try:
            img = self.source.load(i)
        except BadImageError as e:
            if self.strict:
                raise UnreadableDataError(
                    f"unreadable image {e.path}: {e.reason} (fatal because of --strict-data / "
                    "train.strict_data; without it bad images are skipped and counted)") from e
            log.warning("skipping unreadable image %s: %s", e.path, e.reason)
            return None
        return {**self.transform(img), "index": i, "label": int(self.source.targets[i])}


def collate_views(batch: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Collate :class:`ViewDataset` items, dropping unreadable ones (``None``).

    Returns ``default_collate`` of the readable items plus ``"skipped"`` (python int): the
    number of ``None`` items dropped, plus any per-item ``"skipped"`` counts the items carried
    (e.g. from a wrapper that substituted another image).  When *every* item was unreadable the
    batch is ``{"skipped": n}`` only: callers must check for the data keys (``"index"``).
    """
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if any("skipped" in b for b in good):
        good = [dict(b) for b in good]  # don't mutate the caller's items
        skipped += sum(int(b.pop("skipped", 0)) for b in good)
    if not good:
        return {"skipped": skipped}
    out = default_collate(good)
    out["skipped"] = skipped
    return out
