"""Datasets described by a file: a list of ``relative/path label`` lines (Places205, ImageNet
label files) or an iNaturalist / COCO-style JSON split.

The spec a user passes as ``--data`` (or ``--train-data`` / ``--val-data``), read by
:func:`pirl.data.datasets.open_source`:

* ``LIST.txt`` (also ``.csv``, ``.lst``): one image per line, ``relative/path label`` with an
  integer label ``>= 0`` (the last whitespace-separated field, so paths may hold spaces; a comma
  also separates when there is no whitespace).  Blank lines and lines starting with ``#`` are
  skipped.  Class ``k`` is named ``"k"``; the classes are ``0 .. max label``.
* ``SPLIT.json``: iNaturalist's format (COCO-like): ``images`` (``id``, ``file_name``),
  ``annotations`` (``image_id``, ``category_id``), ``categories`` (``id``, ``name``).  Labels are
  the categories sorted by id, renumbered ``0 .. C-1``, so a train and a val file carrying the
  same category list agree; an image without annotation is unlabelled (``-1``).
* ``ROOT::FILE``: the same, with the image paths relative to ROOT (a folder or an uncompressed
  ``.tar``, read in place).  Without ``ROOT::`` they are relative to the file's own folder.

The items keep the file's order.  Every fault (a line without a label, a label that is not a
non-negative integer, a path that escapes the root, a file missing under the root, a JSON entry
without its keys) is collected and reported at once in one :class:`DatasetError` naming
``file:line`` (or ``file: images[i]``), so the CLI exits 2 before any heavy work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

from pirl.data.source import DatasetError, ImageSource, decode_image, safe_parts
from pirl.data.voc_files import Files, open_files

LIST_SUFFIXES: tuple[str, ...] = (".txt", ".csv", ".lst")
JSON_SUFFIXES: tuple[str, ...] = (".json",)
ROOT_SEP = "::"
MAX_REPORTED = 10


def is_listed_spec(spec: str) -> bool:
    """True when ``spec`` names a list or JSON file (optionally ``ROOT::FILE``)."""
    return split_spec(spec)[1].suffix.lower() in LIST_SUFFIXES + JSON_SUFFIXES


def split_spec(spec: str) -> tuple[Path, Path]:
    """``ROOT::FILE`` or ``FILE`` -> (root, file); the root defaults to the file's folder."""
    root, sep, file = spec.partition(ROOT_SEP)
    path = Path(file if sep else root)
    return (Path(root) if sep else path.parent), path


def _report(file: Path, faults: list[str], what: str) -> DatasetError:
    more = f" (and {len(faults) - MAX_REPORTED} more)" if len(faults) > MAX_REPORTED else ""
    # One line (the CLI's errors are one line each), every fault named with file:line.
    return DatasetError(f"{file}: {len(faults)} bad {what}{more}: "
                        + "; ".join(faults[:MAX_REPORTED]))


class ListedSource(ImageSource):
    """Images named by a list or JSON file, read from a folder or an uncompressed tar.

    Attributes:
        spec: what the user passed; file: the list / JSON file; files: the root's file access.
        paths: each item's path relative to the root ('/'-joined).
    """

    def __init__(self, spec: str, files: Files, file: Path, paths: list[str],
                 targets: list[int], classes: list[str]) -> None:
        self.spec, self.files, self.file = spec, files, file
        self.paths, self.targets, self.classes = paths, targets, classes

    def describe(self, i: int) -> str:
        return self.files.describe(self.paths[self._check_index(i)])

    def read_bytes(self, i: int) -> bytes:
        """The raw bytes of item ``i``; :class:`~pirl.data.source.BadImageError` if unreadable."""
        return self.files.read(self.paths[self._check_index(i)])

    def load(self, i: int) -> Image.Image:
        return decode_image(self.read_bytes(i), self.describe(i))


def _root_files(root: Path, file: Path) -> Files:
    if not file.is_file():
        raise FileNotFoundError(f"dataset list does not exist: {file}")
    if not root.exists():
        raise FileNotFoundError(f"image root of {file} does not exist: {root}")
    return open_files(str(root))


def _check_path(files: Files, rel: str) -> tuple[str | None, str | None]:
    """(normalised path, None) or (None, why it is unusable)."""
    parts = safe_parts(rel)
    if not parts:
        return None, f"path {rel!r} is absolute, empty or leaves the root"
    norm = "/".join(parts)
    if not files.has(norm):
        return None, f"image {files.describe(norm)} does not exist"
    return norm, None


