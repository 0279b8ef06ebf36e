"""Shared figure code: the matplotlib setup, fixed sizes, label colouring, overlays, legends.

Every figure is a :class:`matplotlib.figure.Figure` of a fixed size in inches, saved at
:data:`DPI` without tight bounding boxes, so its pixel size is known in advance
(``inches × DPI``). Figures are built without pyplot's global state and saved atomically.
"""
from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ..data.palette import colorize  # noqa: E402
from ..io import save_figure  # noqa: E402

DPI = 100
PANEL = 3.0  # inches per image panel
RESP_CMAP = "viridis"  # perceptual colormap for responsibilities
HEAT_CMAP = "Blues"  # sequential colormap for the confusion matrix
ERROR_COLOUR = (230, 25, 25)
FIGURES_DIR = "figures"


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width × height`` inches with constrained layout (saved at :data:`DPI`)."""
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def figure_pixels(width: float, height: float) -> tuple[int, int]:
    """The (width, height) in pixels of a saved ``width × height``-inch figure."""
    return int(round(width * DPI)), int(round(height * DPI))


def save(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG atomically at the fixed DPI, on white."""
    return save_figure(fig, path, dpi=DPI, facecolor="white")


def safe_name(name: str) -> str:
    """A file-name-safe version of a sample name (``a/b c.png`` → ``a_b_c.png``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "image"


def unique_names(names: Iterable[str]) -> list[str]:
    """Safe names, with ``_2``, ``_3``... appended to repeats so no file overwrites another."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        base = safe_name(name)
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return out


def output_dir(out: str | os.PathLike | None, default_parent: Path) -> Path:
    """``out`` when given, else ``<default_parent>/figures``."""
    return Path(out) if out is not None else default_parent / FIGURES_DIR


# --------------------------------------------------------------------------------------------
# Label maps: colours, overlays, legends.


def label_colours(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class indices → (H, W, 3) uint8 palette colours (the ignore index keeps its own)."""
    return colorize(label, palette)


def overlay(image: np.ndarray, label: np.ndarray, palette: np.ndarray, ignore_index: int, alpha: float = 0.55) -> np.ndarray:
    """The image blended with the class colours; ignored pixels show the plain image."""
    colours = label_colours(label, palette).astype(np.float32)
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    keep = label == ignore_index
    mixed[keep] = image[keep]
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def error_map(image: np.ndarray, pred: np.ndarray, label: np.ndarray, ignore_index: int) -> tuple[np.ndarray, float]:
    """The image in grey with wrongly predicted pixels in red, and the error rate in percent.

    Ignored pixels do not count, as in the metrics.
    """
    grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    out = np.repeat((0.35 * grey + 0.65 * 255 * 0.5)[..., None], 3, axis=2)
    valid = label != ignore_index
    wrong = valid & (pred != label)
    out[wrong] = ERROR_COLOUR
    rate = 100.0 * wrong.sum() / max(int(valid.sum()), 1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), float(rate)


def present_classes(*labels: np.ndarray | None, num_classes: int) -> list[int]:
    """Sorted class indices in ``[0, num_classes)`` that occur in any of ``labels``."""
    found: set[int] = set()
    for label in labels:
        if label is not None:
            found.update(int(v) for v in np.unique(label) if 0 <= v < num_classes)
    return sorted(found)


def class_legend(
    ax: Axes,
    classes: Sequence[int],
    names: Sequence[str],
    palette: np.ndarray,
    ignore: bool = False,
    title: str = "classes",
) -> None:
    """Fill ``ax`` (axis hidden) with a colour legend of ``classes`` (and the ignore colour)."""
    handles = [Patch(facecolor=palette[c] / 255.0, edgecolor="0.3", label=f"{c}: {names[c]}") for c in classes]
    if ignore:
        handles.append(Patch(facecolor=palette[255] / 255.0, edgecolor="0.3", label="ignored (255)"))
    ax.set_axis_off()
    if handles:
        size = "medium" if len(handles) <= 12 else "small" if len(handles) <= 24 else "x-small"
        ax.legend(handles=handles, loc="center left", frameon=False, title=title, fontsize=size,
                  ncols=1 if len(handles) <= 16 else 2)


def show_image(ax: Axes, image: np.ndarray, title: str, **kwargs: object) -> object:
    """``imshow`` with a title and no ticks; returns the image artist."""
    artist = ax.imshow(image, **kwargs)
    ax.set_title(title, fontsize="medium")
    ax.set_xticks([])
    ax.set_yticks([])
    return artist


def wrap_title(text: str, width_in: float) -> str:
    """Wrap each line of a title to fit ``width_in`` inches at the default font size."""
    chars = max(20, int(width_in * 14))
    return "\n".join(textwrap.fill(line, chars) for line in text.splitlines())


def suptitle(fig: Figure, text: str) -> None:
    """A figure title, wrapped to the figure's width."""
    fig.suptitle(wrap_title(text, float(fig.get_size_inches()[0])), fontsize="medium")
