"""What the embedded synthetic dataset shows (``dataset=synthetic``): its classes, spec and renderer.

A procedural stand-in for Cityscapes / PASCAL VOC with the same on-disk shape (``images/``, ``labels/``,
``lists/`` and a ``manifest.json``), so the whole semi-supervised pipeline (split lists, warm-up,
pseudo-labelling, evaluation) runs on a CPU in minutes with no download.

It is meant to be a *real* semi-supervised task, not a toy: a tiny DeepLab trained on 1/8 of the labels
should fall clearly short of one trained on all of them, leaving a gap for pseudo-labelling to close.
Each foreground class is a (shape, texture) pair; shapes and textures are each shared by several
classes, and colours are drawn around a per-class hue with a jitter (±30°) wider than half the 40° spacing, so no
single cue (colour, shape or texture) identifies a class. On top come random rotation / aspect / size,
several objects per image that occlude each other, a textured background with distractor lines, dots and
untextured shapes (all background), a lighting gradient, global brightness, blur and sensor noise. Like
VOC, a thin band on every label boundary is marked 255 (ignore).

All the difficulty knobs live in :class:`SyntheticSpec`. Every image draws from its own RNG seeded by
``(seed, split, index)``, so generation is deterministic whatever the number of worker processes.
"""

from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass, fields

import cv2
import numpy as np

from dmtc.data.layouts import IGNORE_INDEX
from dmtc.errors import DMTCError

SPLITS: tuple[str, ...] = ("train", "val")


# (class name, shape, texture). Every shape and every texture is shared by at least two classes.
_CLASS_DEFS: tuple[tuple[str, str, str], ...] = (
    ("background", "", ""),
    ("striped_disk", "disk", "stripes"),
    ("dotted_disk", "disk", "dots"),
    ("checkered_square", "square", "checkers"),
    ("mottled_square", "square", "noise"),
    ("striped_triangle", "triangle", "stripes"),
    ("checkered_ring", "ring", "checkers"),
    ("dotted_cross", "cross", "dots"),
    ("mottled_star", "star", "noise"),
    ("striped_bar", "bar", "stripes"),
)


SYNTHETIC_CLASSES: tuple[str, ...] = tuple(name for name, _, _ in _CLASS_DEFS)
"""Class names; the index is the class id in the label PNGs (0 = background)."""


SYNTHETIC_PALETTE: list[tuple[int, int, int]] = [
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (170, 110, 40),
]
"""RGB colour per class id, for visualising labels and predictions."""


