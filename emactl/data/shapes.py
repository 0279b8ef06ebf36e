"""``shapes``: a procedural dataset where global context matters. Needs no files.

Each image shows shapes (light circles, dark squares, finely striped triangles: the kind is
easy to tell locally) on a textured, noisy background. Every image also has a hidden *scene*,
warm or cool, and a shape's class is the pair (shape type, scene): 3 × 2 object classes plus
background = 7 classes. Shape colours have equal red and blue, so a shape's kind says nothing
about the scene; the scene is a faint red−blue cast, placed in one of two ways (``cue_on``):

* ``objects`` (the default, and the demo recipe's): every object carries ``±cue`` plus its own random offset of
  std ``clutter``, the background none. One object names its scene only ~75 % of the time
  (cue 0.1, clutter 0.15: Φ(0.67)); the mean over the ten or so objects of an image is almost
  always right. EMA reconstructs each pixel from the mean of its cluster (objects of a kind
  look alike) over the whole image, so it can read the pooled cast; a head that sees only a
  shape's neighbourhood must go by one or two objects. The demo makes the image (128 px)
  larger than the ``micro`` backbone's field of view for this reason.
* ``image``: the cast covers the whole image, hidden under a zero-mean *clutter* field (random
  low-frequency waves of std ``clutter``); only the mean over the full image equals the cue.
  Heads with image-level pooling (PSP, ASPP) can read it; EMA hardly can, since it gives an
  object pixel the mean of the object's own cluster while the cast lives on the background.

Object borders (``border`` px on each side) carry the ignore label (255), as in VOC.

Every sample is a pure function of ``(seed, split, index)``: the generator is
``np.random.default_rng([seed, crc32(split), index])``.
"""
from __future__ import annotations

import zlib

import numpy as np

from ..config import DataConfig
from ..errors import UserError
from .base import DATASETS, Sample, SegDataset

SHAPES = ("circle", "square", "triangle")
SCENES = ("warm", "cool")
KIND_LEVEL = (1.0, -1.0, 0.0)  # circle lighter, square darker, triangle at the background's level
STRIPE_AMPLITUDE = 0.2  # triangles' stripes
CLASSES = ("background",) + tuple(f"{s}_{c}" for s in SHAPES for c in SCENES)
TEXTURE_CYCLES = 6


def class_index(shape: int, scene: int) -> int:
    """The label of shape type ``shape`` (index into SHAPES) in scene ``scene`` (into SCENES)."""
    return 1 + len(SCENES) * shape + scene


def wave_field(rng: np.random.Generator, size: int, cycles: int, waves: int = 16) -> np.ndarray:
    """A smooth (size, size) field with zero mean and unit standard deviation over the image.

    It is a sum of plane waves with integer frequencies of at most ``cycles`` cycles per image
    along each axis; each completes whole periods across the image, so the mean is exactly zero.
    """
    freqs = rng.integers(-cycles, cycles + 1, size=(waves, 2))
    zero = (freqs == 0).all(axis=1)
    freqs[zero] = (1, 0)
    phases = rng.uniform(0.0, 2 * np.pi, size=waves)
    coords = np.arange(size, dtype=np.float64) * (2 * np.pi / size)
    field = np.zeros((size, size))
    for (fx, fy), phase in zip(freqs, phases):
        field += np.cos(fy * coords[:, None] + fx * coords[None, :] + phase)
    field -= field.mean()
    std = field.std()
    return field / std if std > 0 else field


def shape_mask(kind: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float,
               theta: float) -> np.ndarray:
    """Pixels inside a circle, square or equilateral triangle of radius ``r``, rotated by theta."""
    dy, dx = yy - cy, xx - cx
    if kind == 0:
        return dy * dy + dx * dx <= r * r
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == 1:
        half = r / np.sqrt(2)
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):  # three half-planes at distance r/2 from the centre
        a = theta + 2 * np.pi * k / 3
        inside &= np.cos(a) * dx + np.sin(a) * dy <= r / 2
    return inside


