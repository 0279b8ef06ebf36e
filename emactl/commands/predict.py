"""``emactl predict``: palette-PNG masks (and overlays) for a folder of images."""
from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict_command(
        run: Path = typer.Argument(..., help="Run directory (uses its newest checkpoint) or checkpoint file."),
        images: Path = typer.Argument(..., help="An image file or a folder of images."),
        out: Path = typer.Option(..., "--out", help="Output folder for the masks."),
        overlay: bool = typer.Option(False, "--overlay", help="Also write image/colour overlays."),
        alpha: float = typer.Option(0.5, "--alpha", help="Overlay opacity of the class colours, in [0, 1]."),
        set_: list[str] = typer.Option([], "--set", help="Override a stored recipe key, e.g. eval.flip=true."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    ) -> None:
        """Segment images with a trained run; masks use the stored recipe's eval settings."""
        from ..io import ensure_dir
        from ..predict import predict_images

        ensure_dir(out, "--out")  # before the images are segmented, not after
        written = predict_images(run, images, out, overlay=overlay, alpha=alpha, overrides=list(set_),
                                 device=device, progress=progress)
        masks = sum(1 for p in written if p.parent == out and p.suffix == ".png")
        typer.echo(f"wrote {masks} masks to {out}" + (f" and overlays to {out / 'overlays'}" if overlay else ""))
