"""What a sweep shows while it runs: progress inside each running cell and a sweep ETA.

The trainer of a cell appends a ``{"kind": "train", "iter", "loss", "img_per_s"}`` line to the
cell's ``metrics.jsonl`` every ``train.log_every`` iterations, whether it runs in this process
or in a worker; :class:`SweepMonitor` reads the last of those lines about once a second, so the
same code serves ``--jobs 1`` and ``--jobs N``.

The ETA adds the remaining training iterations × seconds per iteration and the remaining
evaluations × seconds per evaluation, both measured per cell *in this session* (iterations a
resumed cell had already done cost nothing now), and divides by the cells running at once. It
has a value from the first logged iterations; until the first evaluation has been timed the
line says ``+ evaluation``.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..engine.rundir import METRICS_FILE
from ..progress import hms

TAIL_BYTES = 8192


def last_train_record(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The last complete ``kind == "train"`` line of ``run_dir/metrics.jsonl`` (read from its end)."""
    path = Path(run_dir) / METRICS_FILE
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a partial line being written, or the cut start of the tail
        if isinstance(record, dict) and record.get("kind") == "train" and "iter" in record:
            return record
    return None


@dataclass
class CellState:
    """One cell: ``total`` training iterations, ``done`` now, ``start`` when this session began;
    ``skipped``: finished before this session. The times are this session's, on the sweep's clock."""

    total: int
    start: int = 0
    skipped: bool = False
    done: int = 0
    finished: bool = False
    running: bool = False
    loss: float | None = None
    img_per_s: float | None = None
    started_at: float | None = None
    trained_at: float | None = None  # when its training was over (then it evaluates)
    finished_at: float | None = None
    ok: bool = False

    def __post_init__(self) -> None:
        self.start = min(self.start, self.total)
        self.done = max(self.done, self.start)
        if self.skipped:
            self.finished, self.done, self.start = True, self.total, self.total


@dataclass
class SweepProgress:
    """Iterations done per cell and the sweep's ETA; ``clock`` is injectable for tests.

    ETA = (remaining iterations × seconds per iteration + remaining evaluations × seconds per
    evaluation) / cells running at once, both rates measured in this session, per cell.
    """

    cells: dict[str, CellState]
    clock: Callable[[], float] = time.monotonic
    jobs: int = 1
    began: float = field(default=0.0)
    by_cells: bool = field(default=False)

    def __post_init__(self) -> None:
        self.began = self.clock()
        # nothing to train (eval-only sweeps): count cells instead of iterations
        self.by_cells = sum(c.total - c.start for c in self.cells.values() if not c.skipped) == 0

    def total(self) -> int:
        return len(self.cells) if self.by_cells else sum(c.total for c in self.cells.values())

    def done(self) -> int:
        if self.by_cells:
            return sum(c.finished for c in self.cells.values())
        return sum(min(c.done, c.total) for c in self.cells.values())

    def elapsed(self) -> float:
        return self.clock() - self.began

    def _seconds_per_iteration(self, now: float) -> float | None:
        trained = sum(c.done - c.start for c in self.cells.values() if c.started_at is not None)
        seconds = sum((c.trained_at if c.trained_at is not None else now) - c.started_at
                      for c in self.cells.values() if c.started_at is not None and c.done > c.start)
        return seconds / trained if trained > 0 else None

    def _seconds_per_evaluation(self) -> float | None:
        times = [c.finished_at - c.trained_at for c in self.cells.values()
                 if c.ok and c.finished_at is not None and c.trained_at is not None]
        return sum(times) / len(times) if times else None

    def estimate(self) -> tuple[float | None, bool]:
        """``(seconds left, whether evaluation time is still unknown and left out)``."""
        now = self.clock()
        waiting = [c for c in self.cells.values() if not c.finished]
        if not waiting:
            return 0.0, False
        iterations = sum(c.total - c.done for c in waiting)
        per_iteration = self._seconds_per_iteration(now)
        if iterations > 0 and per_iteration is None:
            return None, False
        work = iterations * (per_iteration or 0.0)
        per_evaluation = self._seconds_per_evaluation()
        if per_evaluation is not None:
            for c in waiting:
                evaluating = now - c.trained_at if c.trained_at is not None else 0.0
                work += max(0.0, per_evaluation - evaluating)
        elif iterations == 0 and not any(c.trained_at is not None for c in waiting):
            return None, False
        return work / max(1, min(self.jobs, len(waiting))), per_evaluation is None

    def eta(self) -> float | None:
        return self.estimate()[0]

    def start(self, name: str) -> None:
        cell = self.cells[name]
        cell.running, cell.started_at = True, self.clock()
        if cell.done >= cell.total:
            cell.trained_at = cell.started_at

    def update(self, name: str, done: int, loss: float | None = None, img_per_s: float | None = None) -> None:
        cell = self.cells[name]
        cell.done = max(cell.done, min(done, cell.total))
        cell.loss, cell.img_per_s = loss, img_per_s
        if cell.done >= cell.total and cell.trained_at is None:
            cell.trained_at = self.clock()

    def finish(self, name: str, ok: bool = True) -> None:
        """The cell stopped: trained and evaluated (``ok``), or failed / interrupted."""
        cell = self.cells[name]
        cell.running, cell.finished, cell.ok, cell.finished_at = False, True, ok, self.clock()
        if ok:
            cell.done = cell.total
            if cell.trained_at is None:  # trained and evaluated between two polls
                cell.trained_at = cell.finished_at
        else:  # what it did not train is not left to do in this session
            cell.total = cell.done


def sweep_line(p: SweepProgress) -> str:
    """``2/3 cells · 1,200/3,000 it · 4:10 elapsed · ETA 6:15`` (``+ evaluation`` while no
    evaluation has been timed yet)."""
    finished = sum(c.finished for c in p.cells.values())
    text = f"{finished}/{len(p.cells)} cells"
    if not p.by_cells:
        text += f" · {p.done():,}/{p.total():,} it"
    eta, partial = p.estimate()
    return f"{text} · {hms(p.elapsed())} elapsed · ETA {hms(eta)}" + (" + evaluation" if partial else "")


def cell_line(c: CellState) -> str:
    """``it 120/1000 · loss 0.8123 · 12.3 img/s`` (``evaluating`` once training is over)."""
    if c.total and c.done >= c.total:
        return "evaluating"
    if c.loss is None:
        return f"it {c.done}/{c.total} · starting"
    ips = f" · {c.img_per_s:.1f} img/s" if c.img_per_s else ""
    return f"it {c.done}/{c.total} · loss {c.loss:.4f}{ips}"


class SweepMonitor:
    """Polls the running cells' ``metrics.jsonl`` in a thread and calls ``refresh`` after each poll."""

    def __init__(self, progress: SweepProgress, cell_dirs: dict[str, Path], refresh: Callable[[], None],
                 interval: float = 1.0) -> None:
        self.progress, self.cell_dirs, self.refresh, self.interval = progress, cell_dirs, refresh, interval
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweep-monitor", daemon=True)

    def poll(self) -> None:
        with self.lock:
            running = [n for n, c in self.progress.cells.items() if c.running]
        for name in running:
            record = last_train_record(self.cell_dirs[name])
            if record is not None:
                with self.lock:
                    self.progress.update(name, int(record["iter"]), _float(record.get("loss")),
                                         _float(record.get("img_per_s")))
        self.refresh()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def __enter__(self) -> "SweepMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
