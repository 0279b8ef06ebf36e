"""Latency as the median of repeated runs after warm-up, with ``torch.utils.benchmark.Timer``.

The Timer synchronises the accelerator before it reads the clock (so CUDA kernels are waited
for) and runs with all of torch's intra-op threads (its default is one). A first untimed call
warms up lazy initialisation, allocator pools and kernel selection; that call's duration also
sizes ``blocked_autorange`` so that slow statements still give ``min_runs`` measurements.
"""
from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import benchmark

TIMING_NOTE = (
    "latency: median of repeated runs after warm-up (torch.utils.benchmark.Timer.blocked_autorange, "
    "accelerator synchronised before each clock read)"
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Timing:
    """Median and interquartile range of one call, in seconds, over ``runs`` measurements."""

    median: float
    iqr: float
    runs: int

    @property
    def ms(self) -> float:
        return self.median * 1e3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], Any],
    device: torch.device,
    min_runs: int = 3,
    min_time: float = 0.2,
    max_time: float = 30.0,
    warmup: int = 1,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then at least ``min_runs`` timed runs if they fit
    in ``max_time`` seconds, and at least ``min_time`` seconds of runs. Returns the median."""
    estimate = 0.0
    for _ in range(max(1, warmup)):
        start = time.perf_counter()
        fn()
        synchronize(device)
        estimate = time.perf_counter() - start
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    budget = min(max_time, max(min_time, min_runs * estimate * 1.05))
    m = timer.blocked_autorange(min_run_time=budget)
    return Timing(m.median, m.iqr, len(m.times))


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Mixed precision for ``bf16``/``fp16`` (parameters stay fp32, as in training); fp32: no-op."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
