"""What one ``emactl profile`` run measures: sections, shapes, device and precision.

Options left at ``None`` take each section's own default (the EM attention benchmark, for
instance, defaults to the paper's B=4, 65×65 while the heads default to a cheaper shape), so
that the whole default run fits in a few minutes on a 2-core CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..nn.backbone import BACKBONES
from ..nn.heads import context_names
from .timing import DTYPES

SECTIONS = ("heads", "networks", "scaling", "published", "ema", "unit", "train", "export")
# export needs the optional onnx/onnxruntime extra and a CPU: it runs only when asked for
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != "export")
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


@dataclass
class ProfileSettings:
    """Resolved options of one profiling run (see ``emactl profile --help``)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: str = "fp32"
    out: Path = Path("profile_out")
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    channels: int = 512
    bases: int = 64
    iters: int = 3
    size: int | None = None
    batch: int | None = None
    backbone: str = "resnet50"
    crop: int = 97
    sizes: tuple[int, ...] = (33, 49, 65, 81)
    heads: tuple[str, ...] | None = None
    repeats: int = 3
    threads: int | None = None
    published_memory: bool = False
    compile: bool = False  # train section: also time torch.compile (minutes of compiling on a CPU)
    compile_timeout: float = 300.0  # seconds; past it the compiled variant is skipped

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


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (``cuda:N`` too; it must exist) or ``auto``: CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device {name!r}; choose cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device: got {name!r}; choose cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def parse_list(value: str, option: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """Split ``a,b,c`` and check every item is allowed (order kept, duplicates dropped)."""
    items = tuple(dict.fromkeys(s.strip() for s in value.split(",") if s.strip()))
    if not items:
        raise UserError(f"{option}: empty list; choose from {', '.join(allowed)}")
    bad = [s for s in items if s not in allowed]
    if bad:
        raise UserError(f"{option}: unknown {', '.join(map(repr, bad))}; choose from {', '.join(allowed)}")
    return items


def parse_sizes(value: str) -> tuple[int, ...]:
    """``33,65,97`` → (33, 65, 97): at least two distinct positive sizes for a fit."""
    try:
        sizes = tuple(sorted({int(s) for s in value.split(",") if s.strip()}))
    except ValueError:
        raise UserError(f"--sizes: expected comma-separated integers like 33,65,97, got {value!r}") from None
    if len(sizes) < 2 or sizes[0] < 1:
        raise UserError(f"--sizes: need at least two distinct positive sizes to fit an exponent, got {value!r}")
    return sizes


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
    from ..export import require_onnx

    require_onnx()
    if s.device.type != "cpu":
        raise UserError("--sections export: onnxruntime runs on the CPU here; use --device cpu")
    if s.dtype != "fp32":
        raise UserError(f"--sections export: the exported network is fp32; got --dtype {s.dtype}")
    if s.backbone not in BACKBONES:
        raise UserError(f"--backbone: unknown backbone {s.backbone!r}; choose one of {', '.join(BACKBONES.names())}")
    if s.crop < 8:
        raise UserError(f"--crop: must be >= 8 for the export section, got {s.crop}")
