"""Training-step speed of EMANet in fp32 eager against the fast paths, and against DeepLabV3.

Variants of one training step (forward + cross-entropy + backward + SGD step, train mode), all
timed in the same interleaved rounds on one fixed batch:

* ``fp32 eager``: fp32, contiguous (NCHW) model and input, no compilation — the baseline;
* ``bf16+channels_last`` (``fp16`` where asked for on CUDA): the forward under
  ``torch.autocast`` with fp32 parameters, model and input in ``torch.channels_last`` — what
  ``train.amp=bf16 train.channels_last=true`` does;
* ``bf16+channels_last+compile`` (opt-in): the same with ``torch.compile`` on the model. It is
  compiled before the timing, within a time cap; if compiling fails or runs past the cap the
  variant is skipped and the table says why.

EMANet and torchvision's DeepLabV3 use the same dilated backbone (output stride 8), crop, batch
and classes as the networks section. Every variant of a network starts from the same weights.

How close a step comes to the machine: its FLOPs (forward + backward, counted on meta tensors
by :func:`train_step_flops`) over its time, against the rate of a square ``torch.mm`` in the
variant's dtype, timed in the same run right after the steps (2048³ on the CPU, 8192³ on a GPU).
"""
from __future__ import annotations

import copy
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import pandas as pd
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..device import autocast
from ..engine.cudnn import cudnn_benchmark
from .emattention import DTYPE_NAMES, SQUARE
from .networks import _step_fns, build_network
from .timing import measure_many

TRAIN_NETWORKS = ("emanet", "deeplabv3")
DISPLAY = {"emanet": "EMANet", "deeplabv3": "DeepLabV3"}
EAGER = "fp32 eager"


def mixed_dtype(device: torch.device, requested: torch.dtype) -> torch.dtype:
    """The low-precision dtype of the fast variant: ``--dtype`` if not fp32, else bf16 where the
    device has it (fp16 on a CUDA device without bf16)."""
    if requested != torch.float32:
        return requested
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


HEAD = "head only"


