"""``emactl ablate``: reproduce the paper's ablations in one resumable command."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

import typer

from ..config import LauncherConfig, choices
from ..errors import UserError
from ..options import DerivedCommand, device_option, out_option, progress_option, set_option, threads_option

LIST = "Comma-separated list, e.g. "
HELP = {
    "iters": LIST + "1,3,5: EM iterations T in training and evaluation alike.",
    "set": "KEY=V1,V2 sweeps any recipe key; KEY=V is a plain override, e.g. train.iters=100 (repeatable).",
    "recipe": "Recipe to train the cells from (default: recipes/shapes.yaml).",
    "from": "Trained run dir or checkpoint: evaluate it at --eval-iters (no training).",
    "seeds": "Repeat every cell with train.seed + 0..N-1 and report mean ± std.",
    "out": "Sweep directory (default: sweeps/<name from the axes>).",
    "jobs": "Cells trained at once, in worker processes (the CPU cores are split between them).",
    "threads": "Torch threads per cell (default and maximum: cores // jobs; in a SLURM job: torch's choice).",
    "launcher": "Where training cells run: local (processes here, --jobs) or slurm (one SLURM job per cell, "
                "through submitit; default: the recipe's launcher.kind, else local).",
    "partition": "SLURM partition of the cells' jobs (default: the recipe's launcher.partition).",
    "gpus": "GPUs per cell's job; more than one trains with torchrun inside the job (default: 1).",
    "time": "Time limit of each cell's job, in minutes (default: 1440).",
    "account": "SLURM account charged for the cells' jobs.",
    "wait": "With --launcher slurm: wait for the jobs and write the tables (--no-wait: submit and return).",
    "status": "Show each cell of the sweep in DIR (done, queued, running at iteration N, failed) and exit.",
}

def _axis(option: str, help: str | None = None) -> Any:
    return typer.Option(None, option, help=help, metavar="LIST", show_default=False)


class AblateCommand(DerivedCommand):
    """``emactl ablate``, with one option per ablation axis of :data:`emactl.ablate.axes.AXES`
    (after ``--iters``), each listing the values it takes."""

    def parameters(self) -> list[inspect.Parameter]:
        from ..ablate.axes import AXES  # choice axes list the head registry, which imports torch

        axes = [
            inspect.Parameter(spec.param, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=_axis(spec.option, spec.help()),
                              annotation=Optional[str])
            for spec in AXES.values()
        ]
        parameters = []
        for p in inspect.signature(self.function).parameters.values():
            if p.kind is not inspect.Parameter.VAR_KEYWORD:
                parameters.append(p)
            if p.name == "iters":
                parameters += axes
        return parameters


def ablate(
    iters: Optional[str] = _axis("--iters", HELP["iters"]),
    set_: list[str] = set_option(HELP["set"]),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help=HELP["recipe"], metavar="RECIPE",
                                          show_default=False),
    source: Optional[Path] = typer.Option(None, "--from", help=HELP["from"], metavar="RUN", show_default=False),
    seeds: int = typer.Option(1, "--seeds", help=HELP["seeds"], metavar="N"),
    out: Optional[Path] = out_option(HELP["out"]),
    jobs: int = typer.Option(1, "--jobs", "-j", help=HELP["jobs"], metavar="N"),
    threads: Optional[int] = threads_option(HELP["threads"]),
    device: Optional[str] = device_option(None, "the recipe's train.device"),
    progress: bool = progress_option(),
    launcher: Optional[str] = typer.Option(None, "--launcher", help=HELP["launcher"], metavar="LAUNCHER",
                                           show_default=False),
    slurm_partition: Optional[str] = typer.Option(None, "--slurm-partition", help=HELP["partition"],
                                                  metavar="NAME", show_default=False),
    slurm_gpus: Optional[int] = typer.Option(None, "--slurm-gpus-per-cell", help=HELP["gpus"], metavar="N",
                                             show_default=False),
    slurm_time: Optional[int] = typer.Option(None, "--slurm-time", help=HELP["time"], metavar="MINUTES",
                                             show_default=False),
    slurm_account: Optional[str] = typer.Option(None, "--slurm-account", help=HELP["account"],
                                                metavar="NAME", show_default=False),
    wait: bool = typer.Option(True, "--wait/--no-wait", help=HELP["wait"]),
    status: Optional[Path] = typer.Option(None, "--status", help=HELP["status"], metavar="DIR",
                                          show_default=False),
    **axes: Optional[str],
) -> None:
    """Train and evaluate one run per cell of the axes' grid; write tidy tables, pivots and a plot.

    Re-running the same command skips finished cells and resumes interrupted ones.
    """
    from ..ablate import parse_axes, run_ablation

    if status is not None:
        given = [o for o, v in (("--recipe", recipe), ("--from", source), ("--out", out), ("--launcher", launcher))
                 if v is not None]
        if given or iters is not None or any(v is not None for v in axes.values()) or set_:
            raise UserError(f"--status DIR only shows a sweep; drop {', '.join(given) or 'the axes'}")
        _show_status(status)
        return
    launchers = choices(LauncherConfig, "kind")
    if launcher is not None and launcher not in launchers:
        raise UserError(f"--launcher: got {launcher!r}; choose one of: {', '.join(launchers)}")
    for option, number, least in (("--slurm-gpus-per-cell", slurm_gpus, 0), ("--slurm-time", slurm_time, 1)):
        if number is not None and number < least:
            raise UserError(f"{option}: must be >= {least}, got {number}")
    if recipe is not None and source is not None:
        raise UserError(
            "--recipe and --from exclude each other: train cells from a recipe, or evaluate a trained run"
        )
    for option, value in (("--seeds", seeds), ("--jobs", jobs), ("--threads", threads)):
        if value is not None and value < 1:
            raise UserError(f"{option}: must be >= 1, got {value}")
    result = run_ablation(parse_axes(iters=iters, sets=set_, **axes), recipe=recipe, source=source, seeds=seeds, out=out, jobs=jobs, device=device,
                          progress=progress, threads=threads, wait=wait,
                          launcher={"kind": launcher, "partition": slurm_partition, "gpus_per_cell": slurm_gpus,
                                    "time_min": slurm_time, "account": slurm_account})
    outcome = result.outcome
    if outcome.queued:
        typer.echo(f"{len(outcome.queued)} cell(s) queued or running as SLURM jobs; `emactl ablate --status "
                   f"{result.sweep_dir}` shows them; run the same command again for the full tables", err=True)
    if outcome.stopped_by is not None:
        raise typer.Exit(128 + outcome.stopped_by)
    if outcome.failed:
        total = len(outcome.skipped) + len(outcome.done) + len(outcome.failed)
        name, error = next(iter(outcome.failed.items()))
        raise UserError(
            f"{len(outcome.failed)} of {total} cells failed (first: {name}: {error}); "
            f"see {result.sweep_dir}/cells/{name}/ablate.log and run again to retry"
        )


def _show_status(sweep_dir: Path) -> None:
    """Print one line per cell: name, state, detail."""
    from ..ablate.launcher import sweep_status

    rows = sweep_status(sweep_dir)
    width = max((len(name) for name, _, _ in rows), default=4)
    for name, state, detail in rows:
        typer.echo(f"{name:<{width}}  {state:<11}  {detail}".rstrip())
    counts: dict[str, int] = {}
    for _, state, _ in rows:
        counts[state] = counts.get(state, 0) + 1
    typer.echo(", ".join(f"{n} {state}" for state, n in counts.items()) or "no cells")
