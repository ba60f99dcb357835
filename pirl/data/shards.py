"""Sharded data in the WebDataset layout: the manifest, the source, and ``pirl data shard``.

A shard set is a folder of uncompressed tars ``PREFIX-000000.tar, PREFIX-000001.tar, ...`` and a
manifest ``PREFIX-manifest.json`` next to them.  Every sample is two tar members sharing a key,
``KEY.<image extension>`` (the original encoded bytes) and ``KEY.cls`` (the label as text; absent
for unlabelled data), where KEY is the sample's *global index* written with 9 digits.  The global
index is the sample's position in the manifest order: its memory-bank row and feature row, the
same on every rank and after a resume.

The manifest (JSON) makes |D| known before any shard is read::

    {"format": "pirl-shards", "version": 1, "total": N, "classes": [...],
     "shards": [{"name": "train-000000.tar", "start": 0, "count": n0}, ...],
     "labels": [y_0, ..., y_{N-1}], "names": [original name of each sample, ...]}

``--data 'DIR/train-{000000..000099}.tar'`` (brace expansion, quoted for the shell) names a shard
set; it must list exactly the manifest's shards.  ``pirl data shard`` writes a shard set
(:func:`pirl.data.shard_write.write_shards`).  Training streams the shards
(:mod:`pirl.data.shard_stream`); :class:`ShardSource` also gives random access (one ``seek`` +
``read`` per image after indexing a shard once) for the kNN monitor and ``pirl data check``.
"""

from __future__ import annotations

import bisect
import json
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image

from pirl.data.source import ArchiveReader, BadImageError, DatasetError, ImageSource, decode_image

FORMAT = "pirl-shards"
KEY_DIGITS = 9
EXTRA = "pip install 'pirl[shards]'"


def require_webdataset() -> Any:
    """The ``webdataset`` module, or a :class:`DatasetError` naming the extra to install."""
    try:
        import webdataset
    except ImportError:
        raise DatasetError(f"sharded data needs the webdataset package: {EXTRA}") from None
    return webdataset


def is_shard_spec(spec: str) -> bool:
    """True for a brace pattern of shard files, e.g. ``DIR/train-{000000..000009}.tar``."""
    return "{" in spec and "}" in spec and spec.endswith(".tar")


def expand_spec(spec: str) -> list[Path]:
    """The shard files a brace pattern names (each must exist)."""
    require_webdataset()
    from braceexpand import braceexpand  # installed with webdataset

    paths = [Path(p) for p in braceexpand(spec)]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"shard {p} (from --data {spec!r}) does not exist")
    return paths


def find_manifest(first: Path) -> Path:
    """The ``*-manifest.json`` next to shard ``first`` that lists it."""
    for m in sorted(first.parent.glob("*manifest.json")):
        try:
            names = {s["name"] for s in json.loads(m.read_text())["shards"]}
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if first.name in names:
            return m
    raise DatasetError(f"no *-manifest.json listing {first.name} in {first.parent}: write the "
                       "shards with `pirl data shard SRC OUT`")


class ShardSource(ImageSource):
    """A shard set as an :class:`ImageSource`: ``classes``, ``targets`` and |D| from the
    manifest; ``load(i)`` reads sample ``i`` from its shard (random access, for evaluation and
    checks; training streams the shards instead)."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        paths = expand_spec(spec)
        if not paths:
            raise DatasetError(f"--data {spec!r} names no shard")
        self.manifest_path = find_manifest(paths[0])
        m = read_manifest(self.manifest_path)
        self.classes, self.targets = list(m["classes"]), [int(y) for y in m["labels"]]
        self.names: list[str] = list(m["names"])
        self.shard_names = [s["name"] for s in m["shards"]]
        self.starts = [int(s["start"]) for s in m["shards"]]
        self.counts = [int(s["count"]) for s in m["shards"]]
        given = {p.name for p in paths}
        missing = [n for n in self.shard_names if n not in given]
        extra = sorted(given - set(self.shard_names))
        if missing or extra:
            raise DatasetError(f"--data {spec!r} must name exactly the shards of "
                               f"{self.manifest_path}: missing {missing[:3]}, not in the "
                               f"manifest {extra[:3]}")
        self.shards = [self.manifest_path.parent / n for n in self.shard_names]
        self._index: dict[int, dict[int, tuple[int, int, str]]] = {}
        self._readers: dict[int, ArchiveReader] = {}

    def shard_of(self, i: int) -> int:
        """The shard holding global index ``i``."""
        return bisect.bisect_right(self.starts, self._check_index(i)) - 1

    def describe(self, i: int) -> str:
        i = self._check_index(i)
        return f"{self.shards[self.shard_of(i)]}:{i:0{KEY_DIGITS}d} ({self.names[i]})"

    def load(self, i: int) -> Image.Image:
        i = self._check_index(i)
        s = self.shard_of(i)
        if s not in self._index:  # index the shard's members once: key -> offset, size, name
            members: dict[int, tuple[int, int, str]] = {}
            with tarfile.open(self.shards[s], "r:") as tf:
                for mem in tf:
                    key, _, ext = mem.name.partition(".")
                    if mem.isfile() and ext != "cls" and key.isdigit():
                        members[int(key)] = (mem.offset_data, mem.size, mem.name)
            self._index[s] = members
            self._readers[s] = ArchiveReader(self.shards[s])
        if i not in self._index[s]:
            raise BadImageError(self.describe(i), "missing from its shard")
        offset, size, name = self._index[s][i]
        where = f"{self.shards[s]}:{name}"
        return decode_image(self._readers[s].read(offset, size, where), where)


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest, checked: consecutive shard ranges that add up to ``total`` labels."""
    try:
        m = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable JSON manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DatasetError(f"{path}: not a {FORMAT} manifest (key 'format')")
    try:
        n, start = int(m["total"]), 0
        for s in m["shards"]:
            if int(s["start"]) != start:
                raise DatasetError(f"{path}: shard {s['name']} starts at {s['start']}, "
                                   f"expected {start}")
            start += int(s["count"])
        if start != n or len(m["labels"]) != n or len(m["names"]) != n:
            raise DatasetError(f"{path}: shard counts add up to {start}, 'labels' has "
                               f"{len(m['labels'])} and 'names' {len(m['names'])}; 'total' is {n}")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    return m