def head_step(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    """Forward and backward of EMANet's head alone (reduce, EMA unit, project, classifier) on the
    layer-4 features of ``x``, as the training step runs it; for the head's share of the step."""
    with torch.no_grad():
        feats = model.backbone(x)["layer4"].detach().requires_grad_()
    head = model.head

    def step() -> None:
        head.train()
        feats.grad = None
        with autocast(x.device, dtype):
            out = head(feats)
        out.float().sum().backward()

    return step


def train_step_flops(name: str, backbone: str, crop: int, num_classes: int, channels: int, bases: int, iters: int) -> int:
    """FLOPs of one training step per image: forward, cross-entropy and backward in train mode,
    counted by FlopCounterMode on meta tensors (2 per multiply-add, convolutions and matrix
    products only; the optimizer step is elementwise and not counted)."""
    batch = 2  # train-mode BatchNorm after 1x1 pooling needs two samples
    with torch.device("meta"):
        model = build_network(name, backbone, num_classes, channels, bases, iters)
    model.train()
    x = torch.empty(batch, 3, crop, crop, device="meta")
    target = torch.zeros(batch, crop, crop, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        loss = F.cross_entropy(model(x)["out"], target, ignore_index=255)
        loss.backward()
    return counter.get_total_flops() // batch


class CompileTimeout(BaseException):
    """Raised inside a capped compilation; a BaseException so torch's handlers pass it on."""


@contextmanager
def time_cap(seconds: float) -> Iterator[bool]:
    """Raise :class:`CompileTimeout` in the block after ``seconds`` (SIGALRM, main thread only).

    Yields whether the cap is armed: without SIGALRM (Windows) or off the main thread it is not.
    A timer that was already running (pytest-timeout's, say) is restored afterwards, less the
    time spent in the block.
    """
    armed = seconds > 0 and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not armed:
        yield False
        return

    def _expire(signum, frame):  # noqa: ARG001
        raise CompileTimeout

    previous = signal.signal(signal.SIGALRM, _expire)
    start = time.monotonic()
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay > 0:
            left = max(outer_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)


@dataclass
class Compiled:
    """The compiled training step, or why there is none; ``seconds``: compilation + warm-up."""

    step: Callable[[], None] | None
    seconds: float
    note: str


def compile_step(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, dtype: torch.dtype, timeout: float,
    compile_fn: Callable[[nn.Module], nn.Module] = torch.compile,
) -> Compiled:
    """``torch.compile`` the model and run two training steps (compilation happens in the first,
    a guard-triggered recompilation in the second) within ``timeout`` seconds."""
    start = time.perf_counter()
    try:
        with time_cap(timeout) as armed:
            step, _ = _step_fns(compile_fn(model), x, target, dtype)
            step()
            step()
    except CompileTimeout:
        _reset_dynamo()
        return Compiled(None, time.perf_counter() - start, f"skipped: compiling took over the {timeout:g} s cap")
    except Exception as e:  # noqa: BLE001 - any failure to compile or run compiled means "skip"
        _reset_dynamo()
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return Compiled(None, time.perf_counter() - start, f"skipped: torch.compile failed ({type(e).__name__}: {first})")
    seconds = time.perf_counter() - start
    note = f"compile + 2 warm-up steps: {seconds:.0f} s"
    if not armed:
        note += " (no time cap on this platform)"
    return Compiled(step, seconds, note)


def _reset_dynamo() -> None:
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass


def profile_training(
    backbone: str,
    crop: int,
    batch: int,
    channels: int,
    bases: int,
    iters: int,
    num_classes: int,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    repeats: int = 3,
    use_compile: bool = False,
    compile_timeout: float = 300.0,
    names: tuple[str, ...] = TRAIN_NETWORKS,
    console: Console | None = None,
    compile_fn: Callable[[nn.Module], nn.Module] = torch.compile,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per (network, variant) and the summary ratios; see the module docstring.

    ``dtype`` is the low-precision dtype of the fast variants; ``use_compile`` adds the compiled
    variant of the first network (EMANet) only.
    """
    fast = f"{DTYPE_NAMES[dtype]}+channels_last"
    compiled_name = f"{fast}+compile"
    x = torch.randn(batch, 3, crop, crop, device=device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, num_classes, (batch, crop, crop), device=device)
    fns: dict[tuple[str, str], Callable[[], None]] = {}
    notes: dict[tuple[str, str], str] = {}
    for i, name in enumerate(names):
        model = build_network(name, backbone, num_classes, channels, bases, iters).to(device)
        fast_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        compiled_model = copy.deepcopy(fast_model) if use_compile and i == 0 else None
        fns[(name, EAGER)] = _step_fns(model, x, target, torch.float32)[0]
        fns[(name, fast)] = _step_fns(fast_model, x_cl, target, dtype)[0]
        if name == "emanet":
            fns[(name, f"{HEAD}, {EAGER}")] = head_step(model, x, torch.float32)
            fns[(name, f"{HEAD}, {fast}")] = head_step(fast_model, x_cl, dtype)
        if compiled_model is not None:
            if console is not None:
                console.log(f"train: compiling {name} with torch.compile (cap {compile_timeout:g} s)")
            result = compile_step(compiled_model, x_cl, target, dtype, compile_timeout, compile_fn)
            notes[(name, compiled_name)] = result.note
            if result.step is not None:
                fns[(name, compiled_name)] = result.step
            if console is not None:
                console.log(f"train: {name} {compiled_name}: {result.note}")
    square = SQUARE.get(device.type, SQUARE["cpu"])
    mm_dtypes = {EAGER: torch.float32, fast: dtype, compiled_name: dtype}
    mm_fns = {}
    for d in dict.fromkeys(mm_dtypes.values()):
        sq = torch.randn(square, square, device=device, dtype=d)
        mm_fns[("mm", DTYPE_NAMES[d])] = lambda sq=sq: torch.mm(sq, sq)
    if console is not None:
        console.log(f"train: timing {', '.join(f'{n} {v}' for n, v in fns)} ({backbone}, crop {crop}, batch {batch})")
    with cudnn_benchmark(device.type == "cuda"):  # fixed shapes, as in training
        timings = measure_many(fns, device, rounds=repeats)
        # the GEMM rate in rounds of its own, so that it leaves the steps' caches alone
        timings.update(measure_many(mm_fns, device, rounds=repeats))
    mm_rate = {d: 2 * square**3 / timings[("mm", d)].median for d in map(DTYPE_NAMES.get, mm_dtypes.values())}
    flops = {name: train_step_flops(name, backbone, crop, num_classes, channels, bases, iters) for name in names}
    rows = []
    keys = [k for k in fns if not k[1].startswith(HEAD)] + [k for k in notes if k not in fns]
    for name in names:
        base = timings[(name, EAGER)].median
        for key in (k for k in keys if k[0] == name):
            t = timings.get(key)
            rate = batch * flops[name] / t.median if t else float("nan")
            mm_name = DTYPE_NAMES[mm_dtypes[key[1]]]
            rows.append(
                {
                    "network": DISPLAY.get(name, name),
                    "variant": key[1],
                    "ms/step": t.ms if t else float("nan"),
                    "img/s": batch / t.median if t else float("nan"),
                    "time / fp32 eager": t.median / base if t else float("nan"),
                    "speed-up over fp32 eager": base / t.median if t else float("nan"),
                    "GFLOP/img": flops[name] / 1e9,
                    "TFLOP/s": rate / 1e12,
                    f"fraction of mm {square}^3 rate": rate / mm_rate[mm_name],
                    "mm dtype": mm_name,
                    "note": notes.get(key, ""),
                }
            )
    summary = []
    head = names[0]
    head_name = DISPLAY.get(head, head)
    eager = timings[(head, EAGER)].median
    summary.append((f"{fast} train step speed-up over fp32 eager ({head_name})", eager / timings[(head, fast)].median))
    for variant in (EAGER, fast):
        if (head, f"{HEAD}, {variant}") in timings:
            summary.append((f"{head_name} head (reduce, EMA unit, project, classifier) share of the {variant} step",
                            timings[(head, f"{HEAD}, {variant}")].median / timings[(head, variant)].median))
    for variant in (k[1] for k in fns if k[0] == head and not k[1].startswith(HEAD)):
        t = timings[(head, variant)].median
        d = DTYPE_NAMES[mm_dtypes[variant]]
        summary.append((f"{head_name} {variant} train throughput (img/s)", batch / t))
        summary.append(
            (f"{head_name} {variant} train FLOP rate / {d} mm {square}^3 rate", batch * flops[head] / t / mm_rate[d])
        )
    if (head, compiled_name) in timings:
        summary.append(
            (f"{compiled_name} train step speed-up over fp32 eager ({head_name})", eager / timings[(head, compiled_name)].median)
        )
        summary.append(
            (
                f"{compiled_name} train step speed-up over {fast} eager ({head_name})",
                timings[(head, fast)].median / timings[(head, compiled_name)].median,
            )
        )
    for other in names[1:]:
        other_name = DISPLAY.get(other, other)
        summary.append(
            (f"{fast} train step speed-up over fp32 eager ({other_name})", timings[(other, EAGER)].median / timings[(other, fast)].median)
        )
        for variant in (EAGER, fast):
            summary.append(
                (
                    f"{head_name} train step / {other_name} train step ({variant})",
                    timings[(head, variant)].median / timings[(other, variant)].median,
                )
            )
    summary += [(f"{d} mm {square}^3 rate (TFLOP/s)", r / 1e12) for d, r in mm_rate.items()]
    return pd.DataFrame(rows), pd.DataFrame(summary, columns=["metric", "value"])
