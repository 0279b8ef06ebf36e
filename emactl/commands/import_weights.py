"""``emactl import``: a run directory from EMANet weights of the original code or mmseg."""
from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UserError
from ..options import set_option


def import_weights(
    source: str = typer.Argument(..., metavar="SOURCE", help="Which code wrote the checkpoint: original or mmseg."),
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT", help="The checkpoint file (.pth)."),
    name: str = typer.Option(..., "--name", help="Run name: the run directory is OUT/NAME.", metavar="NAME"),
    out: Path = typer.Option(Path("runs"), "--out", help="Folder that receives the run directory.", metavar="DIR"),
    set_: list[str] = set_option("Override a recipe key of the import, e.g. data.root=/data/VOCdevkit."),
) -> None:
    """Import published EMANet weights as a run that eval, predict, visualize and ablate --from accept.

    The run's recipe reproduces the source code's network and inference protocol (normalisation, padding, upsampling); the number of classes comes from the checkpoint.
    """
    from ..importer import SOURCES, import_checkpoint

    if source not in SOURCES:
        raise UserError(f"SOURCE: got {source!r}; choose one of: {', '.join(SOURCES)}")
    if not name or "/" in name or name in (".", ".."):
        raise UserError(f"--name: got {name!r}; use a plain name without '/'")
    run_dir = import_checkpoint(source, checkpoint, name, out, list(set_))
    typer.echo(f"imported {source} checkpoint {checkpoint} → {run_dir} (recipe.yaml, checkpoints/, import.json)")
