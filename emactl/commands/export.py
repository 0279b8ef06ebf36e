"""``emactl export``: a trained network as ONNX, TorchScript or a torch.export program."""
from __future__ import annotations

from pathlib import Path

import typer

from ..options import device_option, run_argument, set_option


def export(
    run: Path = run_argument(),
    fmt: str = typer.Option(..., "--format", help="onnx, torchscript or exported (torch.export).", metavar="FORMAT",
                            show_default=False),
    out: Path = typer.Option(..., "--out", help="The file to write.", metavar="FILE", show_default=False),
    size: tuple[int, int] = typer.Option(None, "--size", help="Fixed input height and width, two numbers: --size 512 1024 "
                                         "(default: the training crop).", metavar="SIZE", show_default=False),
    dynamic: bool = typer.Option(False, "--dynamic", help="Accept any batch, height and width."),
    set_: list[str] = set_option("Override a stored recipe key, e.g. eval.iters=2 (repeatable)."),
    device: str = device_option("cpu"),
) -> None:
    """Write the network (EM iterations at the eval T, BN folded) for deployment; ONNX is
    checked against emactl predict with onnxruntime on a sample image."""
    from ..export import export_run

    agreement = export_run(run, fmt, out, size=tuple(size) if size else None, dynamic=dynamic,
                           overrides=list(set_), device=device)
    typer.echo(f"wrote {out}")
    if agreement is not None:
        typer.echo(agreement.describe())
