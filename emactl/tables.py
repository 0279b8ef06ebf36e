"""Result tables: pandas DataFrames written as CSV and Markdown (atomically), shown with rich.

Numbers keep one number of decimals per column (``84.70`` beside ``84.13``, never ``84.7``),
metrics in percent say so in their header (``mIoU %``), and a table wider than the terminal is
split into column groups that repeat its leading label columns (at most two), so that no header
or name is cut.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
from rich.console import Console
from rich.table import Table

from .io import write_text

console = Console()

# Columns that hold percentages (segmentation metrics), with or without a _mean/_std suffix.
PERCENT = re.compile(r"^(aAcc|mAcc|mIoU|fwIoU|IoU|Acc)(_mean|_std)?$")
MAX_DECIMALS = 4


def is_percent(column: object) -> bool:
    return bool(PERCENT.match(str(column)))


SCIENTIFIC = -1  # column_decimals' answer for a column of tiny values (errors, say): 1.23e-06


def column_decimals(values: Iterable[Any], column: object = "") -> int:
    """Decimals for a column of floats: 2 for percentages; 0 for whole numbers (a count with a
    missing value is a float column); :data:`SCIENTIFIC` when every value is below 1e-3, or
    when those decimals would show a nonzero value as zero (errors of 1e-6 beside 1e-1); else
    four significant digits of the largest."""
    if is_percent(column):
        return 2
    finite = [abs(float(v)) for v in values if isinstance(v, float) and math.isfinite(v)]
    top = max(finite, default=0.0)
    if top == 0.0:
        return 2
    if all(v == int(v) for v in finite):
        return 0
    if top < 1e-3:
        return SCIENTIFIC
    digits = math.floor(math.log10(top)) + 1
    decimals = max(0, min(MAX_DECIMALS, 4 - digits))
    if any(0 < v < 0.5 * 10.0 ** -decimals for v in finite):
        return SCIENTIFIC
    return decimals


def header(column: object) -> str:
    """The column name as shown: percentages get a ``%``."""
    return f"{column} %" if is_percent(column) else str(column)


def formatted(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` as text: floats with their column's decimals, missing values as ``–``."""
    out = {}
    for column in df.columns:
        values = list(df[column].astype(object))
        floats = [float(v) for v in values if isinstance(v, float)]
        decimals = column_decimals(floats, column) if floats else 0
        out[column] = [_fmt(v, decimals) for v in values]
    return pd.DataFrame(out, columns=list(df.columns))


def _fmt(v: object, decimals: int) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.2e}" if decimals == SCIENTIFIC else f"{v:.{decimals}f}"
    return str(v)


def markdown(df: pd.DataFrame) -> str:
    """GitHub Markdown of ``df`` as :func:`formatted` shows it, headers with units."""
    text = formatted(df)
    text.columns = [header(c) for c in df.columns]
    align = ["right" if pd.api.types.is_numeric_dtype(df[c]) else "left" for c in df.columns]
    return text.to_markdown(index=False, colalign=align, disable_numparse=True) + "\n"


def save_table(df: pd.DataFrame, stem: str | os.PathLike, json: bool = False) -> list[Path]:
    """Write ``df`` to ``stem.csv`` and ``stem.md`` (and ``stem.json``); return the paths."""
    stem = Path(stem)
    paths = [
        write_text(stem.with_suffix(".csv"), df.to_csv(index=False)),
        write_text(stem.with_suffix(".md"), markdown(df)),
    ]
    if json:
        paths.append(write_text(stem.with_suffix(".json"), df.to_json(orient="records", indent=2) + "\n"))
    return paths


def _table(text: pd.DataFrame, numeric: Sequence[bool], columns: Sequence[int], title: str | None,
           width: int | None = None) -> Table:
    """A rich table of ``columns``; given the console ``width``, column widths are set so that it
    fits without cutting a word (rich's own shrinking can crop the last column instead)."""
    widths = fit_widths(text, columns, width) if width is not None else None
    table = Table(title=title, show_lines=False)
    for n, i in enumerate(columns):
        name = header(text.columns[i])
        table.add_column(name, justify="right" if numeric[i] else "left",
                         min_width=_min_width([name, *text.iloc[:, i]]),
                         width=widths[n] if widths is not None else None)
    for row in text.itertuples(index=False):
        table.add_row(*(row[i] for i in columns))
    return table


def fit_widths(text: pd.DataFrame, columns: Sequence[int], width: int) -> list[int] | None:
    """Content widths that fit ``width``: None when the natural widths fit, else each column's
    longest word plus a share of the room left, columns that need little more served first."""
    cells = [[header(text.columns[i]), *text.iloc[:, i]] for i in columns]
    natural = [max(len(str(c)) for c in col) for col in cells]
    least = [_min_width(col) for col in cells]
    room = width - (3 * len(columns) + 1)
    if sum(natural) <= room:
        return None
    widths = list(least)
    spare = room - sum(least)
    wanting = sorted(range(len(columns)), key=lambda n: natural[n] - least[n])
    for k, n in enumerate(wanting):
        share = max(0, spare // (len(wanting) - k))
        extra = min(natural[n] - least[n], share)
        widths[n] += extra
        spare -= extra
    return widths


def _min_width(cells: Iterable[str]) -> int:
    """The narrowest a column can get without cutting a word (rich wraps at spaces only)."""
    return max((len(word) for cell in cells for word in str(cell).split()), default=1)


def column_groups(text: pd.DataFrame, width: int, keys: int = 1) -> list[list[int]]:
    """Column indices per printed table: all in one when they fit ``width``, else groups that
    each repeat the first ``keys`` columns (the row labels) and fit; a column too wide for any
    group stands alone with the labels."""
    need = [_min_width([header(c), *text[c]]) + 3 for c in text.columns]  # padding 2 + one border
    everything = list(range(len(text.columns)))
    keys = max(1, min(keys, len(everything) - 1))
    if sum(need) + 1 <= width or len(everything) <= keys + 1:
        return [everything]
    base = sum(need[:keys]) + 1
    groups: list[list[int]] = []
    current, used = list(range(keys)), base
    for i in everything[keys:]:
        if len(current) > keys and used + need[i] > width:
            groups.append(current)
            current, used = list(range(keys)), base
        current.append(i)
        used += need[i]
    groups.append(current)
    return groups


def print_table(df: pd.DataFrame, title: str | None = None, con: Console | None = None) -> None:
    """Print ``df`` as rich table(s) (index dropped) that fit the console's width; see the module doc."""
    con = con or console
    text = formatted(df)
    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]
    labels = next((i for i, n in enumerate(numeric) if n), len(numeric))  # the leading text columns
    groups = column_groups(text, con.width, keys=min(labels, 2))
    for n, group in enumerate(groups):
        part = title if n == 0 else (f"{title} (continued)" if title else "(continued)")
        con.print(_table(text, numeric, group, part, con.width))


def describe_paths(paths: Sequence[os.PathLike | str]) -> str:
    """Every path, briefly: ``runs/x/eval/: summary.{csv,md}, per_class.{csv,md}, confusion.csv``."""
    paths = [Path(p) for p in paths]
    if not paths:
        return "nothing"
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    stems: dict[str, list[str]] = {}
    for p in paths:
        rel = p.relative_to(root)
        stems.setdefault(str(rel.with_suffix("")), []).append(rel.suffix)
    parts = [stem + (suffixes[0] if len(suffixes) == 1 else "." + "{" + ",".join(s.lstrip(".") for s in suffixes) + "}")
             for stem, suffixes in stems.items()]
    return f"{root}/: " + ", ".join(parts)
