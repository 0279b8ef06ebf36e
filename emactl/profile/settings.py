"""What one ``emactl profile`` run measures: sections, shapes, device and precision.

Options left at ``None`` take each section's own default (the EM attention benchmark, for
instance, defaults to the paper's B=4, 65×65 while the heads default to a cheaper shape), so
that the whole default run fits in a few minutes on a 2-core CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from .. import lists
from ..device import DTYPES, resolve_device
from ..errors import UserError
from ..export import require_onnx
from ..nn.backbone import BACKBONES
from ..nn.heads import context_names
from ..options import DEVICE_HELP, field_option

HEADS = context_names(("attention", "conv", "pyramid"))  # every registered head with a module to measure
SCALING_HEADS = context_names(("attention", "conv"))  # attention's growth in N against the 3×3 conv's
NETWORK_BACKBONES = ("resnet50", "resnet101")  # torchvision ships DeepLabV3/FCN for these

# Section defaults when --size / --batch are not given.
HEADS_SIZE, HEADS_BATCH = 33, 2
EMA_SIZE, EMA_BATCH = 65, 4
NETWORKS_BATCH = 2
EXPORT_BATCH = 1  # one image, as a deployment segments it
TRAIN_BATCH = NETWORKS_BATCH  # the train section times the networks section's setting
SCALING_BATCH = 1
NUM_CLASSES = 21  # PASCAL VOC


def parse_list(value: str, option: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """Split ``a,b,c`` and check every item is allowed (order kept, duplicates dropped)."""
    items = tuple(dict.fromkeys(lists.items(value)))
    if not items:
        raise UserError(f"{option}: empty list; choose from {', '.join(allowed)}")
    bad = [s for s in items if s not in allowed]
    if bad:
        raise UserError(f"{option}: unknown {', '.join(map(repr, bad))}; choose from {', '.join(allowed)}")
    return items


def parse_sizes(value: str) -> tuple[int, ...]:
    """``33,65,97`` → (33, 65, 97): at least two distinct positive sizes for a fit."""
    try:
        sizes = tuple(sorted({int(s) for s in lists.items(value)}))
    except ValueError:
        raise UserError(f"--sizes: expected comma-separated integers like 33,65,97, got {value!r}") from None
    if len(sizes) < 2 or sizes[0] < 1:
        raise UserError(f"--sizes: need at least two distinct positive sizes to fit an exponent, got {value!r}")
    return sizes


def _report() -> ModuleType:
    """:mod:`.report`, which registers the sections with their runners (and imports this module)."""
    from . import report

    return report


def default_sections() -> tuple[str, ...]:
    """The sections run when none are named: every registered one but the opt-in ones (export)."""
    return _report().DEFAULT_SECTIONS


def sections_help() -> str:
    return f"Comma-separated sections to run, in order. {_report().sections_help()}".rstrip()


def parse_sections(value: str) -> tuple[str, ...]:
    return parse_list(value, "--sections", tuple(_report().SECTIONS))


def parse_heads(value: str) -> tuple[str, ...]:
    return parse_list(value, "--heads", HEADS)


@dataclass
class ProfileSettings:
    """Resolved options of one profiling run; each field is an option of ``emactl profile``."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"), metadata=field_option(
        DEVICE_HELP, "DEVICE", parse=resolve_device, default="auto"))
    dtype: str = field(default="fp32", metadata=field_option(
        "fp32, bf16 or fp16 (fp16 needs cuda); bf16/fp16 run under autocast.", "DTYPE"))
    out: Path = field(default=Path("profile_out"), metadata=field_option(
        "Directory for the CSV/Markdown/JSON tables, notes.md and env.json.", "DIR"))
    sections: tuple[str, ...] = field(default_factory=default_sections, metadata=field_option(
        sections_help, "LIST", parse=parse_sections))
    channels: int = field(default=512, metadata=field_option(
        "Channels C of the context modules (and of EMANet's head).", "C"))
    size: int | None = field(default=None, metadata=field_option(
        "Feature size H=W of heads (default 33) and ema (default 65).", "N"))
    bases: int = field(default=64, metadata=field_option("EM bases K.", "K"))
    iters: int = field(default=3, metadata=field_option("EM iterations T.", "T"))
    batch: int | None = field(default=None, metadata=field_option(
        "Batch size (defaults: heads 2, networks 2, train 2, scaling 1, ema 4, export 1).", "N"))
    backbone: str = field(default="resnet50", metadata=field_option(
        "Backbone of the networks and train sections (resnet50 or resnet101) and of export (any).", "NAME"))
    crop: int = field(default=97, metadata=field_option(
        "Input crop (H=W) of the networks, train and export sections.", "PX"))
    sizes: tuple[int, ...] = field(default=(33, 49, 65, 81), metadata=field_option(
        "Feature sizes H=W swept by the scaling section.", "LIST", parse=parse_sizes))
    heads: tuple[str, ...] | None = field(default=None, metadata=field_option(
        "Context modules for heads/scaling (default: all six / ema,nonlocal,a2,conv3x3).", "LIST",
        parse=parse_heads))
    repeats: int = field(default=3, metadata=field_option(
        "Timed rounds per measurement, after one warm-up call.", "N"))
    threads: int | None = field(default=None, metadata=field_option(
        "Torch CPU threads (default 1 on the CPU, steady on a shared machine; torch's choice on cuda).", "N"))
    published_memory: bool = field(default=False, metadata=field_option(
        "Also measure inference memory at 513x513 with ResNet-101 (slow on a CPU)."))
    compile: bool = field(default=False, metadata=field_option(
        "train section: also time EMANet's training step under torch.compile (opt-in: compiling takes "
        "minutes on a CPU)."))
    compile_timeout: float = field(default=300.0, metadata=field_option(
        "Seconds allowed for torch.compile's compilation; past it the compiled variant is skipped.", "SECONDS"))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def section_size(self, default: int) -> int:
        return self.size if self.size is not None else default

    def section_batch(self, default: int) -> int:
        return self.batch if self.batch is not None else default

    def head_names(self, default: tuple[str, ...]) -> tuple[str, ...]:
        return self.heads if self.heads is not None else default

    def cpu_threads(self) -> int | None:
        """Threads to give torch: ``threads`` if set; else 1 on the CPU; else leave torch's choice.

        One thread is the CPU default because this tool runs on shared development machines:
        there, a multi-threaded op waits at every barrier for whichever of its threads the
        scheduler has parked, and on a 2-core machine under load that made timings several times
        slower and erratic (time exponents near 0) while one thread gave steady ones.
        """
        if self.threads is not None:
            return self.threads
        return 1 if self.device.type == "cpu" else None


