"""Pascal VOC detection data, read in place from a folder or an uncompressed ``.tar``.

Layout (VOC2007 / VOC2012 and anything written the same way)::

    ROOT/Annotations/<id>.xml           size, and per object: name, difficult, bndbox
    ROOT/JPEGImages/<id>.jpg
    ROOT/ImageSets/Main/<split>.txt     image ids, one per line (train, val, trainval, test)
    ROOT/labels.txt                     optional: the class names, one per line

ROOT is found inside what the user names: the folder or archive itself, or a folder below it
(``VOCdevkit/VOC2007`` inside ``VOCtrainval_06-Nov-2007.tar``).  Several roots are joined in
the order given (VOC07+12: the VOC2007 and VOC2012 folders).  For the joined set a root whose
``ImageSets/Main`` lacks the split is an error, unless ``require_split=False`` (the test split
of VOC07+12 is VOC2007's: VOC2012 publishes none), which skips it.

The class list, in order of preference: ``classes`` passed in (a test split must use the
training split's); ``labels.txt`` (every root that has one must agree); VOC's 20 classes when
every object name is one of them; else the sorted object names.  Label ``k`` (1..C) means
``classes[k-1]``; 0 is torchvision's background.

Boxes: VOC writes 1-based inclusive pixel corners; items carry continuous 0-based corners
``(xmin - 1, ymin - 1, xmax, ymax)`` (Detectron2's reading), so a box's width is VOC's
``xmax - xmin + 1`` and a box covering the whole image is ``(0, 0, W, H)``.  Difficult objects
are kept (flag per box): training uses them, as Detectron2 does; the metrics ignore them, as
VOC does.

Faults found while indexing (a malformed XML, a missing image, an object with an unknown class,
an empty box or one outside its image) are skipped and counted by default (an image for the
first two, a box for the others), each named in :attr:`VOCSource.problems`; with
``strict=True`` the first one raises :class:`~pirl.data.datasets.DatasetError`.  An image that
cannot be decoded is only found when loaded: :class:`~pirl.data.datasets.BadImageError`.
"""

from __future__ import annotations

import io
import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from pirl.data.source import BadImageError, DatasetError, decode_image
from pirl.data.voc_files import Files, FolderFiles, TarFiles, find_voc_root, open_files

log = logging.getLogger(__name__)

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# ----------------------------------------------------------------------------- annotations


@dataclass
class VOCRecord:
    """One image's annotation.  boxes: float32 [K,4] continuous xyxy (pixels); labels: int64 [K]
    in 1..C; difficult: bool [K]."""

    root: int
    image_id: str
    image: str  # relative path of the image inside its root's files
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


@dataclass
class _Object:
    name: str
    difficult: bool
    box: tuple[float, float, float, float]  # VOC's xmin, ymin, xmax, ymax as written


class _Skip(Exception):
    """An annotation fault: the message says what, the caller names the file."""


