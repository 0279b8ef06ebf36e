"""``visualize ablation``: plots of an ablation sweep's tidy ``results.csv``.

The table has one row per cell: axis columns (``train_iters``, ``eval_iters``,
``bases_update``, ``norm``, ``grad``, ``head``, ``bases``, ``momentum``, any ``--set`` key),
``seed``, and metric columns. Axes are the columns that are neither metrics nor ``seed`` and
take more than one value.

* When ``eval_iters`` varies: mIoU against the number of EM iterations at test time, one
  line per training T (``train_iters``) — the paper's T ablation; one line through all the
  points when train T = eval T in every row (``ablate --iters``). The y axis spans at least
  2 mIoU points (about the demo's seed-to-seed spread) and ±2 std when there are seeds.
* Every other varying axis: a bar chart of mIoU per value.

A point or bar is the mean over the cells with that value, i.e. averaged over the other axes
when they vary too (the plot says so). With several seeds, the error bars are the standard
deviation over seeds: each seed's mean over those cells, then the spread of these means.
Rows with no mIoU (failed cells) are left out.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..errors import UserError
from .common import new_figure, output_dir, safe_name, save, wrap_title

RESULTS_FILE = "results.csv"
METRIC = "mIoU"
METRICS = ("mIoU", "aAcc", "mAcc", "fwIoU", "train_time_s", "eval_time_s", "params")
NOT_AXES = METRICS + ("seed", "run", "run_dir", "name", "status", "error", "cell", "checkpoint", "path")
MISSING = "default"  # label for cells where an axis column is empty
LINE_SIZE = (7.0, 4.5)


def bar_size(n_values: int) -> tuple[float, float]:
    return max(6.0, 0.9 * n_values + 2.0), 4.5


def find_results(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(results.csv, sweep_dir)`` for a sweep directory or the CSV itself."""
    path = Path(path)
    csv = path / RESULTS_FILE if path.is_dir() else path
    if not csv.is_file():
        where = f"{path}: no {RESULTS_FILE} in this folder" if path.is_dir() else f"{path}: no such sweep directory or CSV file"
        raise UserError(f"{where}; run `emactl ablate` first")
    return csv, csv.parent


def read_results(csv: Path) -> pd.DataFrame:
    """The table with its completed cells (a numeric mIoU); empty tables are a UserError."""
    try:
        df = pd.read_csv(csv)
    except pd.errors.EmptyDataError:
        raise UserError(f"{csv}: the results table is empty; nothing to draw") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{csv}: cannot read the results table ({str(e).strip().splitlines()[0]})") from None
    if METRIC not in df.columns:
        raise UserError(f"{csv}: no {METRIC} column; expected an `emactl ablate` results table")
    df[METRIC] = pd.to_numeric(df[METRIC], errors="coerce")
    df = df[df[METRIC].notna()].reset_index(drop=True)
    if df.empty:
        raise UserError(f"{csv}: the results table holds no completed cells (no {METRIC} values); nothing to draw")
    return df


def varying_axes(df: pd.DataFrame) -> list[str]:
    """Axis columns that take more than one value (empty cells count as a value)."""
    return [c for c in df.columns if c not in NOT_AXES and df[c].nunique(dropna=False) > 1]


def _ordered(values: pd.Series) -> list:
    """Distinct values: numbers ascending, anything else in order of appearance."""
    distinct = list(pd.unique(values))
    if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in distinct):
        finite = sorted(v for v in distinct if not pd.isna(v))
        return finite + [v for v in distinct if pd.isna(v)]
    return distinct


