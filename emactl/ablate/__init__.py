"""``emactl ablate``: the paper's ablations (T, bases update × normalisation, grad, heads, K...)
as one resumable sweep.

* :mod:`.axes` parses the comma-separated axis options and expands them into cells;
* :mod:`.sweep` owns the sweep directory and runs the cells (resume, progress);
* :mod:`.launcher` runs one cell, through one executor interface: in this process, in
  ``--jobs`` worker processes or as a SLURM job through submitit;
* :mod:`.report` rebuilds the tidy table, the pivots and the plots from the cells.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..progress import hms
from ..tables import describe_paths
from .axes import Axes, parse_axes
from .launcher import EXECUTOR_ENV, JOBS_DIR, SlurmExecutor, import_submitit
from .report import write_report
from .sweep import SweepOutcome, check_sweep, console, open_sweep, plan_from, plan_recipe, run_sweep, sweep_lock

__all__ = ["AblationResult", "Axes", "parse_axes", "run_ablation"]


@dataclass
class AblationResult:
    """The sweep directory, the tidy results table, the files written and what the run did."""

    sweep_dir: Path
    results: pd.DataFrame
    paths: list[Path]
    outcome: SweepOutcome


def run_ablation(
    axes: Axes,
    recipe: Path | None = None,
    source: Path | None = None,
    seeds: int = 1,
    out: Path | None = None,
    jobs: int = 1,
    device: str | None = None,
    progress: bool = True,
    show: bool = True,
    threads: int | None = None,
    launcher: dict[str, Any] | None = None,
    wait: bool = True,
) -> AblationResult:
    """Plan, run (or resume) and report a sweep.

    ``recipe`` trains one run per cell (default ``recipes/shapes.yaml``); ``source`` (a run
    directory or checkpoint) instead evaluates that run at the eval-side values only. The
    tables and figures are rebuilt from the cell directories at the end, also after failures
    or an interruption.

    ``launcher`` overrides keys of the recipe's ``launcher:`` section (``kind``, ``partition``,
    ``gpus_per_cell``, ``time_min``, ``account``); with ``kind`` slurm the train-side cells are
    SLURM jobs, waited for unless ``wait`` is false.
    """
    sweep = plan_from(source, axes, seeds, out) if source is not None else plan_recipe(recipe, axes, seeds, out)
    settings = dataclasses.replace(sweep.launcher, **{k: v for k, v in (launcher or {}).items() if v is not None})
    executor = None
    if settings.kind == "slurm":
        import_submitit()
        if source is not None:
            console.print("note: --from evaluates a trained run, here; --launcher slurm submits training cells only")
        else:
            poll = 1.0 if os.environ.get(EXECUTOR_ENV) == "local" else 30.0
            executor = SlurmExecutor(sweep.dir / JOBS_DIR, settings, threads, wait=wait, poll_s=poll,
                                     say=lambda text: console.print(text, markup=False))
    check_sweep(sweep)
    with sweep_lock(sweep.dir):
        open_sweep(sweep)
        for note in sweep.notes:
            console.print(note)
        outcome = run_sweep(sweep, jobs=jobs, device=device, progress=progress, threads=threads,
                            executor=executor)
        results, paths = write_report(sweep, show=show)
    console.print(f"wrote {describe_paths(paths)} in {hms(outcome.seconds)}", markup=False)
    return AblationResult(sweep.dir, results, paths, outcome)