def _text(node: ET.Element, tag: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise _Skip(f"no <{tag}>")
    return child.text.strip()


def parse_voc_xml(data: bytes) -> tuple[int | None, int | None, list[_Object]]:
    """(width, height, objects) of a VOC annotation; width/height None when <size> is absent or
    zero (some tools write 0).  Raises _Skip for malformed XML or an object without a box."""
    try:
        # Python's expat parser refuses external entities and caps entity expansion, so a
        # hostile annotation cannot read files or blow up memory.
        top = ET.fromstring(data)
    except ET.ParseError as e:
        raise _Skip(f"malformed XML ({e})") from None
    width = height = None
    size = top.find("size")
    if size is not None:
        try:
            width, height = int(float(_text(size, "width"))), int(float(_text(size, "height")))
        except (_Skip, ValueError):
            width = height = None
        if not width or not height:
            width = height = None
    objects = []
    for obj in top.iter("object"):
        name = _text(obj, "name")
        flag = obj.find("difficult")
        difficult = flag is not None and (flag.text or "0").strip() not in ("0", "")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise _Skip(f"object {name!r} has no <bndbox>")
        try:
            xyxy = tuple(float(_text(bnd, k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as e:
            raise _Skip(f"object {name!r}: box coordinate is not a number ({e})") from None
        objects.append(_Object(name, difficult, xyxy))  # type: ignore[arg-type]
    return width, height, objects


def box_problem(box: tuple[float, float, float, float], width: int, height: int) -> str | None:
    """Why a VOC box (1-based inclusive corners) is unusable, or None.  0 is accepted as a first
    coordinate (0-based writers); the far corner may be at most the image side."""
    x1, y1, x2, y2 = box
    if x2 < x1 or y2 < y1:
        return f"empty box {box}"
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        return f"box {box} outside the {width}x{height} image"
    return None


# ----------------------------------------------------------------------------- the source


class VOCSource:
    """Pascal VOC images and boxes of one split from one or more roots.  Picklable.

    ``src[i]`` -> ``(image uint8 [3,H,W], {"boxes": float32 [K,4] xyxy px, "labels": int64 [K]
    (1..C), "difficult": bool [K], "image_id": int64 scalar = i})``.  Raises BadImageError when
    the image cannot be decoded or is not the size its annotation says.

    Attributes:
        classes: class names (label k = classes[k - 1]).
        records: one :class:`VOCRecord` per usable image, roots in the order given, then the
            split file's order.
        problems: "file: reason" for every skipped image or box.
        skipped_images, skipped_boxes: counts of those.
    """

    def __init__(self, paths: str | Sequence[str], split: str = "trainval",
                 classes: Sequence[str] | None = None, strict: bool = False,
                 require_split: bool = True) -> None:
        paths = [paths] if isinstance(paths, str) else list(paths)
        if not paths:
            raise DatasetError("no VOC dataset given")
        self.paths, self.split, self.strict = paths, split, strict
        self.problems: list[str] = []
        self.skipped_images = self.skipped_boxes = 0
        self._files: list[Files] = []
        self._roots: list[str] = []
        parsed: list[tuple[int, str, str, int | None, int | None, list[_Object]]] = []
        labels_files: dict[str, list[str]] = {}
        for path in paths:
            files = open_files(path)
            root = find_voc_root(files)
            prefix = root + "/" if root else ""
            ids = self._split_ids(files, prefix, path, require_split)
            if ids is None:
                continue
            k = len(self._files)
            self._files.append(files)
            self._roots.append(prefix)
            if files.has(prefix + "labels.txt"):
                names = files.read(prefix + "labels.txt").decode("utf-8").split("\n")
                labels_files[files.describe(prefix + "labels.txt")] = [
                    n.strip() for n in names if n.strip()]
            for image_id in ids:
                item = self._read_annotation(files, prefix, image_id)
                if item is not None:
                    parsed.append((k, image_id, *item))
        if not self._files:
            raise DatasetError(f"no dataset in {', '.join(paths)} has the split {split!r} "
                               f"(ImageSets/Main/{split}.txt)")
        self.classes = self._class_list(classes, labels_files, parsed)
        lookup = {c: k + 1 for k, c in enumerate(self.classes)}
        self.records = [self._record(lookup, *p) for p in parsed]
        if not self.records:
            raise DatasetError(f"{', '.join(paths)}: split {split!r} has no usable image")
        if self.problems:
            log.warning("%s split %s: skipped %d image(s) and %d box(es) with faults, e.g. %s",
                        ", ".join(paths), split, self.skipped_images, self.skipped_boxes,
                        "; ".join(self.problems[:3]))

    # -- indexing helpers

    def _split_ids(self, files: Files, prefix: str, path: str,
                   require_split: bool) -> list[str] | None:
        rel = f"{prefix}ImageSets/Main/{self.split}.txt"
        if not files.has(rel):
            if not require_split:
                log.info("%s has no %s split; not used for it", path, self.split)
                return None
            have = sorted(r.rpartition("/")[2][:-4] for r in self._listing(files, prefix)
                          if "_" not in r.rpartition("/")[2])
            raise DatasetError(f"{path}: no split {self.split!r} ({files.describe(rel)} missing; "
                               f"splits there: {', '.join(have) or 'none'})")
        try:
            text = files.read(rel).decode("utf-8")
        except (BadImageError, UnicodeDecodeError) as e:
            raise DatasetError(f"{files.describe(rel)}: unreadable split file ({e})") from None
        # A line may carry a second column (VOC's per-class files: "<id> 1"); the id is first.
        return [line.split()[0] for line in text.splitlines() if line.strip()]

    @staticmethod
    def _listing(files: Files, prefix: str) -> list[str]:
        folder = f"{prefix}ImageSets/Main"
        if isinstance(files, TarFiles):
            return [r for r in files.index if r.rpartition("/")[0] == folder
                    and r.endswith(".txt")]
        assert isinstance(files, FolderFiles)
        return [f"{folder}/{n}" for n in files._names(folder) if n.endswith(".txt")]

    def _fault(self, where: str, reason: str, image: bool) -> None:
        message = f"{where}: {reason}"
        if self.strict:
            raise DatasetError(f"{message} (fatal because of --strict-data; without it the "
                               f"{'image' if image else 'box'} is skipped and counted)")
        self.problems.append(message)
        if image:
            self.skipped_images += 1
        else:
            self.skipped_boxes += 1

    def _read_annotation(self, files: Files, prefix: str, image_id: str
                         ) -> tuple[str, int | None, int | None, list[_Object]] | None:
        xml_rel = f"{prefix}Annotations/{image_id}.xml"
        if not files.has(xml_rel):
            self._fault(files.describe(xml_rel), "annotation missing", image=True)
            return None
        try:
            width, height, objects = parse_voc_xml(files.read(xml_rel))
        except _Skip as e:
            self._fault(files.describe(xml_rel), str(e), image=True)
            return None
        image_rel = f"{prefix}JPEGImages/{image_id}.jpg"
        if not files.has(image_rel):
            self._fault(files.describe(image_rel), "image missing", image=True)
            return None
        if width is None or height is None:
            try:
                with Image.open(io.BytesIO(files.read(image_rel))) as img:
                    width, height = img.size
            except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
                self._fault(files.describe(image_rel), f"unreadable image ({e})", image=True)
                return None
        keep = []
        for obj in objects:
            reason = box_problem(obj.box, width, height)
            if reason is not None:
                self._fault(files.describe(xml_rel), f"object {obj.name!r}: {reason}",
                            image=False)
            else:
                keep.append(obj)
        return image_rel, width, height, keep

    def _class_list(self, given: Sequence[str] | None, labels_files: dict[str, list[str]],
                    parsed: list[tuple[int, str, str, int | None, int | None, list[_Object]]]
                    ) -> list[str]:
        if given is not None:
            return list(given)
        lists = {tuple(v) for v in labels_files.values()}
        if len(lists) > 1:
            raise DatasetError("the labels.txt files disagree: " + "; ".join(
                f"{k}: {','.join(v)}" for k, v in labels_files.items()))
        if lists:
            return list(lists.pop())
        names = {o.name for p in parsed for o in p[5]}
        if names and names <= set(VOC_CLASSES):
            return list(VOC_CLASSES)
        return sorted(names)

    def _record(self, lookup: dict[str, int], k: int, image_id: str, image_rel: str,
                width: int | None, height: int | None, objects: list[_Object]) -> VOCRecord:
        assert width is not None and height is not None
        files = self._files[k]
        boxes, labels, difficult = [], [], []
        for o in objects:
            if o.name not in lookup:
                self._fault(files.describe(f"{self._roots[k]}Annotations/{image_id}.xml"),
                            f"object class {o.name!r} is not one of {','.join(lookup)}",
                            image=False)
                continue
            x1, y1, x2, y2 = o.box
            boxes.append((max(x1 - 1.0, 0.0), max(y1 - 1.0, 0.0), x2, y2))
            labels.append(lookup[o.name])
            difficult.append(o.difficult)
        return VOCRecord(k, image_id, image_rel, width, height,
                         np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                         np.asarray(labels, dtype=np.int64), np.asarray(difficult, dtype=bool))

    # -- access

    def __len__(self) -> int:
        return len(self.records)

    def describe(self, i: int) -> str:
        """Where image ``i`` lives (``folder/JPEGImages/x.jpg`` or ``archive.tar:member``)."""
        r = self.records[i]
        return self._files[r.root].describe(r.image)

    def num_boxes(self) -> int:
        return int(sum(len(r.labels) for r in self.records))

    def target(self, i: int) -> dict[str, Tensor]:
        """Item ``i``'s target without decoding its image (see the class doc for the keys)."""
        r = self.records[i]
        return {"boxes": torch.from_numpy(r.boxes.copy()),
                "labels": torch.from_numpy(r.labels.copy()),
                "difficult": torch.from_numpy(r.difficult.copy()),
                "image_id": torch.tensor(i, dtype=torch.int64)}

    def load(self, i: int) -> Image.Image:
        """Image ``i`` as RGB PIL, checked against its annotation's size."""
        r = self.records[i]
        name = self.describe(i)
        img = decode_image(self._files[r.root].read(r.image), name)
        if img.size != (r.width, r.height):
            raise BadImageError(name, f"image is {img.size[0]}x{img.size[1]} but its annotation "
                                      f"says {r.width}x{r.height}")
        return img

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        img = np.asarray(self.load(i), dtype=np.uint8)
        return torch.from_numpy(img.copy()).permute(2, 0, 1).contiguous(), self.target(i)

    def __repr__(self) -> str:
        return (f"VOCSource({len(self)} images, {self.num_boxes()} boxes, "
                f"{len(self.classes)} classes, split {self.split!r})")


def parse_data_paths(values: Sequence[str]) -> list[str]:
    """``--data A --data B,C`` -> [A, B, C] (empty pieces dropped)."""
    return [p.strip() for v in values for p in v.split(",") if p.strip()]
