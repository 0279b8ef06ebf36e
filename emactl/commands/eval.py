"""``emactl eval``: metrics of a run or checkpoint on its validation split."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError

MODES = ("whole", "slide")


def parse_scales(text: str) -> list[float]:
    """``"0.75,1.0,1.25"`` → ``[0.75, 1.0, 1.25]``; anything else is a UserError."""
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        scales = []
    if not scales or any(not s > 0 or s == float("inf") for s in scales):
        raise UserError(f"--scales: got {text!r}; expected positive numbers separated by commas, e.g. 0.75,1.0,1.25")
    return scales


def eval_overrides(mode: str | None, scales: str | None, flip: bool | None) -> list[str]:
    """The ``--mode/--scales/--flip`` options as recipe overrides of the ``eval`` section."""
    out = []
    if mode is not None:
        if mode not in MODES:
            raise UserError(f"--mode: got {mode!r}; choose one of: {', '.join(MODES)}")
        out.append(f"eval.mode={mode}")
    if scales is not None:
        out.append(f"eval.scales=[{','.join(repr(s) for s in parse_scales(scales))}]")
    if flip is not None:
        out.append(f"eval.flip={'true' if flip else 'false'}")
    return out


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        run: Path = typer.Argument(..., help="Run directory (uses its newest checkpoint) or checkpoint file."),
        iters: Optional[int] = typer.Option(None, "--iters", help="EM iterations of the EMA unit at test time."),
        set_: list[str] = typer.Option([], "--set", help="Override a stored recipe key, e.g. eval.batch_size=4."),
        mode: Optional[str] = typer.Option(None, "--mode", help="Inference mode: whole or slide."),
        scales: Optional[str] = typer.Option(None, "--scales", help="Test scales, e.g. 0.75,1.0,1.25."),
        flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Add horizontally flipped views."),
        out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: RUN_DIR/eval)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    ) -> None:
        """Evaluate on the validation split: aAcc, mAcc, mIoU, fwIoU and per-class IoU tables."""
        from ..engine.evaluate import evaluate_run

        if iters is not None and iters <= 0:
            raise UserError(f"--iters: must be > 0, got {iters}")
        overrides = list(set_) + eval_overrides(mode, scales, flip)
        evaluate_run(run, overrides, iters=iters, out_dir=out, device=device, progress=progress)
