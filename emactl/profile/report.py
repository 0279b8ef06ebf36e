"""Run the selected sections, write every table (CSV, Markdown, JSON) and show it on screen.

Each section returns its tables and the notes that say how its numbers were obtained (the
counting convention, the memory method, the timing method); the notes are printed under the
tables and collected in ``notes.md`` beside them, and ``env.json`` records the machine.

Every section is a runner registered here with :func:`section`, which also gives its
``--sections`` help and whether it runs by default: adding a section touches this module (and
the module measuring it, if it needs one) plus its test.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import torchvision
from rich.console import Console

from ..config import EMAConfig
from ..io import write_json, write_text
from ..tables import print_table, save_table
from .counting import ELEMENTS_NOTE, MACS_NOTE
from .emattention import DTYPE_NAMES, SQUARE, benchmark_dtypes, profile_em_attention, profile_em_ops
from .export import profile_export
from .heads import profile_heads
from .memory import SAVED_NOTE, measured_note
from .networks import NETWORKS, network_ratios, profile_networks
from .published import CONVENTION_NOTE, SOURCE, measured_published_memory, published_check
from .scaling import profile_scaling
from .settings import (
    EMA_BATCH,
    EMA_SIZE,
    EXPORT_BATCH,
    HEADS,
    HEADS_BATCH,
    HEADS_SIZE,
    NETWORKS_BATCH,
    NUM_CLASSES,
    SCALING_BATCH,
    SCALING_HEADS,
    TRAIN_BATCH,
    ProfileSettings,
)
from .timing import TIMING_NOTE
from .training import TRAIN_NETWORKS, mixed_dtype, profile_training
from .unit import profile_unit


@dataclass
class SectionResult:
    """The tables of one section (file stem → table, with a title) and how they were measured."""

    tables: dict[str, tuple[str, pd.DataFrame]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


Runner = Callable[[ProfileSettings, Console], SectionResult]


@dataclass(frozen=True)
class Section:
    """A section of ``emactl profile``: how it runs and what ``--sections`` says of it."""

    run: Runner
    help: str = ""  # shown in ``--sections``' help after the name; empty: the name says enough
    default: bool = True  # runs when ``--sections`` is not given
    extra: str | None = None  # the optional dependency (``pip install emactl[EXTRA]``) it needs


SECTIONS: dict[str, Section] = {}  # in the order a default run measures them


def section(name: str, help: str = "", default: bool = True, extra: str | None = None) -> Callable[[Runner], Runner]:
    """Register a section's runner; adding a section means writing one runner here with its test."""

    def deco(run: Runner) -> Runner:
        if name in SECTIONS:
            raise ValueError(f"profile section {name!r} is registered twice")
        SECTIONS[name] = Section(run, help, default, extra)
        return run

    return deco


def sections_help() -> str:
    """What ``--sections`` says of the sections that need more than their name."""
    described = []
    for name, sec in SECTIONS.items():
        if sec.default and not sec.help:
            continue
        opt_in = "" if sec.default else f" (not by default{f'; needs the {sec.extra} extra' if sec.extra else ''})"
        described.append(f"{name}{opt_in}: {sec.help}")
    return " ".join(described)


def _threads_note(s: ProfileSettings) -> str:
    if s.device.type != "cpu":
        return f"torch CPU threads: {torch.get_num_threads()}"
    return (
        f"torch CPU threads: {torch.get_num_threads()} (default 1: on a shared machine every multi-threaded op "
        "waits at its barrier for descheduled threads, which swamped the timings; --threads N uses N)"
    )


def _precision_note(s: ProfileSettings) -> str:
    if s.dtype == "fp32":
        return "precision: fp32"
    note = f"precision: {s.dtype} through torch.autocast; parameters stay fp32 (as in mixed-precision training)"
    if s.dtype == "fp16":
        note += "; no GradScaler in the timed steps"
    return note


