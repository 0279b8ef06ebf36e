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
from .common import (
    PANEL,
    class_legend,
    error_map,
    new_figure,
    output_dir,
    overlay,
    present_classes,
    save,
    show_image,
    suptitle,
    unique_names,
)
from .samples import ImageSet, load_images, load_run


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
    run, dev, run_dir = load_run(path, overrides, device)
    cfg = resolve_eval_config(run.recipe)
    image_set = load_images(run.recipe, images, split, count)
    out_dir = output_dir(out, run_dir)
    written = []
    for sample, name in zip(image_set.samples, unique_names(s.name for s in image_set.samples)):
        pred = predict_label(run.model, sample.image, run.recipe, cfg, dev)
        title = f"{sample.name} — {run.recipe.name}, iteration {run.iteration}"
        fig = predictions_figure(sample.image, sample.label, pred, image_set, title)
        written.append(save(fig, out_dir / f"predictions_{name}.png"))
    return written