def border_mask(label: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` px (chessboard distance) of a pixel with another label."""
    edge = np.zeros(label.shape, dtype=bool)
    if width <= 0:
        return edge
    h, w = label.shape
    padded = np.pad(label, width, mode="edge")
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            if dy or dx:
                edge |= padded[width + dy : width + dy + h, width + dx : width + dx + w] != label
    return edge


def render(
    rng: np.random.Generator,
    *,
    size: int,
    min_shapes: int,
    max_shapes: int,
    noise: float,
    cue: float,
    clutter: float,
    clutter_cycles: int,
    texture: float,
    border: int,
    ignore_index: int,
    cue_on: str,
    min_radius: float,
    max_radius: float,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One image (uint8 RGB), its label map (int64) and its scene (0 warm, 1 cool).

    The options are :class:`ShapesDataset`'s (which holds their defaults).
    """
    scene = int(rng.integers(len(SCENES)))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    base = rng.uniform(0.35, 0.65)
    image = np.empty((size, size, 3))
    image[:] = base
    image[..., 1] += rng.uniform(-0.05, 0.05)
    image += texture * wave_field(rng, size, TEXTURE_CYCLES)[..., None]
    label = np.zeros((size, size), dtype=np.int64)
    for _ in range(int(rng.integers(min_shapes, max_shapes + 1))):
        kind = int(rng.integers(len(SHAPES)))
        r = rng.uniform(min_radius, max_radius) * size
        cy, cx = rng.uniform(r, size - r, size=2)
        mask = shape_mask(kind, yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi))
        # Each kind also has its own local look, so the kind is easy and only the scene is
        # hard: circles are lighter than the background, squares darker, triangles carry
        # strong fine stripes. Red == blue, so no shape says anything about the scene.
        level = base + KIND_LEVEL[kind] * rng.uniform(0.2, 0.3)
        green = level + rng.uniform(-0.1, 0.1)
        red_blue = (3 * level - green) / 2
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 4) if kind == 2 else rng.uniform(4, 8)
        amplitude = STRIPE_AMPLITUDE if kind == 2 else texture
        stripes = amplitude * np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
        image[mask] = np.stack([red_blue, green, red_blue]) + stripes[mask][:, None]
        if cue_on == "objects":
            cast = (cue if scene == 0 else -cue) + clutter * rng.normal()
            image[mask, 0] += cast / 2
            image[mask, 2] -= cast / 2
        label[mask] = class_index(kind, scene)
    if cue_on == "image":
        cast = (cue if scene == 0 else -cue) + clutter * wave_field(rng, size, clutter_cycles)
        image[..., 0] += cast / 2
        image[..., 2] -= cast / 2
    image += rng.normal(0.0, noise, size=image.shape)
    image = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    label[border_mask(label, border)] = ignore_index
    return image, label, scene


@DATASETS.register("shapes")
class ShapesDataset(SegDataset):
    """Synthetic shapes whose class depends on an image-wide scene cue (see the module doc).

    Options (``data.args``): ``size`` (px), ``train_length`` (samples in ``data.train_split``),
    ``val_length`` (samples in any other split), ``seed``, ``min_shapes``/``max_shapes``,
    ``noise`` (per-pixel std, in [0, 1] intensity), ``cue`` (half the red−blue gap between the
    scenes), ``clutter`` (std of the zero-mean red−blue field hiding the cue locally),
    ``clutter_cycles`` (its highest frequency, in cycles per image), ``texture`` (amplitude of the
    background waves and shape stripes) and ``border`` (ignore band, px per side).
    ``cue_on`` is ``image`` (the cast covers the whole image, hidden by the clutter field) or
    ``objects`` (each object carries ``±cue`` plus its own offset of std ``clutter``; the
    background none), where the scene is best read by pooling over all the objects.
    ``min_radius``/``max_radius`` bound a shape's radius as a fraction of ``size``.
    Harder: lower ``cue``, higher ``clutter``; ``cue=0`` makes the scene a coin toss.
    """

    CLASSES = CLASSES

    def __init__(
        self,
        cfg: DataConfig,
        split: str,
        train: bool,
        strict: bool = True,
        *,
        size: int = 128,
        train_length: int = 2000,
        val_length: int = 200,
        seed: int = 0,
        min_shapes: int = 8,
        max_shapes: int = 12,
        noise: float = 0.04,
        cue: float = 0.1,
        clutter: float = 0.15,
        clutter_cycles: int = 2,
        texture: float = 0.03,
        border: int = 1,
        cue_on: str = "objects",
        min_radius: float = 0.06,
        max_radius: float = 0.1,
    ) -> None:
        super().__init__(cfg, split, train)
        for key, value, ok, limit in (
            ("size", size, size >= 16, ">= 16"),
            ("train_length", train_length, train_length >= 1, ">= 1"),
            ("val_length", val_length, val_length >= 1, ">= 1"),
            ("min_shapes", min_shapes, min_shapes >= 1, ">= 1"),
            ("max_shapes", max_shapes, max_shapes >= min_shapes, ">= data.args.min_shapes"),
            ("noise", noise, noise >= 0, ">= 0"),
            ("cue", cue, cue >= 0, ">= 0"),
            ("clutter", clutter, clutter >= 0, ">= 0"),
            ("clutter_cycles", clutter_cycles, clutter_cycles >= 1, ">= 1"),
            ("texture", texture, texture >= 0, ">= 0"),
            ("border", border, border >= 0, ">= 0"),
            ("cue_on", cue_on, cue_on in ("image", "objects"), "image or objects"),
            ("min_radius", min_radius, 0 < min_radius <= 0.5, "in (0, 0.5]"),
            ("max_radius", max_radius, min_radius <= max_radius <= 0.5, "in [data.args.min_radius, 0.5]"),
        ):
            if not ok:
                raise UserError(f"data.args.{key}: must be {limit}, got {value}")
        self.length = train_length if split == cfg.train_split else val_length
        self.seed = seed
        self.split_id = zlib.crc32(split.encode())
        self.params = dict(size=size, min_shapes=min_shapes, max_shapes=max_shapes, noise=noise,
                           cue=cue, clutter=clutter, clutter_cycles=clutter_cycles,
                           texture=texture, border=border, ignore_index=cfg.ignore_index,
                           cue_on=cue_on, min_radius=min_radius, max_radius=max_radius)

    def __len__(self) -> int:
        return self.length

    def source(self, i: int) -> str:
        return f"shapes[{self.split}][{i}]"

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.split_id, i])

    def scene(self, i: int) -> int:
        """The hidden scene of sample ``i`` (0 warm, 1 cool), for analysis."""
        return render(self.rng(i), **self.params)[2]

    def load_raw(self, i: int) -> Sample:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} samples")
        image, label, _ = render(self.rng(i), **self.params)
        return Sample(image, label, f"{self.split}_{i:06d}")
