"""``emactl data``: prepare datasets and check them."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..config import dump_yaml, load_recipe
from ..options import out_option, set_option

app = typer.Typer(help="Prepare and check datasets.", no_args_is_help=True)
prepare_app = typer.Typer(help="Convert downloaded datasets into the layouts emactl reads.",
                          no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")


@prepare_app.command("voc-aug")
def prepare_voc_aug(
    sbd: Path = typer.Option(..., "--sbd", metavar="DIR", show_default=False, help="SBD benchmark_RELEASE (or its dataset/ dir)."),
    voc: Path = typer.Option(..., "--voc", metavar="DIR", show_default=False, help="VOCdevkit, VOC2012, or the dir holding them."),
    force: bool = typer.Option(False, "--force", help="Rewrite labels that already exist."),
) -> None:
    """Build SegmentationClassAug/ and trainaug.txt (10,582 images) from SBD."""
    from ..data.prepare import prepare_voc_aug as run

    result = run(sbd, voc, force=force)
    Console().print(
        f"{result.voc_dir / 'SegmentationClassAug'}: {result.from_voc} labels copied from VOC, "
        f"{result.from_sbd} converted from SBD, {result.skipped} already present; "
        f"trainaug.txt lists {result.trainaug} images"
    )


WORKERS_HELP = "Threads converting files in parallel."
FORCE_HELP = "Rewrite labels that already exist (default: skip them)."


@prepare_app.command("cityscapes")
def prepare_cityscapes(
    root: Path = typer.Option(..., "--root", metavar="DIR", show_default=False, help="Directory holding gtFine/ (and leftImg8bit/)."),
    source: str = typer.Option("auto", "--source", metavar="FORMAT", help="Read gtFine polygons (JSON), label ids "
                               "(PNG) or auto: polygons where present. polygons | label-ids | auto"),
    workers: int = typer.Option(4, "--workers", min=1, metavar="N", help=WORKERS_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Write gtFine/*/*_gtFine_labelTrainIds.png (19 classes, 255 ignored)."""
    from ..data.prepare import prepare_cityscapes as run

    base, result = run(root, source, workers, force)
    Console(soft_wrap=True).print(result.summary(str(base / "gtFine")), markup=False, highlight=False)
    result.raise_refused()


@prepare_app.command("context")
def prepare_context(
    context: Optional[Path] = typer.Option(None, "--context", metavar="DIR", show_default=False, help="Where PASCAL Context's "
                                           "trainval.tar.gz was extracted (trainval/*.mat)."),
    detail: Optional[Path] = typer.Option(None, "--detail", metavar="JSON", show_default=False, help="Or the Detail API's "
                                          "trainval_merged.json."),
    voc: Path = typer.Option(..., "--voc", metavar="DIR", show_default=False, help="VOCdevkit, VOC2010, or the dir holding them."),
    workers: int = typer.Option(4, "--workers", min=1, metavar="N", help=WORKERS_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Write VOC2010/SegmentationClassContext/*.png (0 = background, 1..59) and the
    ImageSets/SegmentationContext train/val lists; serves the context and context60 recipes."""
    from ..data.prepare import prepare_context as run

    result = run(context, voc, workers, force, detail=detail)
    Console(soft_wrap=True).print(
        result.labels.summary(str(result.voc_dir / "SegmentationClassContext"))
        + f"; train.txt lists {result.splits['train']} images, val.txt {result.splits['val']}",
        markup=False, highlight=False)
    result.labels.raise_refused()


@prepare_app.command("cocostuff")
def prepare_cocostuff(
    root: Path = typer.Option(..., "--root", metavar="DIR", show_default=False, help="Directory holding images/ and annotations/ "
                              "(stuffthingmaps_trainval2017.zip unzipped into annotations/)."),
    workers: int = typer.Option(4, "--workers", min=1, metavar="N", help=WORKERS_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Write annotations/{train2017,val2017}/*_labelTrainIds.png (171 classes, 255 ignored)."""
    from ..data.prepare import prepare_cocostuff as run

    base, result = run(root, workers, force)
    Console(soft_wrap=True).print(result.summary(str(base / "annotations")), markup=False, highlight=False)
    result.raise_refused()


@app.command("check")
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
    from ..data.check import check_dataset, print_class_weights, print_report, write_report
    from ..io import ensure_dir, write_text

    cfg = load_recipe(recipe, overrides)
    if out is not None:
        ensure_dir(out, "--out")  # before the scan, not after
    report = check_dataset(cfg.data, split or None)
    print_report(report)
    print_class_weights(report, cfg.data.train_split)
    if out is not None:
        write_report(report, out)
        write_text(out / "config.yaml", dump_yaml(cfg))
    raise typer.Exit(0 if report.ok else 1)
