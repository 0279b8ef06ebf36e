"""One cell of a sweep, and where it runs: in this process, in spawned worker processes
(``--jobs N``) or as SLURM jobs through submitit.

The three places are :class:`Executor` s and :func:`run_cells` drives any of them the same
way: at most ``slots`` cells at once, each ended cell reported through ``on_done``, a failed
cell never stopping the others, a Ctrl-C or SIGTERM ending the submissions. What a cell left
in its directory says how it ended (:func:`outcome_of`), wherever it ran.

With ``--jobs N`` each cell runs in its own spawned process, so that CUDA state and torch's
thread pool are its own, with ``threads`` torch threads. The workers sit in their own process
group: a Ctrl-C reaches only the main process, which forwards exactly one SIGINT to each
worker (the trainer then saves a checkpoint and stops; a second Ctrl-C forwards SIGTERM) and
waits for them. A worker whose main process has died stops the same way, so none trains on
as an orphan.

A SLURM cell is one job submitted through submitit (never a hand-written sbatch script). Its
job id goes into ``cells/<cell>/ablate_job.json`` the moment ``sbatch`` returns, so a new
``emactl ablate`` (after the driver was killed, even by ``kill -9``) asks SLURM for that job's
state before it submits anything: a queued or running job is waited for, never doubled; a
failed, cancelled, timed-out or preempted one is submitted again and resumes from the cell's
newest checkpoint. The job itself is :class:`CellJob`, whose ``checkpoint()`` lets submitit
requeue it on preemption or time-out (SIGUSR2 ahead of the end). A Ctrl-C only stops waiting.

``EMACTL_SLURM_EXECUTOR=local`` runs the SLURM path's jobs through ``submitit.LocalExecutor``
(processes on this machine that outlive the driver), which is how the tests exercise
submit, skip, resume and preemption without a cluster.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
import yaml

from ..config import LauncherConfig, from_dict
from ..data import build_dataset
from ..engine import trainer
from ..engine.checkpoint import checkpoint_path, load_checkpoint, resolve_checkpoint
from ..engine.evaluate import evaluate, load_for_eval
from ..errors import UserError
from ..io import write_json, write_text
from ..nn.emanet import ema_units, set_eval_iters
from .progress import last_train_record

# The names in a sweep directory (see :mod:`.sweep`).
SWEEP_FILE = "sweep.json"
CELLS_DIR = "cells"
TRAIN_FILE = "ablate_train.json"
ERROR_FILE = "ablate_error.json"
LOG_FILE = "ablate.log"
JOB_FILE = "ablate_job.json"
JOBS_DIR = "slurm"
EXECUTOR_ENV = "EMACTL_SLURM_EXECUTOR"
MISSING = 'emactl ablate --launcher slurm needs submitit: pip install -e ".[slurm]"'
# SLURM states (sacct) in which a job may still run the cell: never submit it again then.
# UNKNOWN is sacct not answering (or not knowing the job yet): not a reason to submit twice.
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED", "RESV_DEL_HOLD"}
RUNNING = {"RUNNING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT"}
ACTIVE = QUEUED | RUNNING | {"UNKNOWN"}
STOPPED = 128  # a worker stopped by signal N exits with 128 + N, as `emactl train` does


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


def _train_cell(task: CellTask) -> int | None:
    """Train the cell unless it is trained already; the signal number if a signal stopped it."""
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
            result = trainer.train(recipe, cell_dir, resume=True, progress=False)
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
    params = int(sum(p.numel() for p in run.model.parameters()))
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
    (cell_dir / ERROR_FILE).unlink(missing_ok=True)
    with _logged(cell_dir / LOG_FILE) as log:
        try:
            signum = _train_cell(task)
            if signum is not None:
                return CellOutcome(task.name, "stopped", signum=signum)
            _eval_cell(task)
        except Exception as e:  # noqa: BLE001 - one failed cell must not end the sweep
            message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            if not isinstance(e, UserError):
                message = f"{type(e).__name__}: {message}"
                traceback.print_exc(file=log)
            else:
                print(f"error: {message}", file=log)
            write_json(cell_dir / ERROR_FILE, {"error": message})
            return CellOutcome(task.name, "failed", error=message)
    return CellOutcome(task.name, "done")


def outcome_of(task: CellTask, signum: int | None, unfinished: str) -> CellOutcome:
    """How a cell that ran in another process ended, from its directory: done (every result
    written), else stopped by ``signum``, else failed as its ``ablate_error.json`` (or ``unfinished``) says."""
    if task.finished():
        return CellOutcome(task.name, "done")
    if signum is not None:
        return CellOutcome(task.name, "stopped", signum=signum)
    error = (read_json(Path(task.dir) / ERROR_FILE) or {}).get("error")
    return CellOutcome(task.name, "failed", error=str(error or unfinished))


# --------------------------------------------------------------------------------------------
# Running the cells through an executor.

Running = dict[str, tuple[CellTask, Any]]  # cell name → (task, what the executor's submit returned)


class Executor(Protocol):
    """Where cells run. ``slots``: cells at once; ``wait``: wait for them to end (else return
    once all are submitted); ``where``: how the sweep's first line says it."""

    slots: int
    wait: bool
    where: str

    def submit(self, task: CellTask) -> Any:
        """Start the cell; a handle for :meth:`ended`."""

    def ended(self, running: Running) -> dict[str, CellOutcome]:
        """The running cells that have ended by now (after waiting a little when none has)."""

    def interrupt(self, running: Running, count: int) -> bool:
        """The ``count``-th Ctrl-C or SIGTERM: stop the running cells and wait for them (True) or leave them (False)."""


