"""``emactl profile``: benchmark EM attention against the other context modules and networks."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..options import device_option


def register(app: typer.Typer) -> None:
    @app.command("profile")
    def profile(
        device: str = device_option(),
        dtype: str = typer.Option("fp32", metavar="DTYPE", help="fp32, bf16 or fp16 (fp16 needs cuda); bf16/fp16 run under autocast."),
        out: Path = typer.Option(Path("profile_out"), metavar="DIR", help="Directory for the CSV/Markdown/JSON tables, notes.md and env.json."),
        sections: str = typer.Option(
            "heads,networks,scaling,published,ema,unit,train",
            metavar="LIST",
            help="Comma-separated sections to run, in order. unit: the whole EMA unit against the public code's, "
            "eval and training, at 1 and all threads. train: EMANet's training step in fp32 eager against "
            "bf16 autocast + channels_last (and torch.compile with --compile), and against DeepLabV3. export (not by "
            "default; needs the export extra): the network exported to ONNX under onnxruntime against eager PyTorch.",
        ),
        channels: int = typer.Option(512, metavar="C", help="Channels C of the context modules (and of EMANet's head)."),
        size: Optional[int] = typer.Option(None, metavar="N", show_default=False, help="Feature size H=W of heads (default 33) and ema (default 65)."),
        bases: int = typer.Option(64, metavar="K", help="EM bases K."),
        iters: int = typer.Option(3, metavar="T", help="EM iterations T."),
        batch: Optional[int] = typer.Option(None, metavar="N", show_default=False, help="Batch size (defaults: heads 2, networks 2, train 2, scaling 1, ema 4, export 1)."),
        backbone: str = typer.Option("resnet50", metavar="NAME", help="Backbone of the networks and train sections (resnet50 or resnet101) and of export (any)."),
        crop: int = typer.Option(97, metavar="PX", help="Input crop (H=W) of the networks, train and export sections."),
        sizes: str = typer.Option("33,49,65,81", metavar="LIST", help="Feature sizes H=W swept by the scaling section."),
        heads: Optional[str] = typer.Option(
            None, metavar="LIST", show_default=False, help="Context modules for heads/scaling (default: all six / ema,nonlocal,a2,conv3x3)."
        ),
        repeats: int = typer.Option(3, metavar="N", help="Timed rounds per measurement, after one warm-up call."),
        threads: Optional[int] = typer.Option(
            None, metavar="N", show_default=False, help="Torch CPU threads (default 1 on the CPU, steady on a shared machine; torch's choice on cuda)."
        ),
        published_memory: bool = typer.Option(
            False, help="Also measure inference memory at 513x513 with ResNet-101 (slow on a CPU)."
        ),
        compile: bool = typer.Option(
            False,
            "--compile/--no-compile",
            help="train section: also time EMANet's training step under torch.compile (opt-in: compiling takes "
            "minutes on a CPU).",
        ),
        compile_timeout: float = typer.Option(
            300.0, metavar="SECONDS", help="Seconds allowed for torch.compile's compilation; past it the compiled variant is skipped."
        ),
    ) -> None:
        """Measure params, MACs/FLOPs, memory, latency and throughput of EMA and the alternatives."""
        from rich.console import Console

        from ..io import ensure_dir
        from ..profile.report import run_profile
        from ..profile.settings import HEADS, SECTIONS, ProfileSettings, parse_list, parse_sizes, resolve_device, validate

        settings = ProfileSettings(
            device=resolve_device(device),
            dtype=dtype,
            out=out,
            sections=parse_list(sections, "--sections", SECTIONS),
            channels=channels,
            bases=bases,
            iters=iters,
            size=size,
            batch=batch,
            backbone=backbone,
            crop=crop,
            sizes=parse_sizes(sizes),
            heads=parse_list(heads, "--heads", HEADS) if heads is not None else None,
            repeats=repeats,
            threads=threads,
            published_memory=published_memory,
            compile=compile,
            compile_timeout=compile_timeout,
        )
        validate(settings)
        ensure_dir(out, "--out")  # before minutes of measuring, not after
        console = Console(log_path=False)  # progress lines say what runs, not where in emactl
        if not console.is_terminal:  # logs and pipes: keep wide tables whole
            console = Console(width=220, log_path=False)
        run_profile(settings, console)
