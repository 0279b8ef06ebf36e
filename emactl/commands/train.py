"""``emactl train``: train a recipe into a run directory, then evaluate it on the val split."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_command(
        recipe: Path = typer.Argument(..., help="Recipe YAML file."),
        set_: list[str] = typer.Option([], "--set", help="Override a recipe key, e.g. train.lr=0.01 (repeatable)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run from its newest checkpoint."),
        name: Optional[str] = typer.Option(None, "--name", help="Run name (default: the recipe's name)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Parent folder of the run (default: the recipe's out_dir)."),
        iters: Optional[int] = typer.Option(None, "--iters", help="Training iterations (overrides train.iters)."),
        device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (overrides train.device)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    ) -> None:
        """Train (SGD + poly LR, AMP, accumulation, torchrun DDP), checkpointing into runs/NAME.

        SIGINT/SIGTERM save a checkpoint and exit with 130/143; --resume continues exactly.
        """
        from ..config import load_recipe, validate
        from ..engine.trainer import train

        r = load_recipe(recipe, list(set_))
        if name is not None:
            r.name = name
        if out is not None:
            r.out_dir = str(out)
        if iters is not None:
            r.train.iters = iters
        if device is not None:
            r.train.device = device
        validate(r, "command line")
        result = train(r, resume=resume, progress=progress)
        if result.stopped_by is not None:
            raise typer.Exit(128 + result.stopped_by)