@section("heads")
def run_heads(s: ProfileSettings, console: Console) -> SectionResult:
    size, batch = s.section_size(HEADS_SIZE), s.section_batch(HEADS_BATCH)
    df = profile_heads(
        s.head_names(HEADS), s.channels, size, batch, s.bases, s.iters, s.device, s.torch_dtype, s.repeats, console
    )
    title = f"Context modules: C={s.channels}, {size}x{size}, K={s.bases}, T={s.iters}, batch {batch}, {s.dtype}, {s.device}"
    return SectionResult(
        {"heads": (title, df)},
        [
            "params, MACs, FLOPs and elements per image; memory and latency for the whole batch",
            MACS_NOTE,
            ELEMENTS_NOTE,
            "MACs / conv3x3: against a 3x3 conv + BN + ReLU with C in and out (the paper says EMAU costs about 1/3)",
            measured_note(s.device),
            TIMING_NOTE,
            _threads_note(s),
            "fwd: eval mode under no_grad; fwd+bwd: train mode, backward to the input and the parameters "
            "(EMAU with grad=none, so no gradient flows through the EM iterations, as in the public code)",
            _precision_note(s),
        ],
    )


@section("networks")
def run_networks(s: ProfileSettings, console: Console) -> SectionResult:
    batch = s.section_batch(NETWORKS_BATCH)
    df = profile_networks(
        s.backbone, s.crop, batch, s.channels, s.bases, s.iters, NUM_CLASSES, s.device, s.torch_dtype, s.repeats,
        NETWORKS, console,
    )
    title = f"Networks: {s.backbone} output stride 8, crop {s.crop}, batch {batch}, {NUM_CLASSES} classes, {s.dtype}, {s.device}"
    tables = {"networks": (title, df)}
    ratios = network_ratios(df)
    if len(ratios):
        tables["networks_summary"] = (f"Networks summary ({s.backbone} OS8, crop {s.crop}, batch {batch}, {s.dtype}, {s.device})", ratios)
    return SectionResult(
        tables,
        [
            "emanet and psp: emactl's model (head=ema / head=psp); deeplabv3 and fcn: torchvision "
            f"{{deeplabv3,fcn}}_{s.backbone}(weights=None, weights_backbone=None, num_classes={NUM_CLASSES}, aux_loss=False), "
            "whose backbone is dilated to output stride 8",
            "train step: forward + cross-entropy + backward + SGD step in train mode; inference: eval mode under no_grad",
            "networks_summary: EMANet time / DeepLabV3 time, from this table (same backbone, crop, batch and precision)",
            "GMACs/img: " + MACS_NOTE,
            TIMING_NOTE,
            _threads_note(s),
            _precision_note(s),
        ],
    )


@section("scaling")
def run_scaling(s: ProfileSettings, console: Console) -> SectionResult:
    batch = s.section_batch(SCALING_BATCH)
    raw, fits = profile_scaling(
        s.head_names(SCALING_HEADS), s.sizes, s.channels, batch, s.bases, s.iters, s.device, s.torch_dtype, s.repeats, console
    )
    sizes = ",".join(map(str, s.sizes))
    return SectionResult(
        {
            "scaling": (f"Scaling measurements: C={s.channels}, sizes {sizes}, batch {batch}, {s.dtype}, {s.device}", raw),
            "scaling_exponents": (f"Scaling exponents p in cost ~ N^p, N = H*W (sizes {sizes})", fits),
        },
        [
            "exponent: least-squares slope of log(cost) against log(N) over the sizes; forward pass, eval mode, no_grad",
            "at small N the linear 1x1-conv terms still dominate the non-local block, so its exponent only nears 2 once N >> C",
            measured_note(s.device),
            TIMING_NOTE,
            _threads_note(s),
            _precision_note(s),
        ],
    )


