"""``emactl data``: prepare datasets and check them."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..options import out_option, set_option

data_app = typer.Typer(help="Prepare and check datasets.", no_args_is_help=True)
prepare_app = typer.Typer(help="Convert downloaded datasets into the layouts emactl reads.",
                          no_args_is_help=True)
data_app.add_typer(prepare_app, name="prepare")


@prepare_app.command("voc-aug")
def prepare_voc_aug(
    sbd: Path = typer.Option(..., "--sbd", metavar="DIR", show_default=False, help="SBD benchmark_RELEASE (or its dataset/ dir)."),
    voc: Path = typer.Option(..., "--voc", metavar="DIR", show_default=False, help="VOCdevkit, VOC2012, or the dir holding them."),
    force: bool = typer.Option(False, "--force", help="Rewrite labels that already exist."),
) -> None:
    """Build SegmentationClassAug/ and trainaug.txt (10,582 images) from SBD."""
    from rich.console import Console

    from ..data.prepare import prepare_voc_aug as run

    result = run(sbd, voc, force=force)
    Console().print(
        f"{result.voc_dir / 'SegmentationClassAug'}: {result.from_voc} labels copied from VOC, "
        f"{result.from_sbd} converted from SBD, {result.skipped} already present; "
        f"trainaug.txt lists {result.trainaug} images"
    )


@data_app.command("check")
def check(
    recipe: Path = typer.Argument(..., help="Recipe YAML file.", metavar="RECIPE", show_default=False),
    overrides: list[str] = set_option("Override a recipe key, e.g. data.root=/data (repeatable)."),
    split: list[str] = typer.Option([], "--split", metavar="SPLIT", show_default=False, help="Split to check (repeatable; default: "
                                    "the recipe's train and val splits)."),
    out: Optional[Path] = out_option("Write CSV + Markdown tables here."),
) -> None:
    """Count images and labels, histogram the classes, list every bad or missing file.

    Exit code 0 when clean, 1 when problems were found, 2 for bad input.
    """
    from ..config import dump_yaml, load_recipe
    from ..data.check import check_dataset, print_report, write_report
    from ..io import write_text

    cfg = load_recipe(recipe, overrides)
    report = check_dataset(cfg.data, split or None)
    print_report(report)
    if out is not None:
        write_report(report, out)
        write_text(out / "config.yaml", dump_yaml(cfg))
    raise typer.Exit(0 if report.ok else 1)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
