"""Running a sweep: the sweep directory, one run directory per cell, resume, parallel workers.

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

Where the cells run is :mod:`.launcher`'s business (here, or SLURM jobs through submitit).
With ``jobs > 1`` each pending cell runs in its own spawned process with
``torch.set_num_threads(max(1, cores // jobs))`` threads (or fewer, ``--threads``), so jobs ×
threads never exceeds the cores. The workers sit in their own process group: a Ctrl-C reaches only the main process,
which forwards exactly one SIGINT to each worker (the trainer then saves a checkpoint and
stops) and waits for them. A worker whose main process has died stops the same way.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from ..config import LauncherConfig, apply_overrides, from_dict, read_yaml, to_dict, with_overrides
from ..engine.rundir import code_version
from ..errors import UserError
from ..io import LOCK_FILE, folder_lock, write_json
from .axes import AXES, Axes, Cell, cell_label, expand, safe_label, table_columns
from ..progress import hms
from .progress import CellState, SweepMonitor, SweepProgress, cell_line, sweep_line
from .launcher import Launcher, LocalLauncher

SWEEP_FILE = "sweep.json"
CELLS_DIR = "cells"
TRAIN_FILE = "ablate_train.json"
ERROR_FILE = "ablate_error.json"
LOG_FILE = "ablate.log"
DEFAULT_RECIPE = Path("recipes") / "shapes.yaml"
SWEEPS_DIR = Path("sweeps")
SPEC_KEYS = ("source", "recipe", "checkpoint", "axes", "seeds")
FAILED, STOPPED = 3, 128

console = Console(stderr=True, highlight=False, soft_wrap=True)


def eval_file(cell_dir: Path, eval_iters: int | None) -> Path:
    """Where the evaluation of a cell at eval T ``eval_iters`` is stored."""
    return cell_dir / ("ablate_eval.json" if eval_iters is None else f"ablate_eval_T{eval_iters}.json")


def cell_finished(cell_dir: Path, eval_iters: Sequence[int | None]) -> bool:
    """Trained, and evaluated at every eval T."""
    return (cell_dir / TRAIN_FILE).is_file() and all(eval_file(cell_dir, t).is_file() for t in eval_iters)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
    from ..engine.checkpoint import load_checkpoint, resolve_checkpoint
    from ..engine.evaluate import run_dir_of
    from ..nn.heads import has_ema_unit

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


def _check_spec(sweep: Sweep) -> None:
    """Refuse a directory that holds something other than this very sweep."""
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


def check_sweep(sweep: Sweep) -> None:
    """Refuse (one-line :class:`UserError`) a directory that holds anything but this sweep."""
    _check_spec(sweep)


def open_sweep(sweep: Sweep) -> None:
    """Check the directory holds this sweep (or nothing) and write ``sweep.json``.

    ``sweep.json`` records the code version of every session that ran it; resuming a sweep
    with different code says so, since its cells then come from more than one version.
    """
    _check_spec(sweep)
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
# One cell.


@dataclass
class CellTask:
    """Everything a (possibly separate) process needs to run one cell."""

    name: str
    dir: str
    recipe: dict[str, Any]
    eval_iters: list[int | None]
    source: str | None = None
    eval_overrides: list[str] = field(default_factory=list)
    device: str | None = None

    def finished(self) -> bool:
        return cell_finished(Path(self.dir), self.eval_iters)


@dataclass
class CellOutcome:
    """``status`` is ``done``, ``failed`` (``error`` says why) or ``stopped`` (by ``signum``)."""

    name: str
    status: str
    error: str | None = None
    signum: int | None = None
    seconds: float = 0.0


def _count_params(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _train_cell(task: CellTask) -> int | None:
    """Train the cell unless it is trained already; the signal number if a signal stopped it."""
    from ..engine.checkpoint import checkpoint_path, load_checkpoint, resolve_checkpoint
    from ..engine.trainer import train

    cell_dir = Path(task.dir)
    if (cell_dir / TRAIN_FILE).is_file():
        return None
    if task.source is not None:
        ckpt = resolve_checkpoint(task.source)
    else:
        recipe = from_dict(task.recipe, source=f"ablate cell {task.name}")
        if task.device is not None:
            recipe.train.device = task.device
        ckpt = checkpoint_path(cell_dir, recipe.train.iters)
        if not ckpt.is_file():
            result = train(recipe, cell_dir, resume=True, progress=False)
            if result.stopped_by is not None:
                return result.stopped_by
    state = load_checkpoint(ckpt)
    elapsed = state.get("elapsed")
    write_json(
        cell_dir / TRAIN_FILE,
        {
            "checkpoint": str(ckpt),
            "iteration": int(state.get("iteration", 0)),
            "train_time_s": float(elapsed) if elapsed is not None else None,
        },
    )
    return None


def _eval_cell(task: CellTask) -> None:
    """Evaluate the cell's final checkpoint at every eval T that has no result yet."""
    from ..data import build_dataset
    from ..engine.evaluate import evaluate, load_for_eval
    from ..nn.emanet import ema_units, set_eval_iters

    cell_dir = Path(task.dir)
    missing = [t for t in task.eval_iters if not eval_file(cell_dir, t).is_file()]
    if not missing:
        return
    device = task.device or str(task.recipe.get("train", {}).get("device") or "auto")
    run, cfg, dev = load_for_eval(task.source or cell_dir, task.eval_overrides, None, device)
    recipe = run.recipe
    dataset = build_dataset(recipe.data, recipe.data.val_split, train=False)
    if dataset.num_classes != recipe.data.num_classes:
        raise UserError(f"{run.checkpoint}: the model predicts {recipe.data.num_classes} classes but the dataset has "
                        f"{dataset.num_classes}")
    if len(dataset) == 0:
        raise UserError(f"dataset {recipe.data.name!r} split {recipe.data.val_split!r} holds no images")
    params = _count_params(run.model)
    for t in missing:
        if t is not None:
            set_eval_iters(run.model, t)
        start = time.perf_counter()
        result = evaluate(run.model, dataset, cfg, dataset.num_classes, dataset.ignore_index, dev, progress=False,
                          workers=recipe.data.workers)
        seconds = time.perf_counter() - start
        units = ema_units(run.model)
        write_json(
            eval_file(cell_dir, t),
            {
                "eval_iters": t,
                "em_iters": units[0].eval_iters if units else None,
                "metrics": {k: float(v) for k, v in result.summary.items()},
                "eval_time_s": seconds,
                "params": params,
                "checkpoint": str(run.checkpoint),
                "iteration": run.iteration,
                "images": len(dataset),
            },
        )


