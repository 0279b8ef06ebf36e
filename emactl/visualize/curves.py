"""``visualize curves``: training curves from a run's ``metrics.jsonl``.

Panels: the training loss (the logged values and, with enough points, an exponential moving
average that shows the trend through the batch noise), the learning rate, and — when the run
validated during training — val mIoU with its best point marked (with only the final
evaluation, its value goes into the title instead).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..engine.evaluate import run_dir_of
from ..engine.rundir import METRICS_FILE, read_metrics
from ..errors import UserError
from .common import new_figure, output_dir, save, suptitle
from .samples import resolve_run

PANEL_W, PANEL_H = 4.5, 3.6
SMOOTH_MIN_POINTS = 20


def figure_size(has_val: bool) -> tuple[float, float]:
    return (3 if has_val else 2) * PANEL_W, PANEL_H


def series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(iterations, values)`` of ``key`` in the ``kind`` records, sorted by iteration.

    A resumed run may log an iteration twice; the later record wins.
    """
    points: dict[int, float] = {}
    for r in records:
        if r.get("kind") == kind and isinstance(r.get(key), (int, float)) and isinstance(r.get("iter"), (int, float)):
            points[int(r["iter"])] = float(r[key])
    its = np.array(sorted(points), dtype=np.int64)
    return its, np.array([points[i] for i in its], dtype=np.float64)


def smooth(values: np.ndarray, span: int) -> np.ndarray:
    """Bias-corrected exponential moving average over about ``span`` points."""
    alpha = 2.0 / (span + 1.0)
    out = np.empty_like(values)
    acc, weight = 0.0, 0.0
    for i, v in enumerate(values):
        acc = (1 - alpha) * acc + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = acc / weight
    return out


def curves_figure(records: list[dict[str, Any]], title: str) -> Figure:
    its, loss = series(records, "train", "loss")
    lr_its, lr = series(records, "train", "lr")
    val_its, miou = series(records, "val", "mIoU")
    # One point is the final evaluation of a recipe that never validates mid-run (val_every: 0):
    # a panel with one dot on a ±50-iteration axis says nothing, the title gives the number.
    has_val = len(val_its) > 1
    if len(val_its) == 1:
        title += (f"\nval mIoU {miou[0]:.2f} % at the end (iteration {val_its[0]}); no validation during training "
                  "(train.val_every: 0), so no validation panel")
    fig = new_figure(*figure_size(has_val))
    axes = fig.subplots(1, 3 if has_val else 2)

    ax = axes[0]
    if len(its) >= SMOOTH_MIN_POINTS:
        span = max(5, len(its) // 20)
        ax.plot(its, loss, color="tab:blue", alpha=0.3, lw=1, label="logged")
        ax.plot(its, smooth(loss, span), color="tab:blue", lw=2, label=f"moving average (~{span} points)")
        ax.legend(fontsize="small")
    else:
        ax.plot(its, loss, "o-", color="tab:blue", label="logged")
    ax.set_title("training loss", fontsize="medium")
    ax.set_ylabel("loss")

    ax = axes[1]
    ax.plot(lr_its, lr, color="tab:orange", lw=2)
    ax.set_title("learning rate", fontsize="medium")
    ax.set_ylabel("lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

    if has_val:
        ax = axes[2]
        ax.plot(val_its, miou, "o-", color="tab:green", lw=2, label="val mIoU")
        best = int(np.argmax(miou))
        ax.plot(val_its[best], miou[best], "*", color="tab:red", ms=14,
                label=f"best {miou[best]:.1f} at iter {val_its[best]}")
        ax.set_title("validation mIoU", fontsize="medium")
        ax.set_ylabel("mIoU (%)")
        ax.legend(fontsize="small", loc="lower right")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
    suptitle(fig, title)
    return fig


def draw_curves(path: str | os.PathLike | None = None, out: str | os.PathLike | None = None) -> list[Path]:
    """Write ``curves.png``; return its path."""
    path = resolve_run(path)
    run_dir = run_dir_of(path)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise UserError(f"{run_dir}: no {METRICS_FILE}; train with `emactl train` first")
    records = read_metrics(run_dir)
    if len(series(records, "train", "loss")[0]) == 0:
        raise UserError(f"{metrics}: holds no training records (kind=train with iter and loss); nothing to draw")
    title = f"training curves — {run_dir.resolve().name}"
    return [save(curves_figure(records, title), output_dir(out, run_dir) / "curves.png")]
