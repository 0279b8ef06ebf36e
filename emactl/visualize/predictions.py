"""``visualize predictions``: prediction and ground truth overlaid on the image.

For each image: the input, the ground truth overlay (when there is one), the prediction
overlay, the errors (wrong pixels in red; ignored pixels do not count) and a legend of the
classes present in either map. The prediction uses the run's eval settings (whole/slide,
scales, flip), as ``emactl eval`` and ``emactl predict`` do.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from ..engine.evaluate import resolve_eval_config
from ..predict import predict_label
from ..data import Sample
from .common import PANEL, class_legend, error_map, new_figure, overlay, present_classes, show_image, suptitle
from .samples import ImageSet, PerImage, draw_per_image


def figure_size(has_label: bool) -> tuple[float, float]:
    """Panels: input, [ground truth,] prediction, [errors,] legend."""
    return (5 if has_label else 3) * PANEL, PANEL + 0.5


def predictions_figure(image: np.ndarray, label: np.ndarray | None, pred: np.ndarray, images: ImageSet,
                       title: str) -> Figure:
    """The figure for one image (see the module docstring)."""
    has_label = label is not None
    fig = new_figure(*figure_size(has_label))
    axes = fig.subplots(1, 5 if has_label else 3)
    palette, ignore = images.palette, images.ignore_index
    show_image(axes[0], image, "input")
    i = 1
    if has_label:
        show_image(axes[1], overlay(image, label, palette, ignore), "ground truth")
        i = 2
    show_image(axes[i], overlay(image, pred, palette, ignore), "prediction")
    if has_label:
        errors, rate = error_map(image, pred, label, ignore)
        show_image(axes[3], errors, f"errors in red ({rate:.1f}% of labelled px)")
        i = 3
    classes = present_classes(label, pred, num_classes=len(images.class_names))
    ignored = bool(has_label and (label == ignore).any())
    class_legend(axes[i + 1], classes, images.class_names, palette, ignore=ignored, title="classes present")
    suptitle(fig, title)
    return fig


def draw_predictions(
    path: str | os.PathLike | None = None,
    images: Sequence[str | os.PathLike] | None = None,
    out: str | os.PathLike | None = None,
    split: str | None = None,
    count: int = 4,
    overrides: Sequence[str] = (),
    device: str = "auto",
) -> list[Path]:
    """Write ``predictions_<image>.png`` per image; return the paths."""

    def figure(context: PerImage, sample: Sample) -> Figure:
        recipe = context.run.recipe
        pred = predict_label(context.run.model, sample.image, recipe, resolve_eval_config(recipe), context.device)
        return predictions_figure(sample.image, sample.label, pred, context.images, context.title(sample))

    return draw_per_image("predictions", figure, path, images, out, split, count, overrides, device)
