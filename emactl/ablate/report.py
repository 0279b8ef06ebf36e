"""The sweep's tables and figures, rebuilt from the cells' run directories.

* ``results.{csv,md}``: the tidy table, one row per (cell, eval T, seed): every axis column,
  ``seed``, the metrics (percent), ``train_time_s`` (optimiser steps only, summed over resumes),
  ``eval_time_s``, ``params`` and the ``cell`` directory; an ``error`` column when a cell failed.
* ``summary.{csv,md}``: one row per axis combination over seeds: ``mIoU_mean``, ``mIoU_std``
  (sample standard deviation; empty with one seed), ``n``, and the mean aAcc and mAcc.
* Pivots of the mean mIoU (the Markdown shows ``mean ± std`` when there are several seeds):
  ``pivot_iters`` (train T rows × eval T columns), ``pivot_update_norm`` (bases update rows ×
  normalisation columns), and ``pivot_<axis>`` for every other swept axis. Axes that vary
  besides a pivot's own two are added as extra row keys, never averaged away.
* ``figures/ablation_eval_iters.png``: mIoU against eval T, one line per train T (one line when
  ``--iters`` ties them); ``figures/ablation_<axis>.png``: a bar chart per value of every other
  swept axis. ``emactl visualize ablation`` draws the same files (:mod:`emactl.visualize.ablation`).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..errors import UserError
from ..io import write_text
from ..tables import markdown, print_table, save_table
from .launcher import CELLS_DIR, ERROR_FILE, TRAIN_FILE, eval_file, read_json
from .sweep import Sweep

METRICS = ("mIoU", "aAcc", "mAcc", "fwIoU")
RESULT_COLUMNS = METRICS + ("train_time_s", "eval_time_s", "params")


def file_stem(axis: str) -> str:
    """A file-name-safe form of an axis name: ``train.lr`` → ``train.lr``, ``a/b`` → ``a_b``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", axis).strip("._") or "axis"


def _for_screen(df: pd.DataFrame) -> pd.DataFrame:
    """Missing values of nullable columns as NaN, which the screen tables show as ``–``."""
    out = df.copy()
    for column in out.columns:
        if str(out[column].dtype) == "Int64":
            out[column] = out[column].astype("float64") if out[column].isna().any() else out[column].astype("int64")
    return out


def collect(sweep: Sweep) -> pd.DataFrame:
    """The tidy results table from the cell directories (cells not run yet are left out)."""
    records: list[dict[str, Any]] = []
    for cell in sweep.cells:
        cell_dir = sweep.dir / CELLS_DIR / cell.name
        trained = read_json(cell_dir / TRAIN_FILE) or {}
        error = (read_json(cell_dir / ERROR_FILE) or {}).get("error")
        for t in cell.eval_iters:
            ev = read_json(eval_file(cell_dir, t))
            if ev is None and error is None:
                continue
            row: dict[str, Any] = {c: cell.values.get(c) for c in sweep.columns}
            if "eval_iters" in sweep.columns:
                row["eval_iters"] = t
            row["seed"] = cell.values["seed"]
            metrics = (ev or {}).get("metrics", {})
            for m in METRICS:
                row[m] = metrics.get(m)
            row["train_time_s"] = trained.get("train_time_s")
            row["eval_time_s"] = (ev or {}).get("eval_time_s")
            row["params"] = (ev or {}).get("params")
            row["cell"] = cell.name
            if ev is None:
                row["error"] = error
            records.append(row)
    columns = list(sweep.columns) + ["seed", *RESULT_COLUMNS, "cell"]
    if any("error" in r for r in records):
        columns.append("error")
    return _frame(records, columns)