def _label(value: object) -> str:
    if pd.isna(value):
        return MISSING
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def aggregate(df: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Mean mIoU per combination of ``by``, with ``std`` and ``seeds`` over seeds.

    With one seed (or no ``seed`` column) ``std`` is NaN and no error bar is drawn.
    """
    by = list(by)
    seeded = "seed" in df.columns and df["seed"].nunique() > 1
    if seeded:
        per_seed = df.groupby(by + ["seed"], dropna=False, sort=False)[METRIC].mean().reset_index()
        grouped = per_seed.groupby(by, dropna=False, sort=False)[METRIC]
        out = grouped.agg(["mean", "std", "count"]).reset_index()
    else:
        out = df.groupby(by, dropna=False, sort=False)[METRIC].agg(["mean"]).reset_index()
        out["std"], out["count"] = np.nan, 1
    return out.rename(columns={"count": "seeds"})


def _averaged_note(axes: Sequence[str], shown: Sequence[str]) -> str:
    rest = [a for a in axes if a not in shown]
    return f"\naveraged over {', '.join(rest)}" if rest else ""


def _error_note(stats: pd.DataFrame) -> str:
    seeds = int(stats["seeds"].max())
    return f"mean ± std over {seeds} seeds" if seeds > 1 else "a single seed (no error bars)"


def eval_iters_figure(df: pd.DataFrame, axes: Sequence[str], title: str) -> Figure:
    """mIoU against eval T, one line per train T."""
    lines = "train_iters" in df.columns
    stats = aggregate(df, ["train_iters", "eval_iters"] if lines else ["eval_iters"])
    fig = new_figure(*LINE_SIZE)
    ax = fig.add_subplot()
    groups = _ordered(stats["train_iters"]) if lines else [None]
    for train_t in groups:
        part = stats if train_t is None else stats[stats["train_iters"].map(_label) == _label(train_t)]
        order = np.argsort(part["eval_iters"].to_numpy(dtype=np.float64))
        part = part.iloc[order]
        label = "mIoU" if train_t is None else f"train T = {_label(train_t)}"
        yerr = part["std"].to_numpy() if part["std"].notna().any() else None
        ax.errorbar(part["eval_iters"], part["mean"], yerr=yerr, marker="o", capsize=4, lw=2, label=label)
    spread = float(np.nanmax(stats["std"].to_numpy(dtype=np.float64))) if stats["std"].notna().any() else 0.0
    span = _min_span(ax, max(MIN_SPAN, 4.0 * spread))
    ax.set_xlabel("EM iterations at test time (eval T)")
    ax.set_ylabel(f"{METRIC} (%)")
    ax.set_xticks(sorted({float(v) for v in stats["eval_iters"].dropna()}))
    ax.xaxis.set_major_formatter(lambda v, _pos: _label(v))
    ax.grid(True, alpha=0.3)
    ax.legend(title="training" if lines else None, fontsize="small")
    text = (f"{title}: {METRIC} vs eval T\n{_error_note(stats)}; y axis spans ≥ {span:g} points"
            + _averaged_note(axes, ["train_iters", "eval_iters"]))
    ax.set_title(wrap_title(text, LINE_SIZE[0]), fontsize="medium")
    return fig


# mIoU points the y axis spans at least: the seed-to-seed spread of the shapes demo is about
# ±0.8, so differences of hundredths must not look like a trend; with several seeds, ±2 std.
MIN_SPAN = 2.0


def _min_span(ax: Axes, span: float) -> float:
    """Widen the y axis to at least ``span`` around the data; return the span it now has."""
    lo, hi = ax.get_ylim()
    if hi - lo < span:
        mid = (lo + hi) / 2
        ax.set_ylim(mid - span / 2, mid + span / 2)
        return span
    return round(hi - lo, 2)


def _bar_limits(ax: Axes, means: np.ndarray, stds: np.ndarray) -> bool:
    """Zoom the y axis onto the bars so small differences show; True when it does not start at 0."""
    spread = np.nan_to_num(stds)
    lo, hi = float(np.min(means - spread)), float(np.max(means + spread))
    pad = max(0.5, 0.25 * (hi - lo))
    bottom = max(0.0, lo - 3 * pad)
    ax.set_ylim(bottom, hi + pad)
    return bottom > 0


def axis_figure(df: pd.DataFrame, axis: str, axes: Sequence[str], title: str) -> Figure:
    """A bar chart of mIoU per value of ``axis``."""
    stats = aggregate(df, [axis])
    order = _ordered(stats[axis])
    stats = stats.set_index(stats[axis].map(_label)).loc[[_label(v) for v in order]]
    fig = new_figure(*bar_size(len(stats)))
    ax = fig.add_subplot()
    means, stds = stats["mean"].to_numpy(), stats["std"].to_numpy()
    x = np.arange(len(stats))
    ax.bar(x, means, yerr=None if np.isnan(stds).all() else stds, capsize=5, color="tab:blue", alpha=0.85)
    for xi, m, s in zip(x, means, stds):
        ax.annotate(f"{m:.2f}" + ("" if np.isnan(s) else f"\n±{s:.2f}"), (xi, m + (0 if np.isnan(s) else s)),
                    xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize="small")
    zoomed = _bar_limits(ax, means, stds)
    ax.set_xticks(x, list(stats.index))
    ax.set_xlabel(axis)
    ax.set_ylabel(f"{METRIC} (%)" + (" — axis does not start at 0" if zoomed else ""))
    ax.grid(True, axis="y", alpha=0.3)
    text = f"{title}: {METRIC} per {axis}\n{_error_note(stats)}" + _averaged_note(axes, [axis])
    ax.set_title(wrap_title(text, bar_size(len(stats))[0]), fontsize="medium")
    return fig


def diagonal(df: pd.DataFrame) -> bool:
    """True for an ``ablate --iters`` sweep: train T = eval T in every row."""
    if "train_iters" not in df.columns or "eval_iters" not in df.columns:
        return False
    train_t = pd.to_numeric(df["train_iters"], errors="coerce")
    eval_t = pd.to_numeric(df["eval_iters"], errors="coerce")
    return bool(train_t.notna().all() and (train_t == eval_t).all())


def draw_ablation(path: str | os.PathLike, out: str | os.PathLike | None = None) -> list[Path]:
    """Write ``ablation_eval_iters.png`` (when eval T varies) and ``ablation_<axis>.png``.

    ``emactl ablate`` draws its figures with this same function into ``<sweep>/figures/``.
    """
    csv, sweep_dir = find_results(path)
    df = read_results(csv)
    axes = varying_axes(df)
    if not axes:
        raise UserError(f"{csv}: no axis column takes more than one value; nothing to compare")
    out_dir = output_dir(out, sweep_dir)
    title = sweep_dir.resolve().name
    written = []
    bar_axes = list(axes)
    if "eval_iters" in axes:
        if diagonal(df):  # one line through T = 1, 3, 5 rather than one dot per training T
            line = eval_iters_figure(df.drop(columns=["train_iters"]), [a for a in axes if a != "train_iters"],
                                     f"{title} (train T = eval T)")
        else:
            line = eval_iters_figure(df, axes, title)
        written.append(save(line, out_dir / "ablation_eval_iters.png"))
        bar_axes = [a for a in axes if a not in ("train_iters", "eval_iters")]
    for axis in bar_axes:
        written.append(save(axis_figure(df, axis, axes, title), out_dir / f"ablation_{safe_name(axis)}.png"))
    return written
