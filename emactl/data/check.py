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

from ..config import DataConfig
from ..tables import print_table, save_table
from .base import SegDataset, build_dataset
from .progress import progress_bar
from .readers import DataFileError

MAX_LISTED = 20


@dataclass
class Problem:
    """One problem with one file."""

    kind: str  # missing image, missing label, unreadable, size mismatch, bad value
    path: str
    detail: str


@dataclass
class SplitReport:
    """Counts, class histogram and problems of one split."""

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
    """The check of all requested splits, with its tables as DataFrames."""

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
                "split": s.split, "images": s.images, "labels": s.labels, "pairs": s.samples,
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


ENET_C = 1.02


def frequency_weights(pixels: Sequence[int] | np.ndarray) -> list[float]:
    """ENet class weights ``1 / ln(1.02 + f_c)`` from per-class pixel counts, mean 1 over the
    classes present (absent classes: 1)."""
    counts = np.asarray(pixels, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return [1.0] * len(counts)
    present = counts > 0
    weights = 1.0 / np.log(ENET_C + counts / total)
    weights = np.where(present, weights / weights[present].mean(), 1.0)
    return [round(float(w), 4) for w in weights]


def _scan_sample(ds: SegDataset, i: int) -> tuple[np.ndarray | None, int, Problem | None]:
    """Class histogram, ignored pixels and the problem (if any) of sample ``i``."""
    try:
        sample = ds.load_raw(i)
    except DataFileError as e:
        return None, 0, Problem(e.kind, str(e.path or ds.source(i)), str(e))
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
    missing = ds.missing
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
    datasets = [build_dataset(cfg, split, train=False, strict=False) for split in names]
    reports = [check_split(ds, max(1, cfg.workers), progress) for ds in datasets]
    return CheckReport(cfg.name, list(datasets[0].class_names), datasets[0].ignore_index, reports)


def print_report(report: CheckReport, console: Console | None = None) -> None:
    """Summary, class histogram and the problems (the first few per split) on the console."""
    console = console or Console()
    print_table(report.summary(), f"dataset {report.dataset}", console)
    histogram = report.histogram().reset_index()
    for s in report.splits:
        columns = {f"{s.split} {c}": c for c in ("pixels", "%", "images")}
        split_table = histogram[["class", "name", *columns]].rename(columns=columns)
        print_table(split_table, f"class histogram of {s.split}", console)
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
    """Write summary, class histogram and problems as CSV + Markdown into ``out_dir``."""
    out_dir = Path(out_dir)
    return [
        *save_table(report.summary(), out_dir / "summary"),
        *save_table(report.histogram().reset_index(), out_dir / "class_histogram"),
        *save_table(report.problems(), out_dir / "problems"),
    ]


def print_class_weights(report: CheckReport, split: str, console: Console | None = None) -> None:
    """The frequency class weights of ``split`` as a line to paste into a recipe."""
    found = [s for s in report.splits if s.split == split]
    if not found or not found[0].pixels.sum():
        return
    weights = ", ".join(f"{w:g}" for w in frequency_weights(found[0].pixels))
    console = console or Console()
    console.print(f"class weights from the {split} split (ENet, 1/ln(1.02 + share), mean 1); "
                  "for train.loss=weighted_ce or ohem:", markup=False, highlight=False)
    console.print(f"  class_weights: [{weights}]", markup=False, highlight=False, soft_wrap=True)