@section("published")
def run_published(s: ProfileSettings, console: Console) -> SectionResult:
    tables = {
        "published": (
            "Published check: ResNet-101, output stride 8, 513x513, batch 1 (ours / published)",
            published_check(console),
        )
    }
    notes = [
        f"published values: {SOURCE}; G = 1e9 and M = 1e6",
        "counted on meta tensors (no compute); extra = full network minus its backbone, or the context part alone",
        MACS_NOTE,
        SAVED_NOTE + "; fp32, batch 1, eval-mode BN",
        "convention found: " + CONVENTION_NOTE,
        "memory: the paper does not say how it measured memory; activations saved for backward match its "
        "DeepLabV3 figure but not its EMANet or backbone figures, so memory ratios are for reference only",
    ]
    if s.published_memory:
        tables["published_memory"] = (
            f"Published check, measured inference memory at 513x513 on {s.device}",
            measured_published_memory(s.device, console),
        )
        notes.append("published_memory: " + measured_note(s.device) + "; eval mode, no_grad, fp32, batch 1")
    return SectionResult(tables, notes)


@section("ema")
def run_ema(s: ProfileSettings, console: Console) -> SectionResult:
    size, batch = s.section_size(EMA_SIZE), s.section_batch(EMA_BATCH)
    dtypes = benchmark_dtypes(s.device, s.torch_dtype)
    df, summary = profile_em_attention(batch, s.channels, size, s.bases, s.iters, s.device, dtypes, s.repeats, console)
    console.log("ema: timing em_attention's ops one by one")
    ops = profile_em_ops(batch, s.channels, size, s.bases, s.iters, s.device, dtypes, s.repeats)
    shape = f"B={batch}, C={s.channels}, N={size}x{size}, K={s.bases}, T={s.iters}"
    return SectionResult(
        {
            "ema": (f"EM attention against the reference and GEMM: {shape}, {s.device}", df),
            "ema_summary": (f"EM attention summary ({shape}, {s.device})", summary),
            "ema_ops": (f"Where em_attention's time goes ({shape}, {s.device})", ops),
        },
        [
            "FLOPs of EM attention: 2*B*N*K*C (E step) + 2*B*N*K*C (M step) per iteration, + 2*B*C*N*K "
            "(reconstruction) once = (4T+2)*B*N*K*C; softmax and normalisations not counted",
            "reference: the original repository's algorithm written plainly (emactl/profile/reference.py); "
            "em_attention: emactl.nn.ema.em_attention(grad='none'); both on the same inputs, in this run",
            f"GEMM rate: torch.bmm at the E-step's shape and a square {SQUARE.get(s.device.type, SQUARE['cpu'])}^3 "
            "torch.mm, same dtype, measured in this run",
            "dtypes: the inputs are cast (no autocast); fp32 and bf16 always, plus --dtype",
            "ema_ops: each op of em_attention timed alone on inputs of its shape, in the same rounds as the whole call; "
            "share = calls x time per call / em_attention time; the ops run on whole tensors, as em_attention does with "
            "method=bmm; em_attention, method=...: each way of running the iterations (emactl.nn.em_cpu), timed in the "
            "same rounds; the whole call uses method=auto, which on the CPU times the methods that apply "
            "(emactl.nn.em_cpu.candidates) on its first call of a shape and keeps the fastest (tune_methods)",
            TIMING_NOTE,
            _threads_note(s),
        ],
    )


