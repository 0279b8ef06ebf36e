"""``visualize bases``: the responsibility map of chosen bases, as in the paper's figure.

For each image: the input, the ground truth (when there is one), the prediction, a class
legend, then for every chosen basis k the map Z[:, k] — how strongly each pixel is assigned to
basis k in the last E step — reshaped to the feature map, upsampled bilinearly to the image
and drawn with a perceptual colormap on one scale (0 to the largest value shown) with a
colorbar, so the maps compare directly.

Without explicit bases, up to ``top`` bases are picked by the structure they show: the bases
whose responsibility is clearly higher inside one predicted class than outside it, one per
class, strongest first (see :func:`choose_bases`). Picking by spatial variance showed bases
that share the background and look nearly flat.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from ..data import Sample
from ..errors import UserError
from ..lists import items
from .common import PANEL, RESP_CMAP, class_legend, label_colours, new_figure, present_classes, show_image, suptitle
from .samples import ImageSet, PerImage, Recorded, draw_per_image

DEFAULT_TOP = 4
MAX_COLS = 4


def parse_bases(text: str) -> list[int]:
    """``"3,7,12"`` → ``[3, 7, 12]``."""
    try:
        values = [int(v) for v in items(text.replace(" ", ""))]
    except ValueError:
        raise UserError(f"--bases: expected comma-separated basis indices like 0,5,12, got {text!r}") from None
    if not values:
        raise UserError("--bases: give at least one basis index")
    return values


MIN_CONTRAST = 0.1  # a basis marks a class when its responsibility is this much higher inside


def classes_at(pred: np.ndarray, size: tuple[int, int]) -> Tensor:
    """The (H, W) class map sampled at the centres of an (h, w) feature grid."""
    rows = ((np.arange(size[0]) + 0.5) * pred.shape[0] / size[0]).astype(np.int64)
    cols = ((np.arange(size[1]) + 0.5) * pred.shape[1] / size[1]).astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(pred[np.ix_(rows, cols)]))


def choose_bases(resp: Tensor, bases: Sequence[int] | None, top: int, pred: np.ndarray | None = None) -> list[int]:
    """The given basis indices (checked against K), else ``top`` bases that show structure.

    ``resp`` is (h, w, K). With the prediction ``pred`` (H, W): up to ``top`` (class, basis)
    pairs whose mean responsibility inside the class exceeds the mean outside by the most, at
    least :data:`MIN_CONTRAST`, each class and each basis once, strongest first — the bases that
    mark a region. Fewer than ``top`` when fewer bases do: a trained model typically gives the
    objects a few bases and lets the others share the background, and those look flat. Without
    such pairs (no prediction, one class), the ``top`` bases of largest spatial variance.
    """
    k = resp.shape[-1]
    if bases:
        bad = [b for b in bases if not 0 <= b < k]
        if bad:
            raise UserError(f"--bases: index {bad[0]} out of range; the model has K={k} bases (0..{k - 1})")
        return list(bases)
    if top < 1:
        raise UserError(f"--top: must be >= 1, got {top}")
    top = min(top, k)
    flat = resp.reshape(-1, k).float()
    chosen: list[int] = []
    if pred is not None:
        classes = classes_at(pred, tuple(resp.shape[:2])).reshape(-1)
        masks = [classes == c for c in torch.unique(classes)]
        masks = [m for m in masks if not bool(m.all())]
        if masks:  # contrast[c, k]: mean responsibility of basis k inside class c minus outside
            contrast = torch.stack([flat[m].mean(0) - flat[~m].mean(0) for m in masks])
            while len(chosen) < top:
                best = int(contrast.argmax())
                c, b = divmod(best, k)
                if not contrast[c, b] >= MIN_CONTRAST:
                    break
                chosen.append(b)
                contrast[c, :] = -math.inf
                contrast[:, b] = -math.inf
    if chosen:
        return chosen
    return [int(b) for b in flat.var(dim=0).argsort(descending=True, stable=True)][:top]


def layout(n_bases: int, has_label: bool) -> tuple[int, int]:
    """``(columns, rows)``: a top row of input, [ground truth,] prediction and legend, then the
    basis maps, at most :data:`MAX_COLS` per row."""
    top = 4 if has_label else 3
    cols = max(top, min(n_bases, MAX_COLS))
    return cols, 1 + math.ceil(n_bases / cols)


def figure_size(n_bases: int, has_label: bool) -> tuple[float, float]:
    """The figure size in inches (one :data:`PANEL` per cell)."""
    cols, rows = layout(n_bases, has_label)
    return cols * PANEL, rows * PANEL


def upsample_map(resp_k: Tensor, size: tuple[int, int], input_size: tuple[int, int] | None = None) -> np.ndarray:
    """An (h, w) map resized bilinearly to ``input_size`` (the model's, padded, input), then
    cropped to the image's ``size`` (H, W)."""
    full = input_size or size
    up = F.interpolate(resp_k[None, None], size=full, mode="bilinear", align_corners=False)[0, 0]
    return up[: size[0], : size[1]].numpy()


def bases_figure(sample_image: np.ndarray, label: np.ndarray | None, rec: Recorded, chosen: Sequence[int],
                 images: ImageSet, title: str) -> Figure:
    """The figure for one image (see the module docstring)."""
    has_label = label is not None
    cols, rows = layout(len(chosen), has_label)
    fig = new_figure(*figure_size(len(chosen), has_label))
    grid = fig.add_gridspec(rows, cols)
    palette, names = images.palette, images.class_names
    top = [fig.add_subplot(grid[0, i]) for i in range(cols)]
    show_image(top[0], sample_image, "input")
    i = 1
    if has_label:
        show_image(top[1], label_colours(label, palette), "ground truth", interpolation="nearest")
        i = 2
    show_image(top[i], label_colours(rec.pred, palette), "prediction", interpolation="nearest")
    classes = present_classes(label, rec.pred, num_classes=len(names))
    ignored = has_label and bool((label == images.ignore_index).any())
    class_legend(top[i + 1], classes, names, palette, ignore=ignored)
    for ax in top[i + 2 :]:
        ax.set_axis_off()

    k = rec.resp.shape[-1]
    h, w = rec.resp.shape[:2]
    size = sample_image.shape[:2]
    # One colour scale for all maps, from 0 to the largest shown value: maps compare directly,
    # and a nearly uniform map (z ≈ 1/K everywhere) looks flat instead of being stretched.
    vmax = max(float(rec.resp[..., list(chosen)].max()), 1e-6)
    map_axes, artist = [], None
    for j, basis in enumerate(chosen):
        ax = fig.add_subplot(grid[1 + j // cols, j % cols])
        artist = show_image(ax, upsample_map(rec.resp[..., basis], size, rec.input_size), f"basis {basis}",
                            cmap=RESP_CMAP, vmin=0.0, vmax=vmax, interpolation="nearest")
        map_axes.append(ax)
    for j in range(len(chosen), (rows - 1) * cols):
        fig.add_subplot(grid[1 + j // cols, j % cols]).set_axis_off()
    bar = fig.colorbar(artist, ax=map_axes, shrink=0.9, aspect=25)
    bar.set_label("responsibility z[:, k]")
    suptitle(fig, f"{title}\nEMA responsibilities z[:, k] of the last E step (K={k}, feature map {h}×{w})")
    return fig


def draw_bases(
    path: str | os.PathLike | None = None,
    images: Sequence[str | os.PathLike] | None = None,
    bases: Sequence[int] | None = None,
    top: int | None = None,
    out: str | os.PathLike | None = None,
    split: str | None = None,
    count: int = 4,
    overrides: Sequence[str] = (),
    device: str = "auto",
) -> list[Path]:
    """Write ``bases_<image>.png`` per image; return the paths."""
    if bases and top is not None:
        raise UserError("--bases and --top exclude each other: name the bases or let --top pick them")
    how = "chosen bases" if bases else "the bases that best mark a predicted class each"

    def figure(context: PerImage, sample: Sample) -> Figure:
        rec = context.record(sample.image)
        chosen = choose_bases(rec.resp, bases, top if top is not None else DEFAULT_TOP, rec.pred)
        return bases_figure(sample.image, sample.label, rec, chosen, context.images,
                            f"{context.title(sample)} ({how})")

    return draw_per_image("bases", figure, path, images, out, split, count, overrides, device, ema_command="bases")
