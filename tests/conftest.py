"""Shared test fixtures: tiny slices of real ImageNette images.

Stable fixtures (other test files rely on them; change only additively):

``imagenette_val_tar`` (session) -> Path
    /work/shared/data/imagenette-96/val.tar (3,925 96x96 JPEGs, 10 classes, ImageFolder layout
    ``val/<wnid>/*.jpg``).  Tests using it are skipped when the file is absent.
``tiny_imagefolder`` (session) -> Path
    A folder ``<tmp>/tiny/<wnid>/<name>.jpg`` of 200 real images: the first 20 members (sorted by
    name) of each of the 10 classes of val.tar, copied byte for byte (not re-encoded).  Read-only
    by convention: copy it (``shutil.copytree``) before planting files in it.
``tiny_imagetar`` (session) -> Path
    The same 200 images as an uncompressed tar ``<tmp>/tiny.tar`` with a top-level ``train/``
    folder (``train/<wnid>/<name>.jpg``), like the real archives.
"""

from __future__ import annotations

import tarfile
from collections import defaultdict
from pathlib import Path

import pytest


def _imagenette_dir() -> Path:
    """The shared Imagenette-96 folder: ``../shared`` beside the checkout (the layout of the
    project's machines and CI), else /work/shared (a checkout cloned elsewhere, e.g. /tmp)."""
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette-96",
                  Path("/work/shared/data/imagenette-96")]
    return next((d for d in candidates if (d / "val.tar").is_file()), candidates[0])


IMAGENETTE_DIR = _imagenette_dir()
PER_CLASS = 20


@pytest.fixture(scope="session")
def imagenette_val_tar() -> Path:
    path = IMAGENETTE_DIR / "val.tar"
    if not path.is_file():
        pytest.skip(f"real test images not available: {path} is missing")
    return path


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory: pytest.TempPathFactory, imagenette_val_tar: Path) -> Path:
    root = tmp_path_factory.mktemp("imagenette") / "tiny"
    with tarfile.open(imagenette_val_tar, "r:") as tf:
        by_class: dict[str, list[tarfile.TarInfo]] = defaultdict(list)
        for m in tf.getmembers():
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 3 and parts[2].lower().endswith(".jpg"):
                by_class[parts[1]].append(m)
        for wnid, members in sorted(by_class.items()):
            (root / wnid).mkdir(parents=True)
            for m in sorted(members, key=lambda m: m.name)[:PER_CLASS]:
                fh = tf.extractfile(m)
                assert fh is not None
                (root / wnid / Path(m.name).name).write_bytes(fh.read())
    return root


@pytest.fixture(scope="session")
def tiny_imagetar(tmp_path_factory: pytest.TempPathFactory, tiny_imagefolder: Path) -> Path:
    path = tmp_path_factory.mktemp("imagenette-tar") / "tiny.tar"
    with tarfile.open(path, "w") as tf:
        tf.add(tiny_imagefolder, arcname="train")
    return path