def tf32_note() -> str:
    """How fp32 convolutions and matmuls run on CUDA in this process (TF32 or full fp32)."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    return (f"fp32 convolutions {'in TF32' if conv else 'in full fp32'} (torch.backends.cudnn.allow_tf32={conv}, "
            f"PyTorch's default is True), fp32 matmuls {'in TF32' if mm else 'in full fp32'}")


ALLOCATOR_VARIABLES = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", "TCMALLOC_RELEASE_RATE")


def allocator_settings() -> dict[str, str]:
    """The environment variables that change how the C allocator hands out and returns memory
    (glibc's tunables and ``MALLOC_*`` variables, a preloaded jemalloc or tcmalloc), as set."""
    return {k: v for k, v in sorted(os.environ.items()) if k in ALLOCATOR_VARIABLES or k.startswith("MALLOC_")}


def allocator_note() -> str:
    settings = allocator_settings()
    return "; ".join(f"{k}={v}" for k, v in settings.items()) if settings else "none set here: the C library's defaults"


def unit_threads(s: ProfileSettings) -> list[int]:
    """One thread and all of them on the CPU (``--threads`` replaces "all"); torch's choice elsewhere."""
    if s.device.type != "cpu":
        return [torch.get_num_threads()]
    return sorted({1, s.threads or os.cpu_count() or 1})


@section("unit", "the whole EMA unit against the public code's, eval and training, at 1 and all threads.")
def run_unit(s: ProfileSettings, console: Console) -> SectionResult:
    size, batch = s.section_size(EMA_SIZE), s.section_batch(EMA_BATCH)
    dtypes = benchmark_dtypes(s.device, s.torch_dtype)
    threads = unit_threads(s)
    shape = f"B={batch}, C={s.channels}, N={size}x{size}, K={s.bases}, T={s.iters}"
    console.log(f"unit: timing the whole EMA unit against the reference unit ({shape}; threads {threads})")
    df, summary = profile_unit(batch, s.channels, size, s.bases, s.iters, s.device, dtypes, threads, s.repeats)
    work = df.groupby(["unit", "mode"])["GFLOP"].first()
    work_ratio = ", ".join(f"{work[('emactl', m)] / work[('reference', m)]:.3f} in {m}" for m in ("eval", "train"))
    return SectionResult(
        {
            "unit": (f"The whole EMA unit against the public code's unit: {shape}, {s.device}", df),
            "unit_summary": (f"EMA unit: emactl / reference time with its spread, low to high ({shape}, {s.device})", summary),
        },
        [
            "reference: the original code's EMA unit written plainly (emactl/profile/unit.py ReferenceEMAU): conv1, "
            "T EM iterations under no_grad, ReLU, conv2 + BN, residual, ReLU; its training script's moving average",
            "emactl: EMAU as the recipes build it (conv1 folded into the EM products, grad=none, renorm=false); "
            "emactl unfolded: the same with model.ema.fold=false; emactl plain products: folded, but every product a plain "
            "torch.bmm (no measured CPU method for the EM iterations or conv2); emactl unfused tail: conv2, BN, residual "
            "and ReLU in training as separate layers on new tensors (EMAU.fuse_tail=False; the fused tail runs on the CPU "
            "only); all share weights, bases and BN state",
            "eval: forward under no_grad in eval mode; train: training-mode forward, backward from a fixed random output "
            "gradient (as the layers after the unit hand it one; no loss is timed) and the bases update; bf16: under torch.autocast (parameters fp32)",
            "input: the dtype of the unit's input and of its output's gradient; fp32 for a unit run alone, and for bf16 also "
            "bf16, as the unit runs inside EMANet under autocast (the head's 3x3 conv + BN + ReLU before it gives bf16, and "
            "the conv after it hands back a bf16 gradient): then nothing is cast into the unit or out of it",
            "low, high: the spread of a ratio over the rounds, q1(emactl)/q3(reference) and q3(emactl)/q1(reference)",
            "GFLOP: the unit's matrix products per call (conv, mm, bmm; 2 per multiply-add; forward, and in train the "
            "backward), counted by torch FlopCounterMode on a meta copy (emactl.profile.unit.unit_gflop); fraction of mm "
            f"rate: GFLOP / time against a square {SQUARE.get(s.device.type, SQUARE['cpu'])}^3 torch.mm of the same dtype "
            "timed in the same rounds",
            f"work ratio, emactl / reference GFLOP: {work_ratio}: the time ratio of two units that run their products "
            "at the same fraction of the mm rate and spend nothing else",
            "page faults / call: the process's minor page faults (getrusage) per timed call of the unit, its warm-up "
            "call left out: memory the allocator hands out fresh is faulted in on its first write, so this shows how "
            "much of a call's time may go to new memory rather than to its work. The count depends on the C "
            f"allocator's settings ({allocator_note()}); with GLIBC_TUNABLES=glibc.malloc.mmap_max=0:"
            "glibc.malloc.trim_threshold=4294967295 glibc keeps freed memory and neither unit faults (docs/BENCHMARKS.md)",
            "train output vs float64: max |output - float64 output| / max |float64 output| of one training-mode "
            "forward with autograd of each unit (fp32, or under bf16 autocast) against a float64 copy of itself, "
            "on the first two images",
            *([f"fp32 on CUDA: {tf32_note()}"] if s.device.type == "cuda" else []),
            TIMING_NOTE,
        ],
    )


@section(
    "train",
    "EMANet's training step in fp32 eager against bf16 autocast + channels_last (and torch.compile with "
    "--compile), and against DeepLabV3.",
)
def run_train(s: ProfileSettings, console: Console) -> SectionResult:
    batch = s.section_batch(TRAIN_BATCH)
    dtype = mixed_dtype(s.device, s.torch_dtype)
    frames, summaries = [], []
    previous, thread_counts = torch.get_num_threads(), unit_threads(s)
    try:
        for threads in thread_counts:
            if s.device.type == "cpu":
                torch.set_num_threads(threads)
            df, summary = profile_training(
                s.backbone, s.crop, batch, s.channels, s.bases, s.iters, NUM_CLASSES, s.device, dtype, s.repeats,
                s.compile and threads == thread_counts[-1], s.compile_timeout, TRAIN_NETWORKS, console,
            )
            frames.append(df.assign(threads=threads))
            summaries.append(summary.assign(threads=threads))
    finally:
        torch.set_num_threads(previous)
    df, summary = pd.concat(frames, ignore_index=True), pd.concat(summaries, ignore_index=True)
    shape = f"{s.backbone} output stride 8, crop {s.crop}, batch {batch}, {NUM_CLASSES} classes, {s.device}"
    fast = f"{DTYPE_NAMES[dtype]}+channels_last"
    notes = [
        "train step: forward + cross-entropy + backward + SGD step (momentum 0.9) in train mode on one fixed batch, "
        "as in the networks section; every variant of a network starts from the same weights",
        "fp32 eager: fp32, contiguous NCHW model and input, no compilation (the baseline of every ratio)"
        + (
            "; cudnn.benchmark on for every variant (kernels chosen in the warm-up step); " + tf32_note()
            if s.device.type == "cuda"
            else ""
        ),
        f"{fast}: forward under torch.autocast({dtype}) with fp32 parameters; model and input "
        "converted with to(memory_format=torch.channels_last) (train.amp + train.channels_last)",
        f"threads: the section runs at {' and '.join(map(str, unit_threads(s)))} CPU thread(s) (1 and all, or --threads)"
        if s.device.type == "cpu" else "threads: torch's choice on the GPU",
        "head share: EMANet's head alone (reduce, EMA unit, project, classifier; forward + backward on the step's "
        "layer-4 features) over the whole step, timed in the same rounds",
        "speed-up over fp32 eager = fp32 eager time / variant time, for the same network; "
        "EMANet / DeepLabV3 = EMANet step time / DeepLabV3 step time in the same variant",
        f"EMANet: emactl's model, EMAU grad={EMAConfig().grad}; DeepLabV3: torchvision deeplabv3_{s.backbone}(weights=None, "
        f"weights_backbone=None, num_classes={NUM_CLASSES}, aux_loss=False)",
    ]
    if s.compile:
        notes.append(
            f"{fast}+compile: torch.compile(model) on EMANet only, compiled before timing within a "
            f"{s.compile_timeout:g} s cap (--compile-timeout) and skipped, with the reason, if it fails or runs past it; "
            "compile time depends on torch inductor's on-disk cache (much shorter on a second run)"
        )
    else:
        notes.append("torch.compile: not timed (add --compile; compiling EMANet's training step takes minutes on a CPU)")
    notes += [
        "GFLOP/img: one training step's forward + cross-entropy + backward per image, counted by torch "
        "FlopCounterMode on meta tensors (2 FLOPs per multiply-add, convolutions and matrix products only)",
        f"fraction of mm rate: (GFLOP/img x img/s) / the rate of a square {SQUARE.get(s.device.type, SQUARE['cpu'])}^3 "
        "torch.mm in the variant's dtype (mm dtype), timed in the same run after the steps: the machine's GEMM rate "
        "as torch.mm reaches it (on the CPU, oneDNN's convolutions can beat MKL's sgemm, so fp32 fractions above 1 occur)",
        TIMING_NOTE,
        _threads_note(s),
    ]
    return SectionResult(
        {
            "train": (f"Training step: fp32 eager against {fast}: {shape}", df),
            "train_summary": (f"Training step summary ({shape})", summary),
        },
        notes,
    )


@section("export", "the network exported to ONNX under onnxruntime against eager PyTorch.", default=False,
         extra="export")
def run_export(s: ProfileSettings, console: Console) -> SectionResult:
    batch = s.section_batch(EXPORT_BATCH)
    df = profile_export(s.backbone, s.crop, batch, s.channels, s.bases, s.iters, NUM_CLASSES, s.repeats, console)
    title = f"Exported EMANet: {s.backbone}, crop {s.crop}, batch {batch}, K={s.bases}, T={s.iters}, fp32, cpu"
    return SectionResult(
        {"export": (title, df)},
        [
            "eager PyTorch: emactl's model in eval mode under inference_mode (what emactl predict runs); onnxruntime: "
            "the same network exported as emactl export does (BN folded, EM iterations fixed), CPUExecutionProvider, "
            "intra-op threads = torch's threads",
            "same input batch for both; mask agreement and max relative logit error of onnxruntime against eager",
            TIMING_NOTE,
            _threads_note(s),
        ],
    )


DEFAULT_SECTIONS = tuple(name for name, sec in SECTIONS.items() if sec.default)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def environment(s: ProfileSettings) -> dict:
    """What ran where: library versions, device, threads, load, date and the resolved options."""
    settings = asdict(s)
    settings["device"] = str(s.device)
    settings["out"] = str(s.out)
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": str(s.device),
        "device_name": _device_name(s.device),
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": _load_average(),
        "platform": platform.platform(),
        "allocator": allocator_settings(),
        "settings": settings,
    }