def read_list(spec: str) -> ListedSource:
    """A ``relative/path label`` list (see the module doc).  Raises DatasetError listing every
    bad line, FileNotFoundError for a missing list or root."""
    root, file = split_spec(spec)
    files = _root_files(root, file)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{file}: unreadable list ({e})") from None
    paths: list[str] = []
    targets: list[int] = []
    faults: list[str] = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) == 1 and "," in line:
            fields = [f.strip() for f in line.rsplit(",", 1)]
        if len(fields) < 2 or not fields[1]:
            faults.append(f"{file}:{n}: no label after the path ({line!r})")
            continue
        rel, label = fields
        try:
            y = int(label)
        except ValueError:
            faults.append(f"{file}:{n}: label {label!r} is not an integer")
            continue
        if y < 0:
            faults.append(f"{file}:{n}: label {y} is negative")
            continue
        norm, why = _check_path(files, rel)
        if why is not None:
            faults.append(f"{file}:{n}: {why}")
            continue
        assert norm is not None
        paths.append(norm)
        targets.append(y)
    if faults:
        raise _report(file, faults, "line(s)")
    if not paths:
        raise DatasetError(f"{file}: no image listed (expected lines 'relative/path label')")
    return ListedSource(spec, files, file, paths, targets,
                        [str(k) for k in range(max(targets) + 1)])


def _entries(data: Any, key: str, file: Path, required: bool) -> list[Any]:
    value = data.get(key, None if required else [])
    if not isinstance(value, list):
        raise DatasetError(f"{file}: {key!r} must be a list (iNaturalist / COCO-style JSON with "
                           "'images', 'annotations', 'categories')")
    return value


def _category_names(categories: list[Any], file: Path, faults: list[str]) -> dict[Any, str]:
    names: dict[Any, str] = {}
    for k, c in enumerate(categories):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int):
            faults.append(f"{file}: categories[{k}]: no integer 'id'")
        elif c["id"] in names:
            faults.append(f"{file}: categories[{k}]: id {c['id']} repeated")
        else:
            names[c["id"]] = str(c.get("name", c["id"]))
    if len(set(names.values())) < len(names):  # names must tell classes apart
        names = {i: str(i) for i in names}
    return names


def read_inat_json(spec: str) -> ListedSource:
    """An iNaturalist / COCO-style JSON split (see the module doc).  Raises DatasetError naming
    every bad entry, FileNotFoundError for a missing file or root."""
    root, file = split_spec(spec)
    files = _root_files(root, file)
    try:
        # json only: nothing in a data file is ever executed.
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{file}: the top level must be an object with 'images'")
    images = _entries(data, "images", file, required=True)
    annotations = _entries(data, "annotations", file, required=False)
    faults: list[str] = []
    names = _category_names(_entries(data, "categories", file, required=False), file, faults)
    label_of = {cid: k for k, cid in enumerate(sorted(names))}
    by_id: dict[Any, int] = {}
    paths: list[str] = []
    for k, im in enumerate(images):
        if (not isinstance(im, dict) or not isinstance(im.get("id"), (int, str))
                or not isinstance(im.get("file_name"), str)):
            faults.append(f"{file}: images[{k}]: needs an 'id' and a 'file_name' string")
            continue
        if im["id"] in by_id:
            faults.append(f"{file}: images[{k}]: id {im['id']!r} repeated")
            continue
        norm, why = _check_path(files, im["file_name"])
        if why is not None:
            faults.append(f"{file}: images[{k}]: {why}")
            continue
        assert norm is not None
        by_id[im["id"]] = len(paths)
        paths.append(norm)
    targets = [-1] * len(paths)
    listed = {im["id"] for im in images if isinstance(im, dict)
              and isinstance(im.get("id"), (int, str))}
    for k, a in enumerate(annotations):
        where = f"{file}: annotations[{k}]"
        if (not isinstance(a, dict) or not isinstance(a.get("image_id"), (int, str))
                or not isinstance(a.get("category_id"), int)):
            faults.append(f"{where}: needs an 'image_id' and an integer 'category_id'")
        elif a["category_id"] not in label_of:
            faults.append(f"{where}: category_id {a['category_id']!r} is not in 'categories'")
        elif a["image_id"] not in listed:
            faults.append(f"{where}: image_id {a['image_id']!r} is not in 'images'")
        elif a["image_id"] not in by_id:
            continue  # its image entry is at fault, and already reported
        else:
            i, y = by_id[a["image_id"]], label_of[a["category_id"]]
            if targets[i] not in (-1, y):
                faults.append(f"{where}: image {a['image_id']!r} already has another category")
            targets[i] = y
    if faults:
        raise _report(file, faults, "entries")
    if not paths:
        raise DatasetError(f"{file}: 'images' is empty")
    return ListedSource(spec, files, file, paths, targets,
                        [names[cid] for cid in sorted(names)])


def open_listed(spec: str | os.PathLike[str]) -> ListedSource:
    """A list or JSON dataset by its spec (``[ROOT::]FILE``; see the module doc)."""
    s = os.fspath(spec)
    return read_inat_json(s) if split_spec(s)[1].suffix.lower() in JSON_SUFFIXES else read_list(s)
