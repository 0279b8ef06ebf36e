"""Where the cells of a sweep run: here (:class:`LocalLauncher`) or as SLURM jobs (:class:`SlurmLauncher`).

Both take the pending cells' :class:`~.sweep.CellTask` and report through the same two
callbacks, ``on_start(task)`` and ``on_done(outcome)``; :func:`~.sweep.run_sweep` does the
bookkeeping (progress, tables) the same way for both.

A SLURM cell is one job submitted through submitit (never a hand-written sbatch script). Its
job id goes into ``cells/<cell>/ablate_job.json`` the moment ``sbatch`` returns, so a new
``emactl ablate`` (after the driver was killed, even by ``kill -9``) asks SLURM for that job's
state before it submits anything: a queued or running job is waited for, never doubled; a
failed, cancelled, timed-out or preempted one is submitted again and resumes from the cell's
newest checkpoint. The job itself is :class:`CellJob`, whose ``checkpoint()`` lets submitit
requeue it on preemption or time-out (SIGUSR2 ahead of the end).

``EMACTL_SLURM_EXECUTOR=local`` runs the SLURM path's jobs through ``submitit.LocalExecutor``
(processes on this machine that outlive the driver), which is how the tests exercise
submit, skip, resume and preemption without a cluster.
"""
from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import yaml

from ..config import LauncherConfig
from ..errors import UserError
from ..io import write_json, write_text

JOB_FILE = "ablate_job.json"
JOBS_DIR = "slurm"
EXECUTOR_ENV = "EMACTL_SLURM_EXECUTOR"
MISSING = 'emactl ablate --launcher slurm needs submitit: pip install -e ".[slurm]"'
# SLURM states (sacct) in which a job may still run the cell: never submit it again then.
# UNKNOWN is sacct not answering (or not knowing the job yet): not a reason to submit twice.
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED", "RESV_DEL_HOLD"}
RUNNING = {"RUNNING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT"}
ACTIVE = QUEUED | RUNNING | {"UNKNOWN"}

OnStart = Callable[[Any], None]
OnDone = Callable[[Any], None]


class Launcher(Protocol):
    """Runs the pending cells; returns the signal that stopped it, if any."""

    def run(self, tasks: list[Any], on_start: OnStart, on_done: OnDone) -> int | None: ...


# --------------------------------------------------------------------------------------------
# Here: this process (one job) or spawned worker processes (--jobs N).


@dataclass
class LocalLauncher:
    """``--jobs`` cells at once on this machine, ``threads`` torch threads each."""

    jobs: int = 1
    threads: int = 1

    def run(self, tasks: list[Any], on_start: OnStart, on_done: OnDone) -> int | None:
        from .sweep import Interrupted, run_cell, run_parallel

        if self.jobs > 1:
            return run_parallel(tasks, self.jobs, self.threads, on_done, on_start)
        import torch

        own_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            for task in tasks:
                on_start(task)
                outcome = run_cell(task)
                on_done(outcome)
                if outcome.status == "stopped":
                    return outcome.signum
        except (KeyboardInterrupt, Interrupted) as e:
            return e.signum if isinstance(e, Interrupted) else int(signal.SIGINT)
        finally:
            torch.set_num_threads(own_threads)
        return None


# --------------------------------------------------------------------------------------------
# SLURM through submitit.


def torchrun_command(task: Any, gpus: int, recipe_file: Path) -> list[str]:
    """``torchrun`` training the cell on ``gpus`` GPUs of its job, resuming from its newest checkpoint."""
    cell_dir = Path(task.dir)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
            "-m", "emactl", "train", str(recipe_file), "--out", str(cell_dir.parent), "--name", cell_dir.name,
            "--resume", "--no-progress"]


@dataclass
class CellJob:
    """What a SLURM job runs: one cell (train, resume, evaluate), as :func:`~.sweep.run_cell` does here.

    ``checkpoint()`` is submitit's hook on preemption or time-out: the job is requeued with
    this same callable, which resumes the training from the cell's newest checkpoint.
    """

    task: Any
    gpus: int = 1
    threads: int | None = None

    def __call__(self) -> str:
        from .sweep import LOG_FILE, TRAIN_FILE, run_cell

        if self.threads is not None:
            import torch

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
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def import_submitit() -> Any:
    """submitit, or the one-line error naming the ``slurm`` extra."""
    try:
        import submitit
    except ImportError:
        raise UserError(MISSING) from None
    return submitit


def make_executor(folder: Path, settings: LauncherConfig) -> Any:
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
    from .sweep import read_json

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


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class SlurmLauncher:
    """One SLURM job per cell; waits for them (``wait``) or returns once they are all submitted.

    ``threads``: torch threads in each job (default: torch's choice, one per CPU of the job).
    """

    folder: Path
    settings: LauncherConfig
    threads: int | None = None
    wait: bool = True
    poll_s: float = 10.0
    say: Callable[[str], None] = print
    queued: list[str] = field(default_factory=list)
    submitted: list[str] = field(default_factory=list)

    def _submit(self, executor: Any, task: Any) -> dict[str, Any]:
        executor.update_parameters(job_name=f"emactl-{task.name}")
        job = executor.submit(CellJob(task, self.settings.gpus_per_cell, self.threads))
        record = {"job_id": str(job.job_id), "executor": "local" if os.environ.get(EXECUTOR_ENV) == "local" else "slurm",
                  "folder": str(self.folder), "submitted": _now()}
        write_json(Path(task.dir) / JOB_FILE, record)
        self.submitted.append(task.name)
        self.say(f"submitted {task.name} as job {record['job_id']}")
        return record

    def run(self, tasks: list[Any], on_start: OnStart, on_done: OnDone) -> int | None:
        from .sweep import CellOutcome, Interrupted

        executor = make_executor(self.folder, self.settings)
        live: dict[str, tuple[Any, dict[str, Any]]] = {}
        try:
            for task in tasks:
                Path(task.dir).mkdir(parents=True, exist_ok=True)
                record = read_job(Path(task.dir))
                state = job_state(record) if record is not None else None
                if record is not None and state in ACTIVE:
                    self.say(f"{task.name}: job {record['job_id']} is {str(state).lower()}; not submitted again")
                else:
                    record = self._submit(executor, task)
                live[task.name] = (task, record)
                on_start(task)
            while live and self.wait:
                for name, (task, record) in list(live.items()):
                    if job_state(record) in ACTIVE:
                        continue
                    del live[name]
                    on_done(self._outcome(task, record, CellOutcome))
                if live:
                    time.sleep(self.poll_s)
        except (KeyboardInterrupt, Interrupted) as e:
            self.queued = list(live)
            self.say(f"stopped waiting; {len(live)} submitted job(s) go on; `emactl ablate --status DIR` shows them")
            return e.signum if isinstance(e, Interrupted) else int(signal.SIGINT)
        self.queued = list(live)
        return None

    def _outcome(self, task: Any, record: dict[str, Any], outcome: Any) -> Any:
        from .sweep import ERROR_FILE, read_json

        if task.finished():
            return outcome(task.name, "done")
        error = (read_json(Path(task.dir) / ERROR_FILE) or {}).get("error")
        return outcome(task.name, "failed", error=error or f"job {record['job_id']} ended unfinished "
                       f"({job_state(record).lower()}); run the same command again to resubmit it")


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
    from .progress import last_train_record
    from .sweep import ERROR_FILE, LOG_FILE, TRAIN_FILE, cell_finished

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
    from .sweep import CELLS_DIR, SWEEP_FILE, read_json

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
