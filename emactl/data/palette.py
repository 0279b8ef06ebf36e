"""Colour palettes for label maps and writing them as palette PNGs."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image

from ..io import atomic_path


def voc_palette() -> np.ndarray:
    """The PASCAL VOC palette, (256, 3) uint8: class bits spread over the high bits of R, G, B.

    Index 0 is black and index 255 (the ignore label) is (224, 224, 192), as in VOC's own PNGs.
    """
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        c, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[index] = (r, g, b)
    return palette


def palette_from(colours: Sequence[Sequence[int]]) -> np.ndarray:
    """A (256, 3) palette whose first entries are ``colours``; the rest follow the VOC palette."""
    palette = voc_palette()
    palette[: len(colours)] = np.asarray(colours, dtype=np.uint8)
    return palette


def colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Map a (H, W) label map to (H, W, 3) uint8 colours; values outside [0, 255] become black."""
    label = np.asarray(label)
    out = np.zeros(label.shape + (3,), dtype=np.uint8)
    valid = (label >= 0) & (label < len(palette))
    out[valid] = palette[label[valid]]
    return out


def save_palette_png(path: str | os.PathLike, label: np.ndarray, palette: np.ndarray) -> None:
    """Write ``label`` (values in [0, 255]) as a palette PNG, atomically."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be 2-D, got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label values must be in [0, 255] for a palette PNG, got "
                         f"[{label.min()}, {label.max()}]")
    height, width = label.shape
    data = np.ascontiguousarray(label, dtype=np.uint8).tobytes()
    image = Image.frombytes("P", (width, height), data)
    image.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_gray_png(path: str | os.PathLike, label: np.ndarray) -> None:
    """Write ``label`` (values in [0, 255]) as a grayscale PNG, atomically.

    This is how cityscapesScripts and the common converters store train-id maps, so the
    files read the same in any toolkit (a palette PNG read as grey by OpenCV would not).
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be 2-D, got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label values must be in [0, 255], got [{label.min()}, {label.max()}]")
    image = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8))  # 2-D uint8: mode L
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