class Interrupted(Exception):
    """The main process got SIGTERM while cells were running (SIGINT raises KeyboardInterrupt)."""

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


def run_cells(
    executor: Executor, tasks: list[CellTask], on_start: Callable[[CellTask], None],
    on_done: Callable[[CellOutcome], None],
) -> tuple[int | None, list[str]]:
    """Run ``tasks`` through ``executor``; the signal that stopped the sweep (this process's own
    wins over a cell's) and the cells left running (SLURM jobs not waited for)."""
    queue = list(tasks)
    running: Running = {}
    started: dict[str, float] = {}
    own: int | None = None
    stopped: int | None = None
    interrupts = 0
    with _sigterm_raises():
        while running or (queue and own is None and stopped is None):
            try:
                while queue and len(running) < executor.slots and own is None and stopped is None:
                    task = queue.pop(0)
                    on_start(task)
                    started[task.name] = time.perf_counter()
                    running[task.name] = (task, executor.submit(task))
                if not executor.wait:
                    break
                for name, outcome in executor.ended(running).items():
                    del running[name]
                    stopped = stopped or outcome.signum
                    on_done(dataclasses.replace(outcome, seconds=time.perf_counter() - started[name]))
            except (KeyboardInterrupt, Interrupted) as e:
                own = own or (e.signum if isinstance(e, Interrupted) else int(signal.SIGINT))
                interrupts += 1
                if not executor.interrupt(running, interrupts):
                    break
    return own or stopped, list(running)


@dataclass
class InProcessExecutor:
    """``--jobs 1``: the cells one after another in this process, with ``threads`` torch threads."""

    threads: int
    slots: int = 1
    wait: bool = True

    @property
    def where(self) -> str:
        return f" × {self.threads} torch thread(s)"

    def submit(self, task: CellTask) -> CellOutcome:
        own = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return run_cell(task)
        finally:
            torch.set_num_threads(own)

    def ended(self, running: Running) -> dict[str, CellOutcome]:
        return {name: outcome for name, (_, outcome) in running.items()}

    def interrupt(self, running: Running, count: int) -> bool:
        return False  # the interrupt has ended the cell of this process already


def _watch_parent(parent: int) -> None:
    """Stop this worker like a SIGTERM would once its main process has gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _worker(task: CellTask, threads: int, parent: int) -> None:
    """A spawned worker: run one cell, exit with 128 + N if signal N stopped it, else 0 (the
    cell's directory says whether it is done or failed)."""
    os.setpgid(0, 0)
    torch.set_num_threads(threads)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    try:
        outcome = run_cell(task)
    except KeyboardInterrupt:
        sys.exit(STOPPED + signal.SIGINT)
    sys.exit(STOPPED + (outcome.signum or signal.SIGINT) if outcome.status == "stopped" else 0)


@dataclass
class SpawnExecutor:
    """``--jobs N``: up to ``slots`` cells at once, each in its own spawned worker process."""

    slots: int
    threads: int
    wait: bool = True

    @property
    def where(self) -> str:
        return f" in {self.slots} worker processes × {self.threads} torch thread(s)"

    def submit(self, task: CellTask) -> Any:
        proc = multiprocessing.get_context("spawn").Process(
            target=_worker, args=(task, self.threads, os.getpid()), name=f"ablate-{task.name}")
        proc.start()
        return proc

    def ended(self, running: Running) -> dict[str, CellOutcome]:
        multiprocessing.connection.wait([proc.sentinel for _, proc in running.values()], timeout=0.5)
        ended = {}
        for name, (task, proc) in running.items():
            code = proc.exitcode
            if code is not None:
                signum = code - STOPPED if code > STOPPED else -code if code < 0 else None
                ended[name] = outcome_of(task, signum, f"worker exited with code {code}")
        return ended

    def interrupt(self, running: Running, count: int) -> bool:
        for _, proc in running.values():
            if proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGINT if count == 1 else signal.SIGTERM)
        return True


