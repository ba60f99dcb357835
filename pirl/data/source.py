"""What an image source is: :class:`ImageSource` (random access to labelled images), how an
image is decoded (:func:`decode_image`), and the errors of reading data.

Colour conversion (:func:`to_rgb`): grayscale, palette, CMYK, YCbCr, LAB, HSV and 16-bit
images are converted to RGB; images with transparency (RGBA, LA, palette or RGB with a
transparency key) are *composited on white*, so transparent pixels become white rather than
whatever colour happens to be stored under alpha 0.

The sources themselves are :class:`pirl.data.datasets.FolderSource`,
:class:`pirl.data.datasets.TarSource` and :class:`pirl.data.synthetic.SyntheticSource`;
:func:`pirl.data.datasets.open_source` opens one by name.
"""

from __future__ import annotations

import io
import os
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
from PIL import Image


class BadImageError(Exception):
    """An image that cannot be decoded (unreadable, truncated, not an image, empty ...).

    Attributes:
        path: the file, or ``archive.tar:member`` for an archive member.
        reason: what went wrong, in words.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle through their ``args``; ours has two constructor arguments, so say so
        # explicitly or a DataLoader worker re-raising it in the main process would fail.
        return (type(self), (self.path, self.reason))


class DatasetError(ValueError):
    """A dataset that cannot be used at all: no images, not a (readable, uncompressed) archive,
    an unknown split.  One line naming the path; the CLI exits with code 2 before heavy work."""


class UnreadableDataError(RuntimeError):
    """Training met an unreadable image it may not skip (``--strict-data``), or too many in a
    row to substitute.  The message names the file; the CLI exits with code 1."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> mode ``RGB``.  Transparency is composited on white (see module doc)."""
    if img.mode == "RGB":
        if "transparency" not in img.info:
            return img
        img = img.convert("RGBA")
    if img.mode == "P" or (img.mode == "L" and "transparency" in img.info):
        img = img.convert("RGBA")  # palette may hold alpha (tRNS chunk); expand it to find out
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit / float grayscale: ``convert("L")`` would clip at 255, turning most 16-bit
        # images white, so rescale the value range to 8 bits first.
        a = np.asarray(img, dtype=np.float64)
        hi = float(a.max()) if a.size else 0.0
        scale = 255.0 / 65535.0 if hi > 255.0 else 1.0
        img = Image.fromarray(np.clip(a * scale, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes | BinaryIO, name: str, min_size: int = 1) -> Image.Image:
    """Decode an encoded image fully and return it as RGB.

    ``img.load()`` runs inside the ``try`` because PIL decodes lazily: ``Image.open`` only reads
    the header, and a truncated file is only noticed when the pixels are decoded.

    Raises:
        BadImageError: empty, not an image, truncated/corrupt, or smaller than ``min_size`` px
            on a side.
    """
    if isinstance(data, bytes):
        if not data:
            raise BadImageError(name, "empty file (0 bytes)")
        data = io.BytesIO(data)
    try:
        # No ``with``: closing the image would free its pixels, and ``to_rgb`` may return the
        # same object.  The data is in memory (bytes), so no file handle is left open.
        img = Image.open(data)
        img.load()
        rgb = to_rgb(img)
    except BadImageError:
        raise
    except Image.UnidentifiedImageError:
        raise BadImageError(name, "not an image (PIL cannot identify the format)") from None
    except Exception as e:  # noqa: BLE001 - PIL's decoders raise OSError, SyntaxError, ValueError,
        # EOFError, zlib/struct errors ... on corrupt data; every one of them means "bad image"
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower():
            raise BadImageError(name, f"truncated ({msg})") from e
        raise BadImageError(name, f"cannot decode ({type(e).__name__}: {msg})") from e
    if min(rgb.size) < min_size:
        raise BadImageError(name, f"too small ({rgb.size[0]}x{rgb.size[1]} px, minimum side "
                                  f"{min_size})")
    return rgb


class ImageSource:
    """Random-access images with labels.  Picklable, so DataLoader workers can receive it.

    Attributes:
        classes: class names; label ``y`` means ``classes[y]``.  Empty for unlabelled data.
        targets: label of each index (``-1`` when unknown); ``len(targets) == len(self)``.
    """

    classes: list[str]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.targets)

    def describe(self, i: int) -> str:
        """Human-readable name of item ``i`` (file path, ``archive.tar:member``...)."""
        raise NotImplementedError

    def load(self, i: int) -> Image.Image:
        """Item ``i`` as an RGB PIL image.  Raises :class:`BadImageError` if it cannot be read."""
        raise NotImplementedError

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {type(self).__name__} of {n} images")
        return i % n

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {len(self.classes)} classes)"


class ArchiveReader:
    """Byte ranges of one archive file, read through a handle opened once per process.

    The handle is dropped when pickling and reopened after a fork, so every DataLoader worker
    reads through its own: a handle shared across processes shares its file position.  Used by
    the ImageFolder tar (:class:`pirl.data.datasets.TarSource`) and the VOC tar reader.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fh: BinaryIO | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fh"], state["_pid"] = None, -1
        return state

    def __del__(self) -> None:
        fh = self.__dict__.get("_fh")
        if fh is not None:
            fh.close()

    def read(self, offset: int, size: int, name: str) -> bytes:
        """``size`` bytes at ``offset``; :class:`BadImageError` naming ``name`` if the file ends
        first (a truncated archive)."""
        if self._fh is None or self._pid != os.getpid():
            self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open for the process's life
            self._pid = os.getpid()
        self._fh.seek(offset)
        data = self._fh.read(size)
        if len(data) != size:
            raise BadImageError(name, f"archive ends early: got {len(data)} of {size} bytes")
        return data


def safe_parts(name: str) -> tuple[str, ...] | None:
    """Member name -> path parts, or None when absolute or containing ``..``."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return None
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if ".." in parts:
        return None
    return parts
