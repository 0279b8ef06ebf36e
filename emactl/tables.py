"""Result tables: pandas DataFrames written as CSV and Markdown (atomically), shown with rich."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from .io import write_text

console = Console()


def save_table(df: pd.DataFrame, stem: str | os.PathLike, json: bool = False) -> list[Path]:
    """Write ``df`` to ``stem.csv`` and ``stem.md`` (and ``stem.json``); return the paths."""
    stem = Path(stem)
    paths = [
        write_text(stem.with_suffix(".csv"), df.to_csv(index=False)),
        write_text(stem.with_suffix(".md"), df.to_markdown(index=False, floatfmt=".4g") + "\n"),
    ]
    if json:
        paths.append(write_text(stem.with_suffix(".json"), df.to_json(orient="records", indent=2) + "\n"))
    return paths


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.4g}"
    return str(v)


def print_table(df: pd.DataFrame, title: str | None = None, con: Console | None = None) -> None:
    """Print ``df`` as a rich table (index dropped; floats to 4 significant digits)."""
    table = Table(title=title, show_lines=False)
    for col in df.columns:
        table.add_column(str(col), justify="right" if pd.api.types.is_numeric_dtype(df[col]) else "left")
    for row in df.itertuples(index=False):
        table.add_row(*(_fmt(v) for v in row))
    (con or console).print(table)
