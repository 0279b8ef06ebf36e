"""Running a sweep: the sweep directory, one run directory per cell, resume, progress.

Layout of a sweep directory::

    sweep.json                  what the sweep is: source recipe (or checkpoint), axes, seeds
    cells/<cell>/               one run directory per cell (recipe.yaml, checkpoints/, eval/ ...)
        ablate_train.json       written once training is complete: iteration, train time
        ablate_eval_T<t>.json   one per eval T (``ablate_eval.json`` for the model's own T)
        ablate_error.json       the last failure of this cell (removed when it is retried)
        ablate.log              everything the trainer and evaluator printed for this cell
    results.csv/.md, summary.*, pivot_*.*, *.png    rebuilt from the cells after every run

Everything is written atomically, so a ``kill -9`` at any moment loses at most the work since a
cell's last checkpoint: running the same command again skips finished cells (all of their
eval files present), resumes interrupted trainings from their newest checkpoint
(``train(..., resume=True)``) and evaluates whatever is missing. A directory that holds a
different sweep is never written into.

How one cell runs, and where (this process, ``--jobs`` worker processes, SLURM jobs), is
:mod:`.launcher`'s business. Locally each cell gets ``torch.set_num_threads(max(1, cores // jobs))``
threads (or fewer, ``--threads``), so jobs × threads never exceeds the cores.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from ..config import LauncherConfig, apply_overrides, from_dict, read_yaml, to_dict, with_overrides
from ..engine.checkpoint import latest_checkpoint, load_checkpoint, resolve_checkpoint
from ..engine.evaluate import run_dir_of
from ..engine.rundir import code_version
from ..errors import UserError
from ..io import LOCK_FILE, folder_lock, write_json
from ..nn.heads import has_ema_unit
from ..progress import hms
from .axes import AXES, Axes, Cell, cell_label, expand, safe_label, table_columns
from .launcher import (
    CELLS_DIR, LOG_FILE, SWEEP_FILE, TRAIN_FILE, CellOutcome, CellTask, Executor, InProcessExecutor, SpawnExecutor,
    cell_finished, read_json, run_cells,
)
from .progress import CellState, SweepMonitor, SweepProgress, cell_line, sweep_line

DEFAULT_RECIPE = Path("recipes") / "shapes.yaml"
SWEEPS_DIR = Path("sweeps")
SPEC_KEYS = ("source", "recipe", "checkpoint", "axes", "seeds")

console = Console(stderr=True, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------
# Planning.


@dataclass
class Sweep:
    """A planned sweep: where it lives, what it is (``spec``), its cells and table columns."""

    dir: Path
    spec: dict[str, Any]
    axes: Axes
    cells: list[Cell]
    columns: list[str]
    notes: list[str] = field(default_factory=list)
    eval_overrides: list[str] = field(default_factory=list)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)

    def cell_dir(self, cell: Cell) -> Path:
        return self.dir / CELLS_DIR / cell.name

    def finished(self, cell: Cell) -> bool:
        return cell_finished(self.cell_dir(cell), cell.eval_iters)


def default_recipe() -> Path:
    """``recipes/shapes.yaml`` in the working directory, else the one beside the package."""
    if DEFAULT_RECIPE.is_file():
        return DEFAULT_RECIPE
    beside = Path(__file__).resolve().parents[2] / DEFAULT_RECIPE
    if beside.is_file():
        return beside
    raise UserError(f"{DEFAULT_RECIPE}: default recipe not found here; pass --recipe PATH")


def _slug(axes: Axes, seeds: Sequence[int]) -> str:
    parts = []
    for column, values in axes.values.items():
        if column == "eval_iters" and axes.iter_mode == "diagonal":
            continue
        name = "iters" if column == "train_iters" and axes.iter_mode == "diagonal" else column
        labels = [cell_label(column, v).split("-", 1)[-1] if column not in AXES else _value_text(v) for v in values]
        parts.append(f"{name.rsplit('.', 1)[-1]}-{'-'.join(labels)}")
    if len(seeds) > 1:
        parts.append(f"seeds{len(seeds)}")
    for override in sorted(axes.overrides):  # plain --set KEY=V: readable, e.g. train.iters-60
        key, _, value = override.partition("=")
        parts.append(f"{safe_label(key.strip())}-{safe_label(value.strip())}")
    return "_".join(parts)


def _value_text(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def default_sweep_dir(stem: str, axes: Axes, seeds: Sequence[int]) -> Path:
    """``sweeps/<recipe or run name>_<axis>-<values>..._<key>-<value>`` for each plain ``--set``
    (names over 120 characters are cut and end with a hash)."""
    name = f"{stem}_{_slug(axes, seeds)}".strip("_")
    if len(name) > 120:
        name = f"{name[:100]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return SWEEPS_DIR / name


def _seeds(base_seed: int, n: int) -> list[int]:
    if n < 1:
        raise UserError(f"--seeds: must be >= 1, got {n}")
    return [base_seed + i for i in range(n)]


def plan_recipe(recipe: Path | None, axes: Axes, seeds: int = 1, out: Path | None = None) -> Sweep:
    """Plan a sweep that trains one run per cell of ``recipe`` (default: the shapes demo)."""
    path = recipe if recipe is not None else default_recipe()
    data = read_yaml(path)
    if not isinstance(data, dict):
        from_dict(data, source=str(path))
    resolved = with_overrides(data, axes.overrides, str(path))
    if not axes.values and seeds <= 1:
        raise UserError("nothing to sweep: give at least one axis, e.g. --iters 1,3,5 (see emactl ablate --help)")
    seed_list = _seeds(resolved.train.seed, seeds)
    launcher, resolved.launcher = resolved.launcher, LauncherConfig()  # where cells run is not what they are
    cells, notes = expand(to_dict(resolved), axes, seed_list, source=str(path))
    spec = {
        "source": "recipe",
        "recipe": to_dict(resolved),
        "checkpoint": None,
        "axes": axes.to_json(),
        "seeds": seed_list,
        "recipe_path": str(path),
    }
    where = out if out is not None else default_sweep_dir(resolved.name, axes, seed_list)
    return Sweep(Path(where), spec, axes, cells, table_columns(axes, cells), notes, launcher=launcher)


def plan_from(source: Path, axes: Axes, seeds: int = 1, out: Path | None = None) -> Sweep:
    """Plan a sweep that only evaluates a trained run (or checkpoint) at the eval-side values."""
    train_side = [AXES[c].option if c in AXES else f"--set {c}" for c in axes.train_side]
    if axes.iter_mode == "diagonal":
        raise UserError(
            "--from: --iters also sets the training T; to evaluate a trained run at several T use --eval-iters"
        )
    if train_side:
        raise UserError(
            f"--from: {', '.join(train_side)} need(s) training; a trained run takes only eval-side axes "
            "(--eval-iters) and single-valued --set overrides — use --recipe to train the cells"
        )
    if seeds != 1:
        raise UserError("--from: --seeds needs training; a trained run has one seed")
    if not axes.values:
        raise UserError("--from: nothing to sweep: give --eval-iters, e.g. --eval-iters 1,2,3,4,5")
    ckpt = resolve_checkpoint(source)
    stored = load_checkpoint(ckpt)["recipe"]
    data = apply_overrides(stored, axes.overrides)
    data.setdefault("model", {})["pretrained"] = None
    data.pop("launcher", None)
    recipe = from_dict(data, source=f"{ckpt} (stored recipe)")
    if not has_ema_unit(recipe.model.head):
        raise UserError(f"--from {source}: model.head={recipe.model.head!r} has no EMA unit; --eval-iters needs one")
    run_name = run_dir_of(source).name or "run"
    values: dict[str, Any] = {"train_iters": recipe.model.ema.iters, "seed": recipe.train.seed}
    cell = Cell(safe_label(run_name), values, to_dict(recipe), list(axes.values["eval_iters"]),
                source=str(ckpt.resolve()))
    spec = {
        "source": "run",
        "recipe": to_dict(recipe),
        "checkpoint": str(ckpt.resolve()),
        "axes": axes.to_json(),
        "seeds": [recipe.train.seed],
    }
    where = out if out is not None else default_sweep_dir(run_name, axes, [recipe.train.seed])
    return Sweep(Path(where), spec, axes, [cell], table_columns(axes, [cell]), [], list(axes.overrides))


# --------------------------------------------------------------------------------------------
# The sweep directory.


def _normal(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _first_difference(old: Any, new: Any, prefix: str) -> str:
    """The dotted key where two JSON values first differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}.{key}")
    shown = f"{old!r} → {new!r}"
    if len(shown) > 80:
        shown = "changed"
    return f"{prefix.lstrip('.')} ({shown})"


