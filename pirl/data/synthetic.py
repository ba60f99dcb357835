"""The built-in procedural dataset (``open_source("synthetic")``): shapes on cluttered backgrounds.

Ten classes that differ only in *what is depicted* (the shape's outline); everything else is a
nuisance drawn independently of the class:

* foreground colour: any colour far enough from the background's mean to stay visible;
* background: a solid colour, a linear gradient, smooth blotches, or per-pixel speckle noise;
* pose: position, size (radius 25-42 % of the side), any rotation, and a slight stretch;
* clutter: half of the images get a small distractor (a blob or a thin line) behind the shape;
* sensor noise: mild Gaussian noise on some images.

Because colour and background statistics carry no class information, a representation that
separates the classes must encode shape; a randomly initialised network mostly encodes colour and
layout.  That gap is what ``pirl demo`` measures with kNN.

Image ``i`` is a pure function of ``(seed, split, i, size)`` (its own ``numpy`` generator seeded
from those), so any subset, worker or order gives the same pixels; train and val draw from
different seed streams.  Label ``i`` is ``i % 10`` (balanced to within one image).  Images are
drawn lazily in :meth:`SyntheticSource.load` (~0.3 ms each at 40 px): nothing is cached.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from pirl.data.datasets import ImageSource

SPLITS: tuple[str, ...] = ("train", "val")
DEFAULT_SIZES: dict[str, int] = {"train": 2000, "val": 1000}
CLASSES: list[str] = ["disc", "square", "triangle", "cross", "ring", "star", "bars", "L-shape",
                      "crescent", "diamond"]
_SUPERSAMPLE = 2  # shapes are drawn at 2x and box-filtered down: anti-aliased edges

Poly = np.ndarray  # float [K, 2] vertices in unit coordinates (x right, y down, radius ~1)


def _circle(r: float, cx: float = 0.0, cy: float = 0.0, k: int = 40) -> Poly:
    t = np.linspace(0, 2 * math.pi, k, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> Poly:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _star(points: int, outer: float, inner: float) -> Poly:
    t = np.arange(2 * points) * math.pi / points - math.pi / 2
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


# Each shape: polygons painted in order, fill 1 = shape, 0 = hole.  Outlines are chosen to stay
# distinct under any rotation and stretch (the diamond is an elongated rhombus, not a square).
SHAPES: list[list[tuple[Poly, int]]] = [
    [(_circle(1.0), 1)],                                                        # disc
    [(_rect(-0.8, -0.8, 0.8, 0.8), 1)],                                         # square
    [(_star(3, 1.0, 0.5), 1)],                                                  # triangle
    [(np.array([[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3],
                [0.3, 1], [-0.3, 1], [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]],
               dtype=np.float64), 1)],                                          # cross
    [(_circle(1.0), 1), (_circle(0.55), 0)],                                    # ring
    [(_star(5, 1.0, 0.42), 1)],                                                 # star
    [(_rect(-0.9, -0.75, 0.9, -0.25), 1), (_rect(-0.9, 0.25, 0.9, 0.75), 1)],   # bars
    [(np.array([[-0.75, -1], [-0.2, -1], [-0.2, 0.45], [0.75, 0.45], [0.75, 1], [-0.75, 1]],
               dtype=np.float64), 1)],                                          # L-shape
    [(_circle(1.0), 1), (_circle(0.85, 0.5, -0.1), 0)],                         # crescent
    [(np.array([[0, -1], [0.5, 0], [0, 1], [-0.5, 0]], dtype=np.float64), 1)],  # diamond
]
assert len(SHAPES) == len(CLASSES)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [size, size, 3] in [0, 255]: solid, gradient, blotches or speckle."""
    c1 = _random_colour(rng)
    kind = int(rng.integers(4))
    if kind == 0:  # solid
        bg = np.broadcast_to(c1, (size, size, 3))
    elif kind == 1:  # linear gradient in a random direction
        c2 = _random_colour(rng)
        a = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1) - 0.5
        t = np.clip((xx * math.cos(a) + yy * math.sin(a)) / 0.71 + 0.5, 0, 1)[..., None]
        bg = c1 * (1 - t) + c2 * t
    elif kind == 2:  # smooth blotches: a coarse random colour grid, bilinearly upsampled
        k = int(rng.integers(2, 6))
        grid = np.clip(c1 + rng.normal(0, 45, (k, k, 3)), 0, 255).astype(np.uint8)
        bg = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR))
    else:  # speckle: per-pixel noise around one colour
        bg = c1 + rng.normal(0, rng.uniform(15, 40), (size, size, 3))
    return np.clip(bg, 0, 255).astype(np.float32)