@contextlib.contextmanager
def _logged(path: Path) -> Iterator[Any]:
    """Send everything printed (the trainer's tables and messages) to the cell's log file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1) as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield log


def run_cell(task: CellTask) -> CellOutcome:
    """Train (or resume) and evaluate one cell; failures are recorded in the cell, not raised.

    A :class:`UserError` or any other exception (a NaN loss, a bad dataset option in a
    ``--set`` value...) fails this cell only: the message goes to ``ablate_error.json``, the
    traceback to ``ablate.log``, and the other cells go on. ``KeyboardInterrupt`` propagates.
    """
    cell_dir = Path(task.dir)
    start = time.perf_counter()
    (cell_dir / ERROR_FILE).unlink(missing_ok=True)
    with _logged(cell_dir / LOG_FILE) as log:
        try:
            signum = _train_cell(task)
            if signum is not None:
                return CellOutcome(task.name, "stopped", signum=signum, seconds=time.perf_counter() - start)
            _eval_cell(task)
        except Exception as e:  # noqa: BLE001 - one failed cell must not end the sweep
            message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            if not isinstance(e, UserError):
                message = f"{type(e).__name__}: {message}"
                traceback.print_exc(file=log)
            else:
                print(f"error: {message}", file=log)
            write_json(cell_dir / ERROR_FILE, {"error": message})
            return CellOutcome(task.name, "failed", error=message, seconds=time.perf_counter() - start)
    return CellOutcome(task.name, "done", seconds=time.perf_counter() - start)


def _task(sweep: Sweep, cell: Cell, device: str | None) -> CellTask:
    return CellTask(cell.name, str(sweep.cell_dir(cell)), cell.recipe, list(cell.eval_iters), cell.source,
                    list(sweep.eval_overrides), device)


# --------------------------------------------------------------------------------------------
# Worker processes.


def _watch_parent(parent: int) -> None:
    """Stop this worker like a SIGTERM would once its main process has gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _worker(task: CellTask, threads: int, parent: int) -> None:
    """Entry point of a spawned worker: run one cell, report through the exit code.

    0 = done, 3 = failed (the cell's ``ablate_error.json`` says why), 128 + N = stopped by
    signal N.
    """
    import torch

    os.setpgid(0, 0)
    torch.set_num_threads(threads)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    try:
        outcome = run_cell(task)
    except KeyboardInterrupt:
        sys.exit(STOPPED + signal.SIGINT)
    if outcome.status == "stopped":
        sys.exit(STOPPED + int(outcome.signum or signal.SIGINT))
    sys.exit(FAILED if outcome.status == "failed" else 0)


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class Interrupted(Exception):
    """The main process got SIGINT or SIGTERM while cells were running."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`Interrupted` in the main thread (SIGINT already raises)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    old = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _outcome_of(task: CellTask, code: int | None, seconds: float) -> CellOutcome:
    if code == 0:
        return CellOutcome(task.name, "done", seconds=seconds)
    if code is not None and code > STOPPED:
        return CellOutcome(task.name, "stopped", signum=code - STOPPED, seconds=seconds)
    if code is not None and code < 0:
        return CellOutcome(task.name, "stopped", signum=-code, seconds=seconds)
    error = (read_json(Path(task.dir) / ERROR_FILE) or {}).get("error") or f"worker exited with code {code}"
    return CellOutcome(task.name, "failed", error=str(error), seconds=seconds)


def run_parallel(
    tasks: list[CellTask],
    jobs: int,
    threads: int,
    on_done: Callable[[CellOutcome], None],
    on_start: Callable[[CellTask], None],
) -> int | None:
    """Run ``tasks`` in up to ``jobs`` spawned workers; the signal number if interrupted.

    The main process's own signal wins over the SIGINT it forwarded to the workers.
    """
    ctx = multiprocessing.get_context("spawn")
    queue = list(tasks)
    running: dict[Any, tuple[Any, CellTask, float]] = {}
    stopped: int | None = None
    own: int | None = None
    forwarded = 0

    def forward(sig: int) -> None:
        for proc, _task, _t in running.values():
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    while queue or running:
        try:
            while queue and len(running) < jobs and stopped is None:
                task = queue.pop(0)
                proc = ctx.Process(target=_worker, args=(task, threads, os.getpid()), name=f"ablate-{task.name}")
                proc.start()
                running[proc.sentinel] = (proc, task, time.perf_counter())
                on_start(task)
            if not running:
                break
            ready = multiprocessing.connection.wait(list(running), timeout=0.5)
            for sentinel in ready:
                proc, task, t0 = running.pop(sentinel)
                proc.join()
                outcome = _outcome_of(task, proc.exitcode, time.perf_counter() - t0)
                if outcome.status == "stopped" and stopped is None:
                    stopped = outcome.signum
                on_done(outcome)
        except (KeyboardInterrupt, Interrupted) as e:
            own = own or (e.signum if isinstance(e, Interrupted) else int(signal.SIGINT))
            queue.clear()
            forwarded += 1
            forward(signal.SIGINT if forwarded == 1 else signal.SIGTERM)
    return own or stopped


# --------------------------------------------------------------------------------------------
# The whole sweep.


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
    from ..engine.checkpoint import latest_checkpoint

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
    launcher: Launcher | None = None,
) -> SweepOutcome:
    """Run every unfinished cell of an opened sweep (see :func:`open_sweep`).

    ``launcher`` runs the cells (default: :class:`~.launcher.LocalLauncher`). Locally,
    ``threads`` is the torch threads per cell, at most (and by default) ``cores // jobs``;
    one job runs in this process, more in spawned worker processes.
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
    console.print(
        f"sweep {sweep.dir}: {len(sweep.cells)} cell(s), {len(skipped)} finished, {len(pending)} to run"
        + (" as SLURM jobs" if launcher is not None else
           (f" in {jobs} worker processes" if jobs > 1 else "") + f" × {per_cell} torch thread(s)")
    )
    done: list[str] = []
    failed: dict[str, str] = {}
    stopped: int | None = None
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
    with bar, monitor, _sigterm_raises():

        def on_start(task: CellTask) -> None:
            with monitor.lock:
                state.start(task.name)
                cell = state.cells[task.name]
                cell_bars[task.name] = bar.add_task(f"  {task.name}", total=max(1, cell.total),
                                                    completed=cell.done, detail=cell_line(cell))
            refresh()

        def on_done(outcome: CellOutcome) -> None:
            nonlocal stopped
            with monitor.lock:
                state.finish(outcome.name, ok=outcome.status == "done")
                if outcome.name in cell_bars:
                    bar.remove_task(cell_bars.pop(outcome.name))
            log = Path(sweep.dir) / CELLS_DIR / outcome.name / LOG_FILE
            if outcome.status == "done":
                done.append(outcome.name)
                bar.console.print(f"done {outcome.name} ({hms(outcome.seconds)})")
            elif outcome.status == "failed":
                failed[outcome.name] = outcome.error or "failed"
                bar.console.print(f"[red]failed[/] {outcome.name}: {outcome.error} (log: {log})")
            else:
                stopped = stopped or outcome.signum
                bar.console.print(f"stopped {outcome.name} by {signal.Signals(outcome.signum or 2).name}; "
                                  "run the same command again to resume")
            refresh()

        runner = launcher if launcher is not None else LocalLauncher(jobs, per_cell)
        stopped = runner.run(tasks, on_start, on_done) or stopped
    queued = list(getattr(runner, "queued", []))
    return SweepOutcome(skipped, done, failed, stopped, time.perf_counter() - start, queued)