def run_profile(s: ProfileSettings, console: Console) -> dict[str, SectionResult]:
    """Run ``s.sections`` in order; every table is written as soon as its section ends.

    On the CPU, torch runs with ``s.threads`` threads (see :func:`ProfileSettings.cpu_threads`)
    for the duration of the run.
    """
    previous = torch.get_num_threads()
    threads = s.cpu_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_sections(s, console)
    finally:
        torch.set_num_threads(previous)


def _run_sections(s: ProfileSettings, console: Console) -> dict[str, SectionResult]:
    s.out.mkdir(parents=True, exist_ok=True)
    env = environment(s)
    write_json(s.out / "env.json", env)
    results: dict[str, SectionResult] = {}
    durations: dict[str, float] = {}
    notes_md = []
    for name in s.sections:
        start = time.perf_counter()
        result = SECTIONS[name].run(s, console)
        durations[name] = round(time.perf_counter() - start, 2)
        results[name] = result
        for stem, (title, df) in result.tables.items():
            save_table(df, s.out / stem, json=True)
            print_table(df, title, console)
        for note in result.notes:
            console.print(f"[dim]- {note}[/dim]", highlight=False)
        console.print(f"[dim]{name}: {durations[name]:.1f} s[/dim]\n")
        notes_md.append(f"## {name}\n\n" + "\n".join(f"- {n}" for n in result.notes) + "\n")
        write_text(s.out / "notes.md", "# emactl profile: how each table was measured\n\n" + "\n".join(notes_md))
    env.update(section_seconds=durations, load_average_end=_load_average())
    write_json(s.out / "env.json", env)
    console.print(f"wrote {', '.join(sorted(p.name for p in s.out.iterdir() if not p.name.startswith('.')))} to {s.out}/")
    return results
