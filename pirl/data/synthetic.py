"""The built-in procedural dataset (``open_source("synthetic")``): shapes on cluttered backgrounds.

Ten classes that differ only in *what is depicted* (the shape's outline); everything else is a
nuisance drawn independently of the class:

* colour: the background's and the shape's colours are random; the shape differs from the
  background's mean in luminance (by at least :attr:`Style.min_luma_gap` grey levels), so the
  outline stays visible in a grayscale copy;
* background: a solid colour, a linear gradient, smooth blotches, or per-pixel speckle noise;
* pose: position, size (radius 32-45 % of the side), any rotation, and a slight stretch;
* clutter: half of the images get a small distractor (a blob or a thin line) behind the shape;
* sensor noise: mild Gaussian noise on some images.

Because colour and background statistics carry no class information, a representation that
separates the classes must encode shape; a randomly initialised network mostly encodes colour and
layout.  That gap is what ``pirl demo`` measures with kNN.  The luminance gap matters for
learning (``benchmarks/demo_search.py``, docs/demo.md): with colour-only contrast a grayscale or
strongly colour-jittered view can lose the outline, and PIRL trained with the colour
augmentation that makes it ignore colour barely beat random init.

Image ``i`` is a pure function of ``(seed, split, i, size)`` (its own ``numpy`` generator seeded
from those), so any subset, worker or order gives the same pixels; train and val draw from
different seed streams.  Label ``i`` is ``i % 10`` (balanced to within one image).  Images are
drawn lazily in :meth:`SyntheticSource.load`: nothing is cached.
:data:`STYLE` holds the nuisance ranges (the benchmarks swap in other :class:`Style` values to
measure what the dataset's design does to the demo).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pirl.data.source import ImageSource

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


LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601 weights, as PIL's and torchvision's grayscale


@dataclass(frozen=True)
class Style:
    """Nuisance ranges of the synthetic images (the defaults are the shipped dataset).

    Attributes:
        radius: the shape's radius, as a fraction of the side, drawn uniformly from this range.
        max_rotation: the angle is drawn uniformly from ``[-max_rotation, max_rotation]`` radians.
        backgrounds: which background kinds may be drawn (0 solid, 1 gradient, 2 blotches,
            3 speckle), uniformly.
        clutter: probability of a distractor behind the shape.
        noise: probability of mild Gaussian sensor noise.
        min_luma_gap: least luminance difference (0-255) between the shape and the background's
            mean; 0 means the older rule (RGB distance above 110, any luminance).
    """

    radius: tuple[float, float] = (0.32, 0.45)
    max_rotation: float = 2 * math.pi
    backgrounds: tuple[int, ...] = (0, 1, 2, 3)
    clutter: float = 0.5
    noise: float = 0.5
    min_luma_gap: float = 80.0


STYLE = Style()


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _background(rng: np.random.Generator, size: int, kinds: tuple[int, ...] = (0, 1, 2, 3)
                ) -> np.ndarray:
    """float32 [size, size, 3] in [0, 255]: solid, gradient, blotches or speckle (one of
    ``kinds``, uniformly)."""
    c1 = _random_colour(rng)
    kind = kinds[int(rng.integers(len(kinds)))]
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


def _luma_contrasting_colour(rng: np.random.Generator, against: np.ndarray, gap: float
                             ) -> np.ndarray:
    """A random colour whose luminance differs from ``against``'s by more than ``gap``; if 64
    draws miss (``against`` mid-grey and a large gap), the last draw pushed to black or white."""
    target = float(against @ LUMA)
    for _ in range(64):
        c = _random_colour(rng)
        if abs(float(c @ LUMA) - target) > gap:
            return c
    # Scale the colour towards black or white: luminance is linear in RGB, so this reaches the
    # gap whenever the far end (0 or 255) is more than ``gap`` away, which holds for gap < 127.5.
    if target > 127.5:
        return c * max(0.0, (target - gap - 1) / max(float(c @ LUMA), 1e-6))
    lum = float(c @ LUMA)
    return 255.0 - (255.0 - c) * max(0.0, (255.0 - target - gap - 1) / max(255.0 - lum, 1e-6))


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


def render(label: int, rng: np.random.Generator, size: int = 40, style: Style | None = None
           ) -> Image.Image:
    """One image of class ``label`` with every nuisance drawn from ``rng`` within ``style``
    (default :data:`STYLE`, looked up at call time).  RGB, size x size."""
    st = STYLE if style is None else style
    img = _background(rng, size, st.backgrounds)
    if rng.random() < st.clutter:
        m = _distractor(rng, size)[..., None]
        img = img * (1 - m) + _random_colour(rng) * m
    radius = rng.uniform(*st.radius) * size
    margin = 0.85 * radius  # the shape may touch the border, but most of it stays inside
    centre = rng.uniform(margin, size - margin, 2)
    m = _mask(SHAPES[label], size, centre, radius,
              angle=rng.uniform(-st.max_rotation, st.max_rotation),
              stretch=math.exp(rng.uniform(-0.15, 0.15)))[..., None]
    mean = img.reshape(-1, 3).mean(0)
    fg = (_luma_contrasting_colour(rng, mean, st.min_luma_gap) if st.min_luma_gap > 0
          else _contrasting_colour(rng, mean))
    img = img * (1 - m) + fg * m
    if rng.random() < st.noise:
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