# --------------------------------------------------------------------------------------------
# SLURM through submitit.


def torchrun_command(task: CellTask, gpus: int, recipe_file: Path) -> list[str]:
    """``torchrun`` training the cell on ``gpus`` GPUs of its job, resuming from its newest checkpoint."""
    cell_dir = Path(task.dir)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
            "-m", "emactl", "train", str(recipe_file), "--out", str(cell_dir.parent), "--name", cell_dir.name,
            "--resume", "--no-progress"]


@dataclass
class CellJob:
    """What a SLURM job runs: one cell (train, resume, evaluate), as :func:`run_cell` does here.

    ``checkpoint()`` is submitit's hook on preemption or time-out: the job is requeued with
    this same callable, which resumes the training from the cell's newest checkpoint.
    """

    task: CellTask
    gpus: int = 1
    threads: int | None = None

    def __call__(self) -> str:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        cell_dir = Path(self.task.dir)
        if self.gpus > 1 and self.task.source is None and not (cell_dir / TRAIN_FILE).is_file():
            recipe_file = cell_dir / "ablate_recipe.yaml"
            write_text(recipe_file, yaml.safe_dump(self.task.recipe, sort_keys=False))
            with open(cell_dir / LOG_FILE, "a") as log:
                code = subprocess.call(torchrun_command(self.task, self.gpus, recipe_file), stdout=log,
                                       stderr=subprocess.STDOUT)
            if code != 0:
                raise RuntimeError(f"torchrun exited with code {code}; see {cell_dir / LOG_FILE}")
        outcome = run_cell(self.task)
        if outcome.status == "failed":
            raise RuntimeError(f"cell {self.task.name} failed: {outcome.error}")
        return outcome.status

    def checkpoint(self) -> Any:
        return import_submitit().helpers.DelayedSubmission(self)


def import_submitit() -> Any:
    """submitit (an optional extra, so imported only here), or the one-line error naming the ``slurm`` extra."""
    try:
        import submitit
    except ImportError:
        raise UserError(MISSING) from None
    return submitit


def submitit_executor(folder: Path, settings: LauncherConfig) -> Any:
    """A submitit executor with the sweep's SLURM parameters (a local one under ``EMACTL_SLURM_EXECUTOR=local``)."""
    submitit = import_submitit()
    if os.environ.get(EXECUTOR_ENV) == "local":
        executor = submitit.LocalExecutor(folder)
        executor.update_parameters(timeout_min=settings.time_min)
        return executor
    for command in ("sbatch", "srun"):
        if shutil.which(command) is None:
            raise UserError(f"--launcher slurm: no `{command}` on PATH; run on a SLURM login node or use --launcher local")
    executor = submitit.SlurmExecutor(folder)
    params: dict[str, Any] = {
        "time": settings.time_min,
        "nodes": 1,
        "ntasks_per_node": 1,
        "signal_delay_s": 120,
        "additional_parameters": {"requeue": True},
    }
    if settings.gpus_per_cell > 0:
        params["gpus_per_node"] = settings.gpus_per_cell
    if settings.partition:
        params["partition"] = settings.partition
    if settings.account:
        params["account"] = settings.account
    executor.update_parameters(**params)
    return executor


def read_job(cell_dir: Path) -> dict[str, Any] | None:
    record = read_json(cell_dir / JOB_FILE)
    return record if record is not None and record.get("job_id") else None


def _local_state(record: dict[str, Any]) -> str:
    """The state of a job of submitit's local executor (its controller's pid), from any process."""
    pid = int(record["job_id"])
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "COMPLETED"
    if b"submitit" not in cmdline or stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return "COMPLETED"  # gone (a zombie, or another process that took the pid)
    return "RUNNING"


def job_state(record: dict[str, Any]) -> str:
    """The job's state as SLURM's sacct words it (``PENDING``, ``RUNNING``, ``FAILED``...; ``UNKNOWN``)."""
    if record.get("executor") == "local":
        return _local_state(record)
    submitit = import_submitit()
    job = submitit.SlurmJob(record["folder"], str(record["job_id"]))
    state = str(job.watcher.get_state(str(record["job_id"]), mode="force") or "UNKNOWN")
    return state.split()[0].upper() if state.strip() else "UNKNOWN"