def _frame(records: list[dict[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    """A DataFrame whose column types come from the Python values, not from pandas' guess.

    Integer columns with gaps (an axis that does not apply to some cells) become nullable
    integers, so the CSV says ``3`` rather than ``3.0``; metrics become floats.
    """
    data = {}
    for column in columns:
        values = [r.get(column) for r in records]
        present = [v for v in values if _key(v) is not None]
        if column in METRICS or column in ("train_time_s", "eval_time_s"):
            data[column] = pd.Series([math.nan if _key(v) is None else float(v) for v in values], dtype="float64")
        elif present and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in present):
            data[column] = pd.Series([None if _key(v) is None else int(v) for v in values], dtype="Int64")
        else:
            data[column] = pd.Series(values, dtype=object).infer_objects()
    return pd.DataFrame(data, columns=list(columns))


def _key(value: Any) -> Any:
    """A hashable group key in which every kind of missing value is None."""
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) else value


def _label(value: Any) -> str:
    if _key(value) is None:
        return "–"
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def summarize(df: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """Mean and standard deviation over seeds of every axis combination (failed cells left out)."""
    ok = df[df["mIoU"].notna()] if "mIoU" in df else df
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(ok[list(axes)].itertuples(index=False, name=None)):
        groups.setdefault(tuple(_key(v) for v in row), []).append(i)
    records = []
    for key, rows in groups.items():
        part = ok.iloc[rows]
        miou = part["mIoU"].to_numpy(dtype=np.float64)
        records.append({
            **dict(zip(axes, key)),
            "mIoU_mean": float(miou.mean()),
            "mIoU_std": float(miou.std(ddof=1)) if len(miou) > 1 else math.nan,
            "n": len(miou),
            "aAcc_mean": float(part["aAcc"].mean()),
            "mAcc_mean": float(part["mAcc"].mean()),
        })
    return _frame(records, [*axes, "mIoU_mean", "mIoU_std", "n", "aAcc_mean", "mAcc_mean"])


def varying(summary: pd.DataFrame, axes: Sequence[str]) -> list[str]:
    """The axis columns that take more than one value."""
    return [a for a in axes if len({_key(v) for v in summary[a]}) > 1]


def pivot(summary: pd.DataFrame, rows: Sequence[str], cols: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """mIoU means with ``rows`` as row keys and one column per combination of ``cols``.

    Returns the numeric table (for the CSV) and a text one with ``mean ± std`` where a cell
    averages several seeds (for the Markdown and the screen). Rows and columns keep the order
    in which the values were given on the command line.
    """
    rows, cols = list(rows), list(cols)
    row_keys: list[tuple] = []
    col_keys: list[tuple] = []
    cells: dict[tuple[tuple, tuple], tuple[float, float, int]] = {}
    for rec in summary.to_dict("records"):
        rk = tuple(_key(rec[r]) for r in rows)
        ck = tuple(_key(rec[c]) for c in cols)
        if rk not in row_keys:
            row_keys.append(rk)
        if ck not in col_keys:
            col_keys.append(ck)
        cells[(rk, ck)] = (rec["mIoU_mean"], rec["mIoU_std"], int(rec["n"]))

    def col_name(ck: tuple) -> str:
        if not cols:
            return "mIoU"
        return ", ".join(f"{c}={_label(v)}" for c, v in zip(cols, ck))

    numeric, text = [], []
    for rk in row_keys:
        num_row: dict[str, Any] = dict(zip(rows, rk))
        text_row: dict[str, Any] = {r: _label(v) for r, v in zip(rows, rk)}
        for ck in col_keys:
            found = cells.get((rk, ck))
            num_row[col_name(ck)] = found[0] if found else math.nan
            if found is None:
                text_row[col_name(ck)] = "–"
            elif found[2] > 1:
                text_row[col_name(ck)] = f"{found[0]:.2f} ± {found[1]:.2f}"
            else:
                text_row[col_name(ck)] = f"{found[0]:.2f}"
        numeric.append(num_row)
        text.append(text_row)
    return _frame(numeric, list(numeric[0]) if numeric else rows), pd.DataFrame(text)


def pivots(sweep: Sweep, summary: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, pd.DataFrame, str]]:
    """The pivot tables of this sweep: ``{stem: (numeric, text, title)}``."""
    axes = list(sweep.columns)
    moving = varying(summary, axes)
    swept = list(sweep.axes.values)
    out: dict[str, tuple[pd.DataFrame, pd.DataFrame, str]] = {}
    covered: set[str] = set()
    if "eval_iters" in axes:
        part = summary[summary["eval_iters"].notna() & summary["train_iters"].notna()]
        if len(part):
            rest = [a for a in moving if a not in ("train_iters", "eval_iters")]
            num, text = pivot(part, ["train_iters", *rest], ["eval_iters"])
            out["pivot_iters"] = (num, text, "mIoU: train T (rows) × eval T (columns)")
            covered |= {"train_iters", "eval_iters"}
    if "bases_update" in swept and "norm" in swept:
        rest = [a for a in moving if a not in ("bases_update", "norm")]
        num, text = pivot(summary, ["bases_update", *rest], ["norm"])
        out["pivot_update_norm"] = (num, text, "mIoU: bases update (rows) × normalisation (columns)")
        covered |= {"bases_update", "norm"}
    for axis in swept:
        if axis in covered or axis == "eval_iters":
            continue
        rest = [a for a in moving if a != axis]
        num, text = pivot(summary, [axis], rest)
        out[f"pivot_{file_stem(axis)}"] = (num, text, f"mIoU per {axis}")
    return out


def _save_pair(numeric: pd.DataFrame, text: pd.DataFrame, stem: Path) -> list[Path]:
    return [
        write_text(stem.with_suffix(".csv"), numeric.to_csv(index=False)),
        write_text(stem.with_suffix(".md"), markdown(text)),
    ]


def plots(sweep: Sweep) -> list[Path]:
    """The sweep's figures, drawn as ``emactl visualize ablation SWEEP`` draws them, into
    ``<sweep>/figures/``: one figure, one place."""
    from ..visualize.ablation import draw_ablation  # matplotlib: only when there is something to draw

    try:
        return draw_ablation(sweep.dir)
    except UserError:  # nothing to compare (one value per axis, or no finished cell)
        return []


def short_headers(text: pd.DataFrame, title: str) -> tuple[pd.DataFrame, str]:
    """``eval_iters=1 … eval_iters=8`` as ``1 … 8`` when every value column names the same
    single axis, so that a pivot fits the terminal; the title names that axis unless it says
    what the columns are already."""
    values = [c for c in text.columns if "=" in str(c)]
    axes = {str(c).split("=", 1)[0] for c in values}
    if not values or len(axes) != 1 or any("," in str(c) for c in values):
        return text, title
    axis = axes.pop()
    renamed = text.rename(columns={c: str(c).split("=", 1)[1] for c in values})
    return renamed, title if "(columns)" in title else f"{title} (columns: {axis})"


def write_report(sweep: Sweep, show: bool = True) -> tuple[pd.DataFrame, list[Path]]:
    """Rebuild and write every table and figure of the sweep; print the tables.

    Returns the tidy results and the paths written.
    """
    df = collect(sweep)
    paths = save_table(df, sweep.dir / "results")
    if df.empty or df["mIoU"].notna().sum() == 0:
        return df, paths
    axes = list(sweep.columns)
    summary = summarize(df, axes)
    paths += save_table(summary, sweep.dir / "summary")
    tables = pivots(sweep, summary)
    for stem, (numeric, text, _title) in tables.items():
        paths += _save_pair(numeric, text, sweep.dir / stem)
    paths += plots(sweep)
    if show:
        shown = [c for c in df.columns if c not in ("fwIoU", "cell", "error")]
        print_table(_for_screen(df[shown]), title=f"{sweep.dir.name}: results")
        if int(summary["n"].max()) > 1:
            print_table(_for_screen(summary), title="mean ± std over seeds")
        for _stem, (_numeric, text, title) in tables.items():
            shown_text, shown_title = short_headers(text, title)
            print_table(shown_text, title=shown_title)
    return df, paths