def _current_schema(recipe: Any) -> Any:
    """A stored recipe re-read with today's :class:`Recipe`, so that keys added to emactl since
    (with their defaults) do not make an old sweep look different; unreadable ones stay as is."""
    if not isinstance(recipe, dict):
        return recipe
    try:
        return _normal(to_dict(from_dict(recipe, source=SWEEP_FILE)))
    except UserError:
        return recipe


def check_sweep(sweep: Sweep) -> None:
    """Refuse (one-line :class:`UserError`) a directory that holds anything but this very sweep."""
    path = sweep.dir / SWEEP_FILE
    if not sweep.dir.exists():
        return
    if not sweep.dir.is_dir():
        raise UserError(f"{sweep.dir}: exists and is not a directory; pass --out DIR for this sweep")
    if not [p for p in sweep.dir.iterdir() if p.name != LOCK_FILE]:
        return
    stored = read_json(path)
    if stored is None:
        raise UserError(
            f"{sweep.dir}: not an ablation sweep directory (no readable {SWEEP_FILE}); refusing to write into it — "
            "pass --out DIR for this sweep"
        )
    old = _normal({k: stored.get(k) for k in SPEC_KEYS})
    old["recipe"] = _current_schema(old.get("recipe"))
    new = _normal({k: sweep.spec.get(k) for k in SPEC_KEYS})
    if old != new:
        where = _first_difference(old, new, "")
        raise UserError(
            f"{sweep.dir}: holds a different sweep (differs in {where}); refusing to overwrite it — "
            "pass --out DIR for this sweep"
        )


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the sweep so that two processes never run the same cells."""
    with folder_lock(sweep_dir, "emactl ablate", "wait for that `emactl ablate` to finish or pass --out DIR"):
        yield


def open_sweep(sweep: Sweep) -> None:
    """Check the directory holds this sweep (or nothing) and write ``sweep.json``.

    ``sweep.json`` records the code version of every session that ran it; resuming a sweep
    with different code says so, since its cells then come from more than one version.
    """
    check_sweep(sweep)
    stored = read_json(sweep.dir / SWEEP_FILE) or {}
    code = code_version()
    versions = [v for v in stored.get("code_versions", []) if isinstance(v, dict)]
    if versions and versions[-1] != code:
        console.print(
            f"warning: {sweep.dir} was last run by emactl {_describe(versions[-1])}, now {_describe(code)}; "
            "finished cells keep their results (see code_versions in sweep.json)", markup=False)
    if not versions or versions[-1] != code:
        versions.append(code)
    spec = dict(sweep.spec)
    spec["cells"] = [c.name for c in sweep.cells]
    spec["cell_eval_iters"] = {c.name: list(c.eval_iters) for c in sweep.cells}
    spec["code_versions"] = versions
    write_json(sweep.dir / SWEEP_FILE, spec)


def _describe(code: dict[str, Any]) -> str:
    commit = code.get("git_commit")
    text = str(code.get("emactl"))
    if commit:
        text += f" @ {str(commit)[:10]}" + (" (modified)" if code.get("git_dirty") else "")
    return text


# --------------------------------------------------------------------------------------------
# Running the sweep.


def _task(sweep: Sweep, cell: Cell, device: str | None) -> CellTask:
    return CellTask(cell.name, str(sweep.cell_dir(cell)), cell.recipe, list(cell.eval_iters), cell.source,
                    list(sweep.eval_overrides), device)


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass
class SweepOutcome:
    """What running a sweep did: cells skipped (already finished), run, failed; a stop signal."""

    skipped: list[str]
    done: list[str]
    failed: dict[str, str]
    stopped_by: int | None
    seconds: float
    queued: list[str] = field(default_factory=list)  # submitted to SLURM, not waited for


def _progress(enabled: bool) -> Progress:
    """One line for the sweep (bar over training iterations, ETA) and one per running cell."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        TextColumn("{task.fields[detail]}"),
        console=Console(file=sys.stderr, soft_wrap=True),
        disable=not enabled,
        redirect_stdout=False,
        redirect_stderr=False,
    )


