"""``emactl train``: train a recipe into a run directory, then evaluate it on the val split."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import load_recipe, validate
from ..errors import UserError
from ..options import device_option, out_option, progress_option, set_option, threads_option

STEPS_HELP = "Training steps, i.e. optimiser iterations (overrides train.iters)."


def deprecated_iters(iters: int | None, steps: int | None) -> int | None:
    """The training length from ``--steps``, or from the old spelling ``--iters`` with a warning.

    ``train --iters`` was renamed ``--steps`` because everywhere else (eval, ablate, profile)
    ``--iters`` means EM iterations T; the old spelling is accepted for one more release.
    """
    for option, value in (("--steps", steps), ("--iters", iters)):
        if value is not None and value < 1:
            raise UserError(f"{option}: must be >= 1, got {value}")
    if iters is None:
        return steps
    if steps is not None:
        raise UserError("--iters is the old name of --steps; give --steps only")
    typer.echo("warning: `emactl train --iters` is deprecated and will be removed in the next release; "
               "use --steps (training steps) instead", err=True)
    return iters


def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML file.", metavar="RECIPE", show_default=False),
    set_: list[str] = set_option("Override a recipe key, e.g. train.lr=0.01 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its newest checkpoint."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name (default: the recipe's name).",
                                       metavar="NAME", show_default=False),
    out: Optional[Path] = out_option("Parent folder of the run (default: the recipe's out_dir)."),
    steps: Optional[int] = typer.Option(None, "--steps", help=STEPS_HELP, metavar="N", show_default=False),
    iters: Optional[int] = typer.Option(None, "--iters", hidden=True, metavar="N",
                                        help="Deprecated spelling of --steps."),
    device: Optional[str] = device_option(None, "the recipe's train.device"),
    threads: Optional[int] = threads_option(),
    progress: bool = progress_option(),
) -> None:
    """Train (SGD + poly LR, AMP, accumulation, torchrun DDP), checkpointing into runs/NAME.

    SIGINT/SIGTERM save a checkpoint and exit with 130/143; --resume continues exactly.
    """
    import torch

    from ..engine.trainer import train as train_recipe

    if threads is not None and threads < 1:
        raise UserError(f"--threads: must be >= 1, got {threads}")
    steps = deprecated_iters(iters, steps)
    r = load_recipe(recipe, list(set_))
    if name is not None:
        r.name = name
    if out is not None:
        r.out_dir = str(out)
    if steps is not None:
        r.train.iters = steps
    if device is not None:
        r.train.device = device
    validate(r, "command line")
    if threads is not None:
        torch.set_num_threads(threads)
    result = train_recipe(r, resume=resume, progress=progress)
    if result.stopped_by is not None:
        raise typer.Exit(128 + result.stopped_by)
