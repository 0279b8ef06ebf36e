"""``emactl visualize``: figures of a run (EMA bases, reconstruction, predictions, confusion,
curves) and of an ablation sweep. Every subcommand prints the paths of the PNGs it wrote."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..options import device_option, run_argument

RUN_HELP = "Run directory or checkpoint file (default: the latest run in runs/)."
OUT_HELP = "Output folder (default: RUN/figures)."
IMAGES_HELP = "Image file or folder of images to draw instead of dataset samples (repeatable)."
SPLIT_HELP = "Dataset split to take images from (default: the recipe's data.val_split)."
COUNT_HELP = "How many dataset images to draw (the first ones of the split)."
SET_HELP = "Recipe override KEY=VALUE, e.g. data.root=/data/VOCdevkit (repeatable)."

RunArg = run_argument(None, RUN_HELP)
OutOpt = typer.Option(None, "--out", "-o", help=OUT_HELP, metavar="DIR", show_default=False)
ImagesOpt = typer.Option(None, "--images", help=IMAGES_HELP, metavar="PATH", show_default=False)
SplitOpt = typer.Option(None, "--split", help=SPLIT_HELP, metavar="SPLIT", show_default=False)
CountOpt = typer.Option(4, "--count", "-n", help=COUNT_HELP, metavar="N")
SetOpt = typer.Option(None, "--set", help=SET_HELP, metavar="KEY=VALUE", show_default=False)
DeviceOpt = device_option()

app = typer.Typer(
    help="Draw figures: EMA bases and reconstructions, predictions, confusion matrix, curves, ablations.",
    no_args_is_help=True,
)


def _echo(paths: list[Path]) -> None:
    for path in paths:
        typer.echo(str(path))


@app.command("bases")
def bases(
    run: Optional[Path] = RunArg,
    images: Optional[list[Path]] = ImagesOpt,
    bases: Optional[str] = typer.Option(None, "--bases", help="Comma-separated basis indices, e.g. 0,5,12.",
                                        metavar="I,J,...", show_default=False),
    top: Optional[int] = typer.Option(None, "--top", help="Without --bases: show up to N bases, those that "
                                      "mark a predicted class, one per class (default 4).",
                                      metavar="N", show_default=False),
    out: Optional[Path] = OutOpt,
    split: Optional[str] = SplitOpt,
    count: int = CountOpt,
    overrides: Optional[list[str]] = SetOpt,
    device: str = DeviceOpt,
) -> None:
    """Responsibility maps z[:, k] of EMA bases beside the input, ground truth and prediction."""
    from ..visualize.bases import draw_bases, parse_bases

    chosen = parse_bases(bases) if bases is not None else None
    _echo(draw_bases(run, images, chosen, top, out, split, count, overrides or [], device))


@app.command("recon")
def recon(
    run: Optional[Path] = RunArg,
    images: Optional[list[Path]] = ImagesOpt,
    out: Optional[Path] = OutOpt,
    split: Optional[str] = SplitOpt,
    count: int = CountOpt,
    overrides: Optional[list[str]] = SetOpt,
    device: str = DeviceOpt,
) -> None:
    """Features before EMA vs the reconstruction μZᵀ (one shared PCA to RGB) and their spectra."""
    from ..visualize.recon import draw_recon

    _echo(draw_recon(run, images, out, split, count, overrides or [], device))


@app.command("predictions")
def predictions(
    run: Optional[Path] = RunArg,
    images: Optional[list[Path]] = ImagesOpt,
    out: Optional[Path] = OutOpt,
    split: Optional[str] = SplitOpt,
    count: int = CountOpt,
    overrides: Optional[list[str]] = SetOpt,
    device: str = DeviceOpt,
) -> None:
    """Prediction and ground truth overlaid on the image, the errors and a class legend."""
    from ..visualize.predictions import draw_predictions

    _echo(draw_predictions(run, images, out, split, count, overrides or [], device))


@app.command("confusion")
def confusion(
    run: Optional[Path] = run_argument(None, "Run directory, checkpoint or confusion.csv (default: the latest run "
                                       "in runs/)."),
    evaluation: Optional[str] = typer.Option(
        None, "--eval", help="Which evaluation: a setting folder under RUN/eval/ (default: the training's own).",
        metavar="SETTING", show_default=False),
    out: Optional[Path] = OutOpt,
) -> None:
    """Heatmap of the row-normalised confusion matrix in RUN/eval/ (or RUN/eval/SETTING/) confusion.csv."""
    from ..visualize.confusion import draw_confusion

    _echo(draw_confusion(run, out, evaluation))


@app.command("curves")
def curves(run: Optional[Path] = RunArg, out: Optional[Path] = OutOpt) -> None:
    """Training loss, learning rate and val mIoU against iteration, from metrics.jsonl."""
    from ..visualize.curves import draw_curves

    _echo(draw_curves(run, out))


@app.command("ablation")
def ablation(
    sweep: Path = typer.Argument(..., help="Sweep directory (holding results.csv) or the CSV itself.",
                                 metavar="SWEEP", show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: SWEEP/figures).",
                                       metavar="DIR", show_default=False),
) -> None:
    """mIoU against eval T per train T, and a bar chart of mIoU for every other swept axis."""
    from ..visualize.ablation import draw_ablation

    _echo(draw_ablation(sweep, out))
