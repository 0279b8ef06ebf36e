"""``emactl eval``: metrics of a run or checkpoint on its validation split."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..config import EvalConfig, choices
from ..errors import UserError
from ..lists import items
from ..options import device_option, out_option, progress_option, run_argument, set_option

def parse_scales(text: str) -> list[float]:
    """``"0.75,1.0,1.25"`` → ``[0.75, 1.0, 1.25]``; anything else is a UserError."""
    try:
        scales = [float(s) for s in items(text)]
    except ValueError:
        scales = []
    if not scales or any(not s > 0 or s == float("inf") for s in scales):
        raise UserError(f"--scales: got {text!r}; expected positive numbers separated by commas, e.g. 0.75,1.0,1.25")
    return scales


def eval_settings(mode: str | None, scales: str | None, flip: bool | None) -> dict[str, Any]:
    """The ``--mode/--scales/--flip`` options as values of the recipe's ``eval`` fields."""
    settings: dict[str, Any] = {}
    if mode is not None:
        modes = choices(EvalConfig, "mode")
        if mode not in modes:
            raise UserError(f"--mode: got {mode!r}; choose one of: {', '.join(modes)}")
        settings["mode"] = mode
    if scales is not None:
        settings["scales"] = parse_scales(scales)
    if flip is not None:
        settings["flip"] = flip
    return settings


def evaluate(
    run: Path = run_argument(),
    iters: Optional[int] = typer.Option(None, "--iters", help="EM iterations T of the EMA unit at test time.",
                                        metavar="T", show_default=False),
    set_: list[str] = set_option("Override a stored recipe key, e.g. eval.batch_size=4 (repeatable)."),
    mode: Optional[str] = typer.Option(None, "--mode", metavar="MODE", show_default=False,
                                       help=f"Inference mode: {' or '.join(choices(EvalConfig, 'mode'))}."),
    scales: Optional[str] = typer.Option(None, "--scales", help="Test scales, e.g. 0.75,1.0,1.25.",
                                         metavar="S,S,...", show_default=False),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Add horizontally flipped views."),
    out: Optional[Path] = out_option("Output folder (default: RUN/eval/<setting>, one per evaluation setting)."),
    device: str = device_option(),
    progress: bool = progress_option(),
) -> None:
    """Evaluate on the validation split: aAcc, mAcc, mIoU, fwIoU and per-class IoU tables."""
    from ..engine.evaluate import evaluate_run

    if iters is not None and iters <= 0:
        raise UserError(f"--iters: must be > 0, got {iters}")
    evaluate_run(run, list(set_), iters=iters, out_dir=out, device=device, progress=progress,
                 settings=eval_settings(mode, scales, flip))
