"""``visualize confusion``: the row-normalised confusion matrix of an evaluation as a heatmap.

Reads ``<run>/eval/confusion.csv`` (the training's evaluation) or
``<run>/eval/<setting>/confusion.csv`` (one per ``emactl eval`` setting): class names as header
and index, rows = ground truth, columns = prediction. Each row is divided by its total, so a cell
is the fraction of that class's pixels predicted as the column's class and the diagonal is the
per-class accuracy. Classes without ground-truth pixels have an empty (grey) row.
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..engine.evaluate import EVAL_DIR, describe_setting, run_dir_of
from ..errors import UserError
from .common import HEAT_CMAP, new_figure, output_dir, save, wrap_title
from .samples import resolve_run

CONFUSION_FILE = "confusion.csv"
ANNOTATE_MAX = 25  # write the value into each cell up to this many classes


def figure_size(num_classes: int) -> tuple[float, float]:
    """Inches: a square matrix growing with the class count, plus room for the colorbar."""
    side = min(max(6.0, 0.4 * num_classes + 3.0), 36.0)
    return side + 1.5, side


def find_confusion(path: str | os.PathLike | None, setting: str | None = None) -> tuple[Path, Path]:
    """``(confusion.csv, run_dir)`` for a run directory, checkpoint or the CSV itself.

    A run holds the training's own evaluation in ``eval/`` and one folder per ``emactl eval``
    setting in ``eval/<setting>/``; ``setting`` picks one of those.
    """
    path = resolve_run(path)
    if path.is_file() and path.suffix == ".csv":
        parents = [path.parent, path.parent.parent]
        run_dir = next((p.parent for p in parents if p.name == EVAL_DIR), path.parent)
        return path, run_dir
    run_dir = run_dir_of(path)
    evals = run_dir / EVAL_DIR
    known = sorted(p.parent.name for p in evals.glob(f"*/{CONFUSION_FILE}"))
    if setting is None and not (evals / CONFUSION_FILE).is_file() and len(known) == 1:
        setting = known[0]  # no training evaluation, one `emactl eval`: that one
    csv = (evals / setting if setting else evals) / CONFUSION_FILE
    if not csv.is_file():
        listed = f"evaluations here: --eval {', '.join(known)}" if known else f"run `emactl eval {run_dir}` first"
        raise UserError(f"{'--eval ' + setting if setting else run_dir}: no {csv}; {listed}")
    return csv, run_dir


def read_confusion(csv: Path) -> pd.DataFrame:
    """The confusion matrix as a square DataFrame of counts (index = ground truth)."""
    try:
        df = pd.read_csv(csv, index_col=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{csv}: cannot read confusion matrix ({str(e).strip().splitlines()[0]})") from None
    if df.empty:
        raise UserError(f"{csv}: the confusion matrix is empty; nothing to draw")
    if df.shape[0] != df.shape[1] or [str(c) for c in df.columns] != [str(i) for i in df.index]:
        raise UserError(f"{csv}: expected a square matrix with the same class names as header and index")
    try:
        values = df.to_numpy(dtype=np.float64)
    except ValueError:
        raise UserError(f"{csv}: the confusion matrix holds non-numeric cells") from None
    return pd.DataFrame(values, index=[str(i) for i in df.index], columns=[str(c) for c in df.columns])


def _summary_note(csv: Path) -> str:
    """``mIoU 71.20 %, whole image, scales 0.75/1/1.25 + flip, T=3, iteration 30000`` from the
    ``summary.csv`` beside the confusion matrix, when it is there."""
    try:
        row = pd.read_csv(csv.parent / "summary.csv").iloc[0]
    except (OSError, IndexError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return ""
    parts = []
    if "mIoU" in row and pd.notna(row["mIoU"]):
        parts.append(f"mIoU {float(row['mIoU']):.2f} %")
    parts.append(describe_setting(row.to_dict()))
    return ", ".join(parts)


def confusion_figure(counts: pd.DataFrame, title: str) -> Figure:
    """The heatmap (see the module docstring)."""
    k = counts.shape[0]
    values = counts.to_numpy()
    totals = values.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(totals[:, None] > 0, values / totals[:, None], np.nan)
    fig = new_figure(*figure_size(k))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps[HEAT_CMAP].with_extremes(bad="0.85")
    artist = ax.imshow(np.ma.masked_invalid(norm), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    bar = fig.colorbar(artist, ax=ax, shrink=0.8)
    bar.set_label("fraction of the ground-truth class's pixels")
    size = "medium" if k <= 12 else "small" if k <= 30 else "xx-small"
    ax.set_xticks(range(k), counts.columns, rotation=90, fontsize=size)
    ylabels = [f"{name} ({_pixels(t)})" if t > 0 else f"{name} (no pixels)" for name, t in zip(counts.index, totals)]
    ax.set_yticks(range(k), ylabels, fontsize=size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class (pixels)")
    if k <= ANNOTATE_MAX:
        for r in range(k):
            for c in range(k):
                if np.isfinite(norm[r, c]) and values[r, c] > 0:
                    text = f"{norm[r, c]:.2f}" if norm[r, c] >= 0.005 else "<.01"
                    ax.text(c, r, text, ha="center", va="center", fontsize="x-small",
                            color="white" if norm[r, c] > 0.6 else "black")
    ax.set_title(wrap_title(title, figure_size(k)[0] - 1.5), fontsize="medium")
    return fig


def _pixels(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit} px"
    return f"{int(n)} px"


def draw_confusion(path: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                   setting: str | None = None) -> list[Path]:
    """Write ``confusion.png`` (``confusion_<setting>.png`` for an ``emactl eval`` setting); return its path."""
    csv, run_dir = find_confusion(path, setting)
    counts = read_confusion(csv)
    note = _summary_note(csv)
    title = f"confusion matrix, rows normalised — {run_dir.resolve().name}" + (f" ({note})" if note else "")
    name = "confusion.png" if csv.parent.name == EVAL_DIR or csv.parent == run_dir else f"confusion_{csv.parent.name}.png"
    return [save(confusion_figure(counts, title), output_dir(out, run_dir) / name)]