def _contrasting_colour(rng: np.random.Generator, against: np.ndarray) -> np.ndarray:
    """A random colour at least 110 (RGB Euclidean) from ``against``, so the shape stays
    visible; falls back to the colour opposite ``against``."""
    for _ in range(32):
        c = _random_colour(rng)
        if np.linalg.norm(c - against) > 110:
            return c
    return 255.0 - against


def _mask(polys: list[tuple[Poly, int]], size: int, centre: np.ndarray, radius: float,
          angle: float, stretch: float) -> np.ndarray:
    """Rasterise unit-coordinate polygons after stretch, rotation, scale and translation.

    Returns float32 [size, size] coverage in [0, 1] (anti-aliased by supersampling).
    """
    ss = size * _SUPERSAMPLE
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]]) * radius * _SUPERSAMPLE
    canvas = Image.new("L", (ss, ss), 0)
    draw = ImageDraw.Draw(canvas)
    for poly, fill in polys:
        pts = (poly * np.array([stretch, 1.0 / stretch])) @ rot.T + centre * _SUPERSAMPLE
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255 * fill)
    small = canvas.reduce(_SUPERSAMPLE)
    return np.asarray(small, dtype=np.float32) / 255.0


def _distractor(rng: np.random.Generator, size: int) -> np.ndarray:
    """Coverage [size, size] of a small blob or thin line, placed anywhere."""
    ss = size * _SUPERSAMPLE
    canvas = Image.new("L", (ss, ss), 0)
    draw = ImageDraw.Draw(canvas)
    x, y = rng.uniform(0, ss, 2)
    if rng.random() < 0.5:
        rx, ry = rng.uniform(0.05, 0.11, 2) * ss
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=255)
    else:
        a, half = rng.uniform(0, math.pi), rng.uniform(0.15, 0.3) * ss
        dx, dy = half * math.cos(a), half * math.sin(a)
        draw.line([x - dx, y - dy, x + dx, y + dy], fill=255, width=max(1, ss // 40))
    return np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.float32) / 255.0


def render(label: int, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """One image of class ``label`` with every nuisance drawn from ``rng``.  RGB, size x size."""
    img = _background(rng, size)
    if rng.random() < 0.5:
        m = _distractor(rng, size)[..., None]
        img = img * (1 - m) + _random_colour(rng) * m
    radius = rng.uniform(0.25, 0.42) * size
    margin = 0.85 * radius  # the shape may touch the border, but most of it stays inside
    centre = rng.uniform(margin, size - margin, 2)
    m = _mask(SHAPES[label], size, centre, radius, angle=rng.uniform(0, 2 * math.pi),
              stretch=math.exp(rng.uniform(-0.15, 0.15)))[..., None]
    fg = _contrasting_colour(rng, img.reshape(-1, 3).mean(0))
    img = img * (1 - m) + fg * m
    if rng.random() < 0.5:
        img = img + rng.normal(0, rng.uniform(2, 10), img.shape)
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")


class SyntheticSource(ImageSource):
    """The procedural shapes dataset (see module doc).

    Args:
        split: ``"train"`` (default 2,000 images) or ``"val"`` (1,000), drawn from disjoint
            seed streams.
        n: number of images (default per split above).
        size: image side in pixels.
        seed: dataset seed; image ``i`` depends only on ``(seed, split, i, size)``.
    """

    def __init__(self, split: str = "train", n: int | None = None, size: int = 40,
                 seed: int = 0) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown synthetic split {split!r}: use one of {SPLITS}")
        n = DEFAULT_SIZES[split] if n is None else n
        if n < 0 or size < 8 or seed < 0:
            raise ValueError(f"synthetic dataset: need n >= 0, size >= 8 and seed >= 0 (got "
                             f"n={n}, size={size}, seed={seed})")
        self.split, self.size, self.seed = split, size, seed
        self.classes = list(CLASSES)
        self.targets = [i % len(CLASSES) for i in range(n)]

    def describe(self, i: int) -> str:
        return f"synthetic:{self.split}/{self._check_index(i)} (seed {self.seed}, {self.size}px)"

    def load(self, i: int) -> Image.Image:
        i = self._check_index(i)
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), i, self.size])
        return render(self.targets[i], rng, self.size)
