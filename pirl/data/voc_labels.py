"""Pascal VOC as an image-classification dataset (the VOC07 SVM protocol of Goyal et al. 2019).

The images and annotations are read by :class:`pirl.data.voc.VOCSource` (the reader of
``pirl eval detection``); this module only turns an image's boxes into one label per class, the
benchmark's convention:

* ``+1``: the image holds at least one non-difficult object of the class;
* ``0``: it holds objects of the class, all of them marked ``difficult`` (left out of that
  class's training and of its AP, as VOC's own ``<class>_<split>.txt`` files mark them);
* ``-1``: no object of the class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from pirl.data.source import ImageSource
from pirl.data.voc import VOCSource


def voc_label_matrix(voc: VOCSource) -> np.ndarray:
    """int8 [N, C] of +1 / 0 / -1 per image and class (see the module doc)."""
    out = np.full((len(voc), len(voc.classes)), -1, dtype=np.int8)
    for i, r in enumerate(voc.records):
        for label, difficult in zip(r.labels.tolist(), r.difficult.tolist(), strict=True):
            c = label - 1  # VOCSource labels are 1..C (0 is the detector's background)
            if not difficult:
                out[i, c] = 1
            elif out[i, c] == -1:
                out[i, c] = 0
    return out


class VOCImages(ImageSource):
    """The images of a :class:`VOCSource` split with multi-label targets.  Picklable.

    ``targets`` are all -1 (an image has several labels, not one); ``label_matrix`` int8 [N, C]
    holds them (+1 / 0 / -1, see the module doc).  Protocols that can use several labels per
    image (the SVMs) read ``label_matrix``.
    """

    def __init__(self, voc: VOCSource) -> None:
        self.voc = voc
        self.classes = list(voc.classes)
        self.targets = [-1] * len(voc)
        self.label_matrix = voc_label_matrix(voc)

    def describe(self, i: int) -> str:
        return self.voc.describe(self._check_index(i))

    def load(self, i: int) -> Image.Image:
        return self.voc.load(self._check_index(i))


def open_voc_images(paths: str | Sequence[str], split: str,
                    classes: Sequence[str] | None = None, strict: bool = False) -> VOCImages:
    """One split of one or more VOC folders / tars as a :class:`VOCImages` (errors as
    :class:`VOCSource`'s: DatasetError naming the file)."""
    return VOCImages(VOCSource(paths, split, classes=classes, strict=strict))
