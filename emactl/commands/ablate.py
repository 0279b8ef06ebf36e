"""``emactl ablate``: reproduce the paper's ablations in one resumable command."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError

LIST = "Comma-separated list, e.g. "


def register(app: typer.Typer) -> None:
    @app.command("ablate")
    def ablate_command(
        iters: Optional[str] = typer.Option(None, "--iters", help=LIST + "1,3,5: EM iterations T in training and evaluation alike."),
        train_iters: Optional[str] = typer.Option(None, "--train-iters", help=LIST + "1,3,5: T in training (with --eval-iters: the train T × eval T grid)."),
        eval_iters: Optional[str] = typer.Option(None, "--eval-iters", help=LIST + "1,2,3,4,5: T at test time; evaluates every trained cell, no training."),
        bases_update: Optional[str] = typer.Option(None, "--bases-update", help=LIST + "moving_average,backprop,none (backprop cells train with grad=full)."),
        norm: Optional[str] = typer.Option(None, "--norm", help=LIST + "l2,layernorm,none: normalisation of the bases."),
        grad: Optional[str] = typer.Option(None, "--grad", help=LIST + "none,last,full: gradient through the EM iterations."),
        heads: Optional[str] = typer.Option(None, "--heads", help=LIST + "ema,nonlocal,a2,fcn,aspp,psp: the context module."),
        bases: Optional[str] = typer.Option(None, "--bases", help=LIST + "16,32,64,128: number of bases K."),
        momentum: Optional[str] = typer.Option(None, "--momentum", help=LIST + "0.5,0.9: weight of the old bases in the moving average."),
        set_: list[str] = typer.Option([], "--set", help="KEY=V1,V2 sweeps any recipe key; KEY=V is a plain override, e.g. train.iters=100 (repeatable)."),
        recipe: Optional[Path] = typer.Option(None, "--recipe", help="Recipe to train the cells from (default: recipes/shapes.yaml)."),
        source: Optional[Path] = typer.Option(None, "--from", help="Trained run dir or checkpoint: evaluate it at --eval-iters (no training)."),
        seeds: int = typer.Option(1, "--seeds", help="Repeat every cell with train.seed + 0..N-1 and report mean ± std."),
        out: Optional[Path] = typer.Option(None, "--out", help="Sweep directory (default: sweeps/<name from the axes>)."),
        jobs: int = typer.Option(1, "--jobs", "-j", help="Cells trained in parallel worker processes (CPU threads are split between them)."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads per cell (default and maximum: cores // jobs)."),
        device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (overrides train.device)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    ) -> None:
        """Train and evaluate one run per cell of the axes' grid; write tidy tables, pivots and a plot.

        Re-running the same command skips finished cells and resumes interrupted ones.
        """
        from ..ablate import parse_axes, run_ablation

        if recipe is not None and source is not None:
            raise UserError("--recipe and --from exclude each other: train cells from a recipe, or evaluate a trained run")
        if seeds < 1:
            raise UserError(f"--seeds: must be >= 1, got {seeds}")
        if jobs < 1:
            raise UserError(f"--jobs: must be >= 1, got {jobs}")
        if threads is not None and threads < 1:
            raise UserError(f"--threads: must be >= 1, got {threads}")
        axes = parse_axes(
            iters=iters, train_iters=train_iters, eval_iters=eval_iters, bases_update=bases_update, norm=norm,
            grad=grad, heads=heads, bases=bases, momentum=momentum, sets=set_,
        )
        result = run_ablation(axes, recipe=recipe, source=source, seeds=seeds, out=out, jobs=jobs, device=device,
                              progress=progress, threads=threads)
        outcome = result.outcome
        if outcome.stopped_by is not None:
            raise typer.Exit(128 + outcome.stopped_by)
        if outcome.failed:
            name, error = next(iter(outcome.failed.items()))
            raise UserError(
                f"{len(outcome.failed)} of {len(outcome.skipped) + len(outcome.done) + len(outcome.failed)} cells failed "
                f"(first: {name}: {error}); see {result.sweep_dir}/cells/{name}/ablate.log and run again to retry"
            )
