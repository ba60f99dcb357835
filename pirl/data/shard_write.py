"""``pirl data shard SRC OUT --shard-size N``: an image source written as a shard set and its
manifest (the layout: :mod:`pirl.data.shards`)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from pirl.data.datasets import open_source
from pirl.data.sampler import _mix
from pirl.data.shards import FORMAT, KEY_DIGITS, require_webdataset
from pirl.data.source import BadImageError, DatasetError, ImageSource


def write_shards(src: str, out: str | os.PathLike[str], shard_size: int, prefix: str = "train",
                 seed: int = 0) -> Path:
    """Write the images of ``src`` (anything :func:`pirl.data.open_source` opens) as shards of
    ``shard_size`` samples in ``out``, and the manifest; returns the manifest's path.

    Samples are shuffled once (seeded) before writing, so every shard mixes the classes; the
    encoded bytes are copied as they are (a bad image stays bad and is skipped at training
    time).  Each shard is written to a temporary name and renamed; the manifest comes last.
    """
    wds = require_webdataset()
    if shard_size < 1:
        raise DatasetError(f"--shard-size {shard_size}: must be at least 1")
    source = open_source(src)
    n = len(source)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, 3))).tolist()
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    names: list[str] = []
    for start in range(0, n, shard_size):
        name = f"{prefix}-{len(shards):06d}.tar"
        tmp = outdir / (name + ".tmp")
        with wds.TarWriter(str(tmp), encoder=False, mtime=0) as tw:
            for g in range(start, min(start + shard_size, n)):
                i = order[g]
                sample = {"__key__": f"{g:0{KEY_DIGITS}d}", _extension(source.describe(i)):
                          _encoded(source, i)}
                if source.targets[i] >= 0:
                    sample["cls"] = str(source.targets[i]).encode()
                tw.write(sample)
                names.append(source.describe(i))
        os.replace(tmp, outdir / name)
        shards.append({"name": name, "start": start, "count": min(shard_size, n - start)})
    manifest = {"format": FORMAT, "version": 1, "total": n, "classes": source.classes,
                "seed": seed, "source": str(src), "shards": shards,
                "labels": [source.targets[i] for i in order], "names": names}
    path = outdir / f"{prefix}-manifest.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, path)
    return path


def _extension(name: str) -> str:
    """The lower-case image extension of a sample's name (``jpg`` when it has none)."""
    base = name.rsplit("/", 1)[-1]
    ext = base.rsplit(".", 1)[-1].lower() if "." in base else ""
    return ext if ext and ext.isalnum() and ext != "cls" else "jpg"


def _encoded(source: ImageSource, i: int) -> bytes:
    """The encoded bytes of image ``i``: the file as stored when the source can read it, an
    empty member (skipped at training time) when not, a PNG for sources without raw bytes."""
    read_bytes = getattr(source, "read_bytes", None)
    try:
        if read_bytes is not None:
            return bytes(read_bytes(i))
        buf = io.BytesIO()
        source.load(i).save(buf, format="PNG")
        return buf.getvalue()
    except BadImageError:
        return b""