def _iterations_done(sweep: Sweep, cell: Cell) -> int:
    """Training iterations a cell has behind it: all when trained, else its newest checkpoint's."""
    d = sweep.cell_dir(cell)
    if cell.source is not None or (d / TRAIN_FILE).is_file():
        return _train_total(cell)
    ckpt = latest_checkpoint(d)
    return int(ckpt.stem.split("_")[-1]) if ckpt is not None else 0


def _train_total(cell: Cell) -> int:
    return 0 if cell.source is not None else int(cell.recipe.get("train", {}).get("iters") or 0)


def sweep_progress(sweep: Sweep, jobs: int = 1, clock: Callable[[], float] = time.monotonic) -> SweepProgress:
    """The progress and ETA bookkeeping of a sweep about to run (see :mod:`.progress`)."""
    cells = {c.name: CellState(_train_total(c), start=_iterations_done(sweep, c), skipped=sweep.finished(c))
             for c in sweep.cells}
    return SweepProgress(cells, clock, jobs)


def run_sweep(
    sweep: Sweep, jobs: int = 1, device: str | None = None, progress: bool = True, threads: int | None = None,
    executor: Executor | None = None,
) -> SweepOutcome:
    """Run every unfinished cell of an opened sweep (see :func:`open_sweep`).

    ``executor`` runs the cells (default: here, see :mod:`.launcher`). Locally, ``threads`` is
    the torch threads per cell, at most (and by default) ``cores // jobs``; one job runs in
    this process, more in spawned worker processes.
    """
    if jobs < 1:
        raise UserError(f"--jobs: must be >= 1, got {jobs}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads: must be >= 1, got {threads}")
    start = time.perf_counter()
    skipped = [c.name for c in sweep.cells if sweep.finished(c)]
    pending = [c for c in sweep.cells if not sweep.finished(c)]
    n_cores = cores()
    if jobs > n_cores:
        console.print(f"note: --jobs {jobs} is more than the {n_cores} cores here; running {n_cores} at a time")
        jobs = n_cores
    jobs = max(1, min(jobs, len(pending)))
    limit = max(1, n_cores // jobs)
    if threads is not None and threads > limit:
        console.print(
            f"note: --threads {threads} × {jobs} job(s) is more than the {n_cores} cores here; using {limit}"
        )
    per_cell = min(threads, limit) if threads is not None else limit
    if executor is None:
        executor = SpawnExecutor(jobs, per_cell) if jobs > 1 else InProcessExecutor(per_cell)
    console.print(f"sweep {sweep.dir}: {len(sweep.cells)} cell(s), {len(skipped)} finished, {len(pending)} to run"
                  f"{executor.where}")
    done: list[str] = []
    failed: dict[str, str] = {}
    tasks = [_task(sweep, c, device) for c in pending]
    state = sweep_progress(sweep, jobs)
    bar = _progress(progress)
    cell_bars: dict[str, Any] = {}
    sweep_bar = bar.add_task("sweep", total=max(1, state.total()), completed=state.done(), detail="")

    def refresh() -> None:
        with monitor.lock:
            bar.update(sweep_bar, total=max(1, state.total()), completed=state.done(), detail=sweep_line(state))
            for name, task_id in cell_bars.items():
                cell = state.cells[name]
                bar.update(task_id, total=max(1, cell.total), completed=cell.done, detail=cell_line(cell))

    monitor = SweepMonitor(state, {c.name: sweep.cell_dir(c) for c in sweep.cells}, refresh)
    with bar, monitor:

        def on_start(task: CellTask) -> None:
            with monitor.lock:
                state.start(task.name)
                cell = state.cells[task.name]
                cell_bars[task.name] = bar.add_task(f"  {task.name}", total=max(1, cell.total),
                                                    completed=cell.done, detail=cell_line(cell))
            refresh()

        def on_done(outcome: CellOutcome) -> None:
            with monitor.lock:
                state.finish(outcome.name, ok=outcome.status == "done")
                if outcome.name in cell_bars:
                    bar.remove_task(cell_bars.pop(outcome.name))
            log = sweep.dir / CELLS_DIR / outcome.name / LOG_FILE
            if outcome.status == "done":
                done.append(outcome.name)
                bar.console.print(f"done {outcome.name} ({hms(outcome.seconds)})")
            elif outcome.status == "failed":
                failed[outcome.name] = outcome.error or "failed"
                bar.console.print(f"[red]failed[/] {outcome.name}: {outcome.error} (log: {log})")
            else:
                bar.console.print(f"stopped {outcome.name} by {signal.Signals(outcome.signum or 2).name}; "
                                  "run the same command again to resume")
            refresh()

        stopped, queued = run_cells(executor, tasks, on_start, on_done)
    return SweepOutcome(skipped, done, failed, stopped, time.perf_counter() - start, queued)
