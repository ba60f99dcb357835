"""File access for :mod:`pirl.data.voc`: a folder or an uncompressed tar, read in place, and the
search for the VOC root (the folder holding Annotations/ and JPEGImages/) inside it."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from pirl.data.source import ArchiveReader, BadImageError, DatasetError, safe_parts

ROOT_MARKERS = ("Annotations", "JPEGImages")


class Files:
    """Read-only access to the files of one folder or archive, by '/'-joined relative path."""

    where: str

    def has(self, rel: str) -> bool:
        raise NotImplementedError

    def read(self, rel: str) -> bytes:
        raise NotImplementedError

    def dirs(self) -> set[str]:
        """Every folder that holds a file (relative paths; '' is the top)."""
        raise NotImplementedError

    def describe(self, rel: str) -> str:
        raise NotImplementedError


class FolderFiles(Files):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        self._listed: dict[str, set[str]] = {}

    def _names(self, folder: str) -> set[str]:
        # One listing per folder: a VOC2012 JPEGImages has 17K files, stat-ing each is slower.
        if folder not in self._listed:
            try:
                self._listed[folder] = set(os.listdir(self.path / folder))
            except OSError:
                self._listed[folder] = set()
        return self._listed[folder]

    def has(self, rel: str) -> bool:
        folder, _, name = rel.rpartition("/")
        return name in self._names(folder)

    def read(self, rel: str) -> bytes:
        try:
            return (self.path / rel).read_bytes()
        except OSError as e:
            raise BadImageError(self.describe(rel), f"cannot read ({e.strerror or e})") from e

    def dirs(self) -> set[str]:
        found: set[str] = set()
        # VOC roots sit at most a few levels down (VOCdevkit/VOC2007); don't walk 17K images.
        for top, dnames, _ in os.walk(self.path, followlinks=True):
            rel = Path(top).relative_to(self.path).as_posix()
            rel = "" if rel == "." else rel
            found.add(rel)
            if rel.count("/") >= 3 or Path(top).name in ROOT_MARKERS:
                dnames[:] = []
            else:
                dnames[:] = [d for d in dnames if not d.startswith(".")]
        return found

    def describe(self, rel: str) -> str:
        return str(self.path / rel)


class TarFiles(Files):
    """Member index (offset, size) built once; reads are seek + read on a per-process handle."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        self.index: dict[str, tuple[int, int]] = {}
        try:
            # "r:" = no compression: a compressed stream has no random access.
            with tarfile.open(path, "r:") as tf:
                for m in tf:
                    parts = safe_parts(m.name)
                    if parts and m.isfile() and not m.issparse():
                        self.index["/".join(parts)] = (m.offset_data, m.size)
        except tarfile.ReadError as e:
            raise DatasetError(f"{path}: not an uncompressed tar archive ({e}); if it is "
                               "compressed (.tar.gz ...), decompress it first") from e
        self._reader = ArchiveReader(path)

    def has(self, rel: str) -> bool:
        return rel in self.index

    def read(self, rel: str) -> bytes:
        if rel not in self.index:
            raise BadImageError(self.describe(rel), "no such member")
        offset, size = self.index[rel]
        return self._reader.read(offset, size, self.describe(rel))

    def dirs(self) -> set[str]:
        return {rel.rpartition("/")[0] for rel in self.index}

    def describe(self, rel: str) -> str:
        return f"{self.path}:{rel}"


def open_files(path: str) -> Files:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dataset path does not exist: {path}")
    if p.is_dir():
        return FolderFiles(p)
    if p.is_file() and tarfile.is_tarfile(p):
        return TarFiles(p)
    raise DatasetError(f"{path}: neither a folder nor a tar archive (expected a Pascal VOC "
                       "folder or an uncompressed .tar of one)")


def find_voc_root(files: Files) -> str:
    """The one folder inside ``files`` that holds both Annotations/ and JPEGImages/ ('' = top).

    Raises DatasetError when there is none or several (say which one to use).
    """
    dirs = files.dirs()
    roots = sorted({d.rpartition("/")[0] for d in dirs
                    if d.rpartition("/")[2] == "Annotations"}
                   & {d.rpartition("/")[0] for d in dirs if d.rpartition("/")[2] == "JPEGImages"})
    roots = [r for r in roots if not any(part.startswith(".") for part in r.split("/"))]
    if not roots:
        raise DatasetError(f"{files.where}: no Pascal VOC folder inside (expected "
                           "Annotations/*.xml and JPEGImages/ side by side)")
    if len(roots) > 1:
        raise DatasetError(f"{files.where} holds several VOC folders ({', '.join(roots)}): pass "
                           "each one (a folder) as its own --data, e.g. VOCdevkit/VOC2007")
    return roots[0]