@dataclass
class SlurmExecutor:
    """One SLURM job per cell, all submitted at once; waited for (``wait``) or left to run.

    ``threads``: torch threads in each job (default: torch's choice, one per CPU of the job).
    """

    folder: Path
    settings: LauncherConfig
    threads: int | None = None
    wait: bool = True
    poll_s: float = 10.0
    say: Callable[[str], None] = print
    slots: int = sys.maxsize
    where: str = " as SLURM jobs"
    _submitit: Any = field(default=None, repr=False)

    def submit(self, task: CellTask) -> dict[str, Any]:
        """Submit the cell's job, unless its last one may still run (then that one is waited for)."""
        if self._submitit is None:
            self._submitit = submitit_executor(self.folder, self.settings)
        cell_dir = Path(task.dir)
        cell_dir.mkdir(parents=True, exist_ok=True)
        record = read_job(cell_dir)
        state = job_state(record) if record is not None else None
        if record is not None and state in ACTIVE:
            self.say(f"{task.name}: job {record['job_id']} is {str(state).lower()}; not submitted again")
            return record
        self._submitit.update_parameters(job_name=f"emactl-{task.name}")
        job = self._submitit.submit(CellJob(task, self.settings.gpus_per_cell, self.threads))
        record = {"job_id": str(job.job_id), "executor": "local" if os.environ.get(EXECUTOR_ENV) == "local" else "slurm",
                  "folder": str(self.folder),
                  "submitted": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        write_json(cell_dir / JOB_FILE, record)
        self.say(f"submitted {task.name} as job {record['job_id']}")
        return record

    def ended(self, running: Running) -> dict[str, CellOutcome]:
        ended = {}
        for name, (task, record) in running.items():
            state = job_state(record)
            if state not in ACTIVE:
                ended[name] = outcome_of(task, None, f"job {record['job_id']} ended unfinished ({state.lower()}); "
                                         "run the same command again to resubmit it")
        if not ended:
            time.sleep(self.poll_s)
        return ended

    def interrupt(self, running: Running, count: int) -> bool:
        self.say(f"stopped waiting; {len(running)} submitted job(s) go on; `emactl ablate --status DIR` shows them")
        return False


# --------------------------------------------------------------------------------------------
# emactl ablate --status SWEEP


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def cell_status(cell_dir: Path, eval_iters: list[int | None] | None, total: int | None) -> tuple[str, str]:
    """``(state, detail)`` of one cell: done, queued, running (iteration), failed (last log line),
    stopped (iteration of its newest checkpoint) or not started."""
    trained = (cell_dir / TRAIN_FILE).is_file()
    if eval_iters is not None:
        done = cell_finished(cell_dir, eval_iters)
    else:  # a sweep.json from before cell_eval_iters was recorded
        done = trained and any(cell_dir.glob("ablate_eval*.json"))
    if done:
        return "done", ""
    record = read_job(cell_dir)
    state = job_state(record) if record is not None else None
    job = f"job {record['job_id']}" if record is not None else ""
    record_it = last_train_record(cell_dir)
    it = f"it {int(record_it['iter']) if record_it is not None else 0}" + (f"/{total}" if total else "")
    if state in QUEUED:
        return "queued", f"{job} {state.lower()}"
    if state in RUNNING:
        return "running", f"{job} · {'evaluating' if trained else it}"
    if state == "UNKNOWN":
        return "submitted", f"{job} (sacct gives no state)"
    if (cell_dir / ERROR_FILE).is_file() or (state is not None and state != "COMPLETED"):
        line = _last_line(cell_dir / LOG_FILE) or f"{job} {state.lower() if state else ''}".strip()
        return "failed", line
    if record_it is not None:
        return "stopped", it
    return "not started", ""


def sweep_status(sweep_dir: Path) -> list[tuple[str, str, str]]:
    """``(cell, state, detail)`` for every cell of the sweep in ``sweep_dir``."""
    spec = read_json(sweep_dir / SWEEP_FILE)
    if spec is None:
        raise UserError(f"{sweep_dir}: not an ablation sweep directory (no readable {SWEEP_FILE})")
    evals = spec.get("cell_eval_iters") if isinstance(spec.get("cell_eval_iters"), dict) else {}
    total = (spec.get("recipe") or {}).get("train", {}).get("iters") if spec.get("source") == "recipe" else None
    rows = []
    for name in spec.get("cells") or []:
        state, detail = cell_status(sweep_dir / CELLS_DIR / str(name), evals.get(name), total)
        rows.append((str(name), state, detail))
    return rows