@dataclass(frozen=True)
class SyntheticSpec:
    """Size of the dataset and the difficulty knobs of the renderer.

    Lengths are fractions of ``image_size`` where marked, so a small spec (for tests) keeps the look of
    the default one. Ranges are ``(low, high)`` tuples. The defaults aim at a task where a tiny DeepLab
    trained from scratch reaches a clearly better mIoU with all labels than with 1/8 of them.
    """

    image_size: int = 128
    num_train: int = 800
    num_val: int = 200
    objects: tuple[int, int] = (4, 7)
    """Number of labelled objects per image (inclusive range)."""
    object_radius: tuple[float, float] = (0.07, 0.22)
    """Equivalent-disk radius of an object, as a fraction of image_size (log-uniform)."""
    aspect_jitter: float = 0.15
    """Each object axis is stretched by a factor in [1 - j, 1 + j]."""
    hue_jitter: float = 30.0
    """Degrees around the class hue; classes are 40 degrees apart, so neighbours' colours overlap and colour
    narrows a pixel down to two or three classes (60 makes colour nearly useless: the split-8 model then
    reaches only ~32 mIoU and its pseudo labels are too wrong for DMT, benchmarks/RESULTS.md)."""
    texture_contrast: tuple[float, float] = (0.35, 0.8)
    texture_period: tuple[float, float] = (4.0, 9.0)
    """Stripe / checker / dot period in pixels."""
    brightness: tuple[float, float] = (0.65, 1.3)
    gradient: float = 0.4
    """Maximum relative brightness change of the lighting gradient across the image."""
    background_texture: float = 0.2
    """Maximum contrast of the faint stripes / mottling on the background (below texture_contrast)."""
    distractors: tuple[int, int] = (2, 8)
    """Thin lines and small dots per image, labelled background."""
    plain_shapes: tuple[int, int] = (0, 2)
    """Untextured object-like shapes per image, labelled background (texture matters, not only shape)."""
    blur_sigma: float = 0.6
    noise_sigma: float = 5.0
    """Gaussian sensor noise, in 0..255 intensity units."""
    boundary_width: int = 1
    """Width in pixels of the ignore (255) band on label boundaries; 0 disables it."""

    def __post_init__(self) -> None:
        for f in fields(self):  # accept lists for ranges (YAML / OmegaConf), keep the spec hashable
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))

        def bad(name: str, why: str) -> DMTCError:
            return DMTCError(f"SyntheticSpec.{name}={getattr(self, name)!r}: {why}")

        if self.image_size < 16:
            raise bad("image_size", "must be at least 16 pixels")
        if self.num_train < 1 or self.num_val < 1:
            raise bad("num_train" if self.num_train < 1 else "num_val", "must be at least 1")
        for name in ("objects", "object_radius", "texture_contrast", "texture_period", "brightness",
                     "distractors", "plain_shapes"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise bad(name, "must be a range (low, high) with 0 <= low <= high")
        if self.objects[1] < 1:
            raise bad("objects", "needs at least one object per image")
        if self.texture_period[0] < 2:
            raise bad("texture_period", "periods below 2 pixels alias away")
        if not 0 <= self.aspect_jitter < 1:
            raise bad("aspect_jitter", "must be in [0, 1)")
        if self.boundary_width < 0:
            raise bad("boundary_width", "must be >= 0")

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(SYNTHETIC_CLASSES)

    def count(self, split: str) -> int:
        """Number of images in ``split`` ("train" or "val")."""
        return {"train": self.num_train, "val": self.num_val}[split]


DEFAULT_SPEC = SyntheticSpec()


__all__ = ["render_sample"]

_NUM_FG = len(_CLASS_DEFS) - 1
_SHAPES = ("disk", "square", "triangle", "ring", "cross", "star", "bar")


# --------------------------------------------------------------------------------------------- shapes
def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a unit-size shape in local (rotated, normalised) coordinates."""
    if shape == "disk":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":  # equilateral, circumradius 1
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            a = np.pi / 2 + 2 * np.pi * k / 3
            inside &= u * np.cos(a) + v * np.sin(a) <= 0.5
        return inside
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.3)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if shape == "star":  # five points
        rho = np.hypot(u, v)
        theta = np.arctan2(v, u)
        return rho <= 0.4 + 0.6 * ((1.0 + np.cos(5.0 * theta)) / 2.0) ** 1.5
    if shape == "bar":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.28)
    raise ValueError(shape)


def _unit_areas() -> dict[str, float]:
    """Area of each unit shape, measured once on a grid, to give every shape the same mean area."""
    t = np.linspace(-1.3, 1.3, 261, dtype=np.float32)
    u, v = np.meshgrid(t, t)
    cell = float(t[1] - t[0]) ** 2
    return {s: float(_shape_mask(s, u, v).sum()) * cell for s in _SHAPES}


_SHAPE_SCALE = {s: float(np.sqrt(np.pi / a)) for s, a in _unit_areas().items()}
_SHAPE_EXTENT = 1.2  # every unit shape fits in the disk of this radius (square corner: 0.8*sqrt(2))


# ------------------------------------------------------------------------------------------- textures
def _rotated(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return x * c + y * s, -x * s + y * c


def _texture(kind: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
             period_range: tuple[float, float]) -> np.ndarray:
    """A pattern in [0, 1] over pixel coordinates x, y (stripes, checkers, dots or mottled noise)."""
    period = rng.uniform(*period_range)
    u, v = _rotated(x, y, rng.uniform(0, np.pi))
    phase_u, phase_v = rng.random(2)
    if kind == "stripes":
        s = np.sin(2 * np.pi * (u / period + phase_u))
        return np.clip(0.5 + 1.5 * s, 0.0, 1.0)
    if kind == "checkers":
        cell = period / 2
        return ((np.floor(u / cell + phase_u) + np.floor(v / cell + phase_v)) % 2).astype(np.float32)
    if kind == "dots":
        du = u / period + phase_u
        dv = v / period + phase_v
        dist = np.hypot(du - np.round(du), dv - np.round(dv))
        radius = rng.uniform(0.25, 0.35)
        return np.clip((radius - dist) * period + 0.5, 0.0, 1.0)
    if kind == "noise":
        h, w = x.shape
        cell = period / 3
        grid = rng.random((int(h / cell) + 2, int(w / cell) + 2)).astype(np.float32)
        up = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        return np.clip(0.5 + 2.5 * (up - 0.5), 0.0, 1.0)
    raise ValueError(kind)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h / 360.0) % 1.0, s, v), dtype=np.float32) * 255.0


def _object_colours(rng: np.random.Generator, hue: float, spec: SyntheticSpec) -> tuple[np.ndarray, ...]:
    """Two colours for a textured object: a base around ``hue`` and a lighter or darker partner."""
    h = hue + rng.uniform(-spec.hue_jitter, spec.hue_jitter)
    s = rng.uniform(0.35, 0.95)
    v = rng.uniform(0.45, 0.95)
    contrast = rng.uniform(*spec.texture_contrast)
    v2 = v - contrast if v - contrast >= 0.1 or v + contrast > 1.0 else v + contrast
    v2 = float(np.clip(v2, 0.05, 1.0))
    return _hsv(h, s, v), _hsv(h + rng.uniform(-30, 30), s * rng.uniform(0.6, 1.0), v2)


def _class_hue(class_id: int) -> float:
    return (class_id - 1) * 360.0 / _NUM_FG


# ------------------------------------------------------------------------------------------ rendering
def _place(rng: np.random.Generator, size: int, radius: float, shape: str, aspect_jitter: float
           ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, np.ndarray] | None:
    """Random pose of one shape: its bounding-box slices, inside-mask and pixel coordinates there."""
    cx, cy = rng.uniform(0, size, 2)
    angle = rng.uniform(0, 2 * np.pi)
    ax, ay = 1.0 + rng.uniform(-aspect_jitter, aspect_jitter, 2)
    r = radius * _SHAPE_SCALE[shape]
    half = int(np.ceil(_SHAPE_EXTENT * r * max(ax, ay))) + 1
    y0, y1 = max(0, int(cy) - half), min(size, int(cy) + half + 1)
    x0, x1 = max(0, int(cx) - half), min(size, int(cx) + half + 1)
    if y1 <= y0 or x1 <= x0:
        return None
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    u, v = _rotated(x + 0.5 - cx, y + 0.5 - cy, angle)
    mask = _shape_mask(shape, u / (r * ax), v / (r * ay))
    return (slice(y0, y1), slice(x0, x1)), mask, x, y


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> np.ndarray:
    """Pixel coordinates ``(y, x)`` of a size x size image, float32 (shared, read-only)."""
    grid = np.mgrid[0:size, 0:size].astype(np.float32)
    grid.flags.writeable = False
    return grid


def _background(rng: np.random.Generator, spec: SyntheticSpec) -> np.ndarray:
    size = spec.image_size
    base = _hsv(rng.uniform(0, 360), rng.uniform(0.05, 0.5), rng.uniform(0.3, 0.8))
    # Low-frequency colour variation plus faint texture of a random kind.
    coarse = rng.normal(0.0, 18.0, (4, 4, 3)).astype(np.float32)
    img = base + cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    y, x = _grid(size)
    kind = ("stripes", "checkers", "dots", "noise")[rng.integers(4)]
    pattern = _texture(kind, x, y, rng, (spec.texture_period[0], 2 * spec.texture_period[1]))
    amount = rng.uniform(0.0, spec.background_texture) * 255.0
    return img - (pattern[..., None] - 0.5) * amount


def _draw_distractors(img: np.ndarray, rng: np.random.Generator, spec: SyntheticSpec) -> None:
    size = spec.image_size
    for _ in range(rng.integers(spec.distractors[0], spec.distractors[1] + 1)):
        colour = tuple(float(c) for c in _hsv(rng.uniform(0, 360), rng.uniform(0, 1), rng.uniform(0.1, 1)))
        if rng.random() < 0.5:
            p0 = rng.integers(0, size, 2)
            p1 = p0 + rng.integers(-size // 2, size // 2 + 1, 2)
            cv2.line(img, (int(p0[0]), int(p0[1])), (int(p1[0]), int(p1[1])), colour,
                     int(rng.integers(1, 3)), cv2.LINE_AA)
        else:
            centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
            cv2.circle(img, centre, int(rng.integers(1, max(2, size // 40) + 1)), colour, -1, cv2.LINE_AA)
    for _ in range(rng.integers(spec.plain_shapes[0], spec.plain_shapes[1] + 1)):
        radius = size * float(np.exp(rng.uniform(*np.log(spec.object_radius))))
        placed = _place(rng, size, radius, _SHAPES[rng.integers(len(_SHAPES))], spec.aspect_jitter)
        if placed is not None:
            box, mask, _, _ = placed
            img[box][mask] = _object_colours(rng, rng.uniform(0, 360), spec)[0]


def render_sample(rng: np.random.Generator, spec: SyntheticSpec = DEFAULT_SPEC
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Render one image and its label from ``rng``.

    Returns ``(image, label)``: an ``H x W x 3`` uint8 RGB image and an ``H x W`` uint8 label with class
    ids ``0..C-1`` and ``255`` on a thin band along every boundary between different classes.
    """
    size = spec.image_size
    img = _background(rng, spec)
    label = np.zeros((size, size), dtype=np.uint8)
    _draw_distractors(img, rng, spec)

    n = int(rng.integers(spec.objects[0], spec.objects[1] + 1))
    classes = rng.integers(1, _NUM_FG + 1, n)
    radii = size * np.exp(rng.uniform(*np.log(spec.object_radius), n))
    for i in np.argsort(-radii, kind="stable"):  # large first, so small ones are seldom hidden entirely
        class_id = int(classes[i])
        _, shape, texture = _CLASS_DEFS[class_id]
        placed = _place(rng, size, float(radii[i]), shape, spec.aspect_jitter)
        if placed is None:
            continue
        box, mask, x, y = placed
        c1, c2 = _object_colours(rng, _class_hue(class_id), spec)
        pattern = _texture(texture, x, y, rng, spec.texture_period)[..., None]
        patch = c1 * (1.0 - pattern) + c2 * pattern
        img[box][mask] = patch[mask]
        label[box][mask] = class_id

    # Lighting: global brightness times a linear gradient in a random direction.
    y, x = _grid(size) / np.float32(size) - np.float32(0.5)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = x * np.cos(direction) + y * np.sin(direction)
    light = rng.uniform(*spec.brightness) * (1.0 + rng.uniform(0, spec.gradient) * ramp)
    img *= light[..., None]
    if spec.blur_sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), spec.blur_sigma)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(spec.noise_sigma)
    image = np.clip(img + 0.5, 0, 255).astype(np.uint8)

    if spec.boundary_width > 0:
        kernel = np.ones((spec.boundary_width + 1, spec.boundary_width + 1), np.uint8)
        edge = cv2.dilate(label, kernel) != cv2.erode(label, kernel)
        label[edge] = IGNORE_INDEX
    return image, label
