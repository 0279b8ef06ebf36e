"""``emactl data check``: count, histogram and validate every sample of a dataset's splits.

Unlike training, the check does not stop at the first problem: it lists every missing pair,
unreadable file, image/label size mismatch and out-of-range label value.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from ..config import DataConfig
from ..io import write_text
from .base import ImageListDataset, SegDataset, build_dataset
from .progress import progress_bar
from .readers import DataFileError

MAX_LISTED = 20


@dataclass
class Problem:
    kind: str  # missing image, missing label, unreadable, size mismatch, bad value
    path: str
    detail: str


@dataclass
class SplitReport:
    split: str
    samples: int
    images: int
    labels: int
    pixels: np.ndarray  # per class
    ignored: int
    image_counts: np.ndarray  # images containing each class
    ignored_images: int  # images containing ignored pixels
    problems: list[Problem] = field(default_factory=list)


@dataclass
class CheckReport:
    dataset: str
    class_names: list[str]
    ignore_index: int
    splits: list[SplitReport]

    @property
    def ok(self) -> bool:
        return not any(s.problems for s in self.splits)

    def summary(self) -> pd.DataFrame:
        rows = []
        for s in self.splits:
            kinds = [p.kind for p in s.problems]
            rows.append({
                "split": s.split, "images": s.images, "labels": s.labels,
                "missing": sum(k.startswith("missing") for k in kinds),
                "unreadable": kinds.count("unreadable"),
                "size mismatch": kinds.count("size mismatch"),
                "bad values": kinds.count("bad value"),
            })
        return pd.DataFrame(rows)

    def histogram(self) -> pd.DataFrame:
        """Pixels per class (and the ignored pixels) for each split."""
        index = list(range(len(self.class_names))) + [self.ignore_index]
        table = pd.DataFrame({"name": self.class_names + ["(ignore)"]},
                             index=pd.Index(index, name="class"))
        for s in self.splits:
            pixels = np.append(s.pixels, s.ignored)
            total = max(int(pixels.sum()), 1)
            table[f"{s.split} pixels"] = pixels
            table[f"{s.split} %"] = np.round(100.0 * pixels / total, 3)
            table[f"{s.split} images"] = np.append(s.image_counts, s.ignored_images)
        return table

    def problems(self) -> pd.DataFrame:
        rows = [{"split": s.split, "kind": p.kind, "path": p.path, "detail": p.detail}
                for s in self.splits for p in s.problems]
        return pd.DataFrame(rows, columns=["split", "kind", "path", "detail"])


def _scan_sample(ds: SegDataset, i: int) -> tuple[np.ndarray | None, int, Problem | None]:
    """Class histogram, ignored pixels and the problem (if any) of sample ``i``."""
    try:
        sample = ds.load_raw(i)
    except DataFileError as e:
        return None, 0, Problem(e.kind, str(e.path), str(e))
    label = sample.label
    if label is None:
        return None, 0, None
    valid = label[(label >= 0) & (label < ds.num_classes)]
    counts = np.bincount(valid.ravel(), minlength=ds.num_classes)
    ignored = int((label == ds.ignore_index).sum())
    bad = ds.invalid_values(label)
    problem = None
    if bad.size:
        where = ds.source(i)
        problem = Problem("bad value", where, ds.describe_invalid(bad, where))
    return counts, ignored, problem


def check_split(ds: SegDataset, workers: int = 4, progress: bool = True) -> SplitReport:
    """Read every sample of ``ds`` (with a thread pool: decoding releases the GIL)."""
    n = len(ds)
    pixels = np.zeros(ds.num_classes, dtype=np.int64)
    image_counts = np.zeros(ds.num_classes, dtype=np.int64)
    ignored = ignored_images = 0
    problems: list[Problem] = []
    missing = ds.missing if isinstance(ds, ImageListDataset) else []
    for m in missing:
        problems.append(Problem(f"missing {m.kind}", str(m.path), m.message))
    with progress_bar(progress, transient=True) as bar, \
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        task = bar.add_task(f"checking {ds.split}", total=n)
        for counts, ign, problem in pool.map(lambda i: _scan_sample(ds, i), range(n)):
            if counts is not None:
                pixels += counts
                image_counts += counts > 0
                ignored += ign
                ignored_images += ign > 0
            if problem is not None:
                problems.append(problem)
            bar.advance(task)
    missing_images = sum(m.kind == "image" for m in missing)
    missing_labels = sum(m.kind == "label" for m in missing)
    return SplitReport(ds.split, n, n + missing_labels, n + missing_images, pixels, ignored,
                       image_counts, ignored_images, problems)


def check_dataset(cfg: DataConfig, splits: Sequence[str] | None = None,
                  progress: bool = True) -> CheckReport:
    """Check ``splits`` (default: the train and val splits) of the dataset in ``cfg``."""
    names = list(dict.fromkeys(splits or [cfg.train_split, cfg.val_split]))
    reports, ds = [], None
    for split in names:
        ds = build_dataset(cfg, split, train=False, strict=False)
        reports.append(check_split(ds, max(1, cfg.workers), progress))
    assert ds is not None
    return CheckReport(cfg.name, list(ds.class_names), ds.ignore_index, reports)


def _table(df: pd.DataFrame, title: str, index: bool = False) -> Table:
    table = Table(title=title, title_justify="left")
    if index:
        table.add_column(str(df.index.name or ""), justify="right")
    for col in df.columns:
        numeric = pd.api.types.is_numeric_dtype(df[col])
        table.add_column(str(col), justify="right" if numeric else "left", overflow="fold")
    for key, row in df.iterrows():
        cells = ["" if pd.isna(v) else str(v) for v in row]
        table.add_row(*([str(key)] if index else []), *cells)
    return table


def print_report(report: CheckReport, console: Console | None = None) -> None:
    """Summary, class histogram and the problems (the first few per split) on the console."""
    console = console or Console()
    console.print(_table(report.summary(), f"dataset {report.dataset}"))
    histogram = report.histogram()
    for s in report.splits:
        columns = {f"{s.split} pixels": "pixels", f"{s.split} %": "%", f"{s.split} images": "images"}
        split_table = histogram[["name", *columns]].rename(columns=columns)
        console.print(_table(split_table, f"class histogram of {s.split}", index=True))
    for s in report.splits:
        if not s.problems:
            continue
        console.print(f"[bold red]{len(s.problems)} problem(s) in split {s.split}:[/]")
        for p in s.problems[:MAX_LISTED]:
            console.print(f"  {p.kind}: {p.detail}", markup=False, highlight=False)
        if len(s.problems) > MAX_LISTED:
            console.print(f"  ... and {len(s.problems) - MAX_LISTED} more (--out DIR writes "
                          "them all to problems.csv)")
    if report.ok:
        console.print("[green]no problems found[/]")


def write_report(report: CheckReport, out_dir: Path) -> list[Path]:
    """Write summary, histogram and problems as CSV + Markdown into ``out_dir``."""
    out_dir = Path(out_dir)
    written = []
    tables = {"summary": (report.summary(), False), "class_histogram": (report.histogram(), True),
              "problems": (report.problems(), False)}
    for name, (df, index) in tables.items():
        written.append(write_text(out_dir / f"{name}.csv", df.to_csv(index=index)))
        written.append(write_text(out_dir / f"{name}.md", df.to_markdown(index=index) + "\n"))
    return written