def validate(s: ProfileSettings) -> None:
    """Checks that need several options at once; raises :class:`UserError`."""
    if s.dtype not in DTYPES:
        raise UserError(f"--dtype: got {s.dtype!r}; choose one of {', '.join(DTYPES)}")
    if s.dtype == "fp16" and s.device.type == "cpu":
        raise UserError("--dtype fp16 is not supported on the CPU; use --dtype bf16 or fp32, or --device cuda")
    positive = {"--channels": s.channels, "--bases": s.bases, "--iters": s.iters, "--crop": s.crop, "--repeats": s.repeats}
    for name, value in positive.items():
        if value < 1:
            raise UserError(f"{name}: must be >= 1, got {value}")
    if s.threads is not None and s.threads < 1:
        raise UserError(f"--threads: must be >= 1, got {s.threads}")
    if s.size is not None and s.size < 1:
        raise UserError(f"--size: must be >= 1, got {s.size}")
    if s.batch is not None and s.batch < 1:
        raise UserError(f"--batch: must be >= 1, got {s.batch}")
    if s.compile_timeout <= 0:
        raise UserError(f"--compile-timeout: must be > 0 seconds, got {s.compile_timeout:g}")
    training = {"heads", "networks", "train"} & set(s.sections)
    if s.batch == 1 and training:
        raise UserError(
            f"--batch 1: the {'/'.join(sorted(training))} section times training steps, and training-mode "
            "BatchNorm after the 1x1 pooling branches (ASPP, PSP) needs a batch of at least 2"
        )
    if "unit" in s.sections and s.section_batch(EMA_BATCH) * s.section_size(EMA_SIZE) ** 2 < 2:
        raise UserError(
            f"--batch {s.section_batch(EMA_BATCH)} --size {s.section_size(EMA_SIZE)}: the unit section trains the EMA "
            "unit, whose BatchNorm needs more than one value per channel; use --size 2 or more, or --batch 2 or more"
        )
    if "export" in s.sections:
        _validate_export(s)
    networks = [name for name in ("networks", "train") if name in s.sections]
    if networks:
        if s.backbone not in BACKBONES:
            raise UserError(f"--backbone: unknown backbone {s.backbone!r}; choose one of {', '.join(NETWORK_BACKBONES)}")
        if s.backbone not in NETWORK_BACKBONES:
            raise UserError(
                f"--backbone {s.backbone}: torchvision's DeepLabV3 and FCN exist only for "
                f"{' and '.join(NETWORK_BACKBONES)}, so the {'/'.join(networks)} section needs one of them"
            )
        if s.crop < 32:
            raise UserError(f"--crop: must be >= 32 for a ResNet at output stride 8, got {s.crop}")


def _validate_export(s: ProfileSettings) -> None:
    """The export section compares with onnxruntime's CPU provider, in fp32, on any backbone."""
    require_onnx()
    if s.device.type != "cpu":
        raise UserError("--sections export: onnxruntime runs on the CPU here; use --device cpu")
    if s.dtype != "fp32":
        raise UserError(f"--sections export: the exported network is fp32; got --dtype {s.dtype}")
    if s.backbone not in BACKBONES:
        raise UserError(f"--backbone: unknown backbone {s.backbone!r}; choose one of {', '.join(BACKBONES.names())}")
    if s.crop < 8:
        raise UserError(f"--crop: must be >= 8 for the export section, got {s.crop}")
