"""``emactl predict``: palette-PNG masks (and overlays) for a folder of images."""
from __future__ import annotations

from pathlib import Path

import typer

from ..options import device_option, progress_option, run_argument, set_option


def predict(
    run: Path = run_argument(help="Run directory (its newest checkpoint is used), checkpoint file, or an .onnx "
                              "file from emactl export (run by onnxruntime)."),
    images: Path = typer.Argument(..., help="An image file or a folder of images.", metavar="IMAGES",
                                  show_default=False),
    out: Path = typer.Option(..., "--out", help="Output folder for the masks.", metavar="DIR", show_default=False),
    overlay: bool = typer.Option(False, "--overlay", help="Also write image/colour overlays."),
    alpha: float = typer.Option(0.5, "--alpha", help="Overlay opacity of the class colours, in [0, 1].",
                                metavar="A"),
    set_: list[str] = set_option("Override a stored recipe key, e.g. eval.flip=true (repeatable)."),
    device: str = device_option(),
    progress: bool = progress_option(),
) -> None:
    """Segment images with a trained run; masks use the stored recipe's eval settings."""
    from ..io import ensure_dir
    from ..predict import predict_images

    ensure_dir(out, "--out")  # before the images are segmented, not after
    written = predict_images(run, images, out, overlay=overlay, alpha=alpha, overrides=list(set_),
                             device=device, progress=progress)
    masks = sum(1 for p in written if p.parent == out and p.suffix == ".png")
    typer.echo(f"wrote {masks} masks to {out}" + (f" and overlays to {out / 'overlays'}" if overlay else ""))
