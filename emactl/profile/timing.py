"""Latency as the median of repeated runs after warm-up, measured round-robin.

Every candidate of a comparison is measured in the same rounds: one warm-up call each (lazy
initialisation, allocator pools, kernel selection), then ``rounds`` rounds in which each
candidate is timed in turn. Interleaving matters on a shared machine: a burst of load from
elsewhere then slows every candidate of a round alike instead of whichever ran during it, so
ratios between candidates stay meaningful even when absolute times are noisy.

How one candidate is timed in a round:

* fast calls (under :data:`FAST` seconds): ``torch.utils.benchmark.Timer.blocked_autorange``,
  which runs blocks of many calls so that clock overhead vanishes, with all of torch's
  threads (the Timer's default is one) and the accelerator synchronised before each clock read;
* slow calls: one call between two reads of ``time.perf_counter``, each after synchronising
  the device — the clock overhead is then negligible, and a blocked run would cost an extra
  untimed call per round.

The reported value is the median over all rounds.
"""
from __future__ import annotations

import logging
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import torch


# torch.utils.benchmark imports cpp_extension, which warns on CUDA-less machines that have a
# CUDA_HOME; that warning is about compiling extensions, which we never do.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils import benchmark  # noqa: E402

TIMING_NOTE = (
    "latency: median over interleaved rounds after one warm-up call (calls under 20 ms: "
    "torch.utils.benchmark.Timer.blocked_autorange; longer calls: one call per round between "
    "device synchronisations)"
)
FAST = 0.02

K = TypeVar("K")


@dataclass(frozen=True)
class Timing:
    """Median and interquartile range of one call, in seconds, over ``runs`` measurements."""

    median: float
    iqr: float
    runs: int
    q1: float = 0.0  # first and third quartiles, for the spread of ratios
    q3: float = 0.0

    @property
    def ms(self) -> float:
        return self.median * 1e3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def measure_many(
    fns: Mapping[K, Callable[[], Any]],
    device: torch.device,
    rounds: int = 3,
    min_time: float = 0.05,
) -> dict[K, Timing]:
    """Time every ``fns[key]()`` in ``rounds`` interleaved rounds after one warm-up call each.

    ``min_time`` is the least time a fast call is run for in each round.
    """
    estimates = {key: _timed_call(fn, device) for key, fn in fns.items()}  # warm-up
    times: dict[K, list[float]] = {key: [] for key in fns}
    timers = {
        key: benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        for key, fn in fns.items()
        if estimates[key] < FAST
    }
    for _ in range(max(1, rounds)):
        for key, fn in fns.items():
            if key in timers:
                times[key].extend(timers[key].blocked_autorange(min_run_time=min_time).times)
            else:
                times[key].append(_timed_call(fn, device))
    result = {}
    for key, values in times.items():
        q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
        result[key] = Timing(statistics.median(values), q[2] - q[0], len(values), q[0], q[2])
    return result


COUNTS_FAULTS = sys.platform != "win32"  # getrusage, from the resource module, is Unix-only


def minor_faults() -> int | None:
    """The process's minor page faults so far (``getrusage``, all threads), or None where the
    ``resource`` module is missing (Windows)."""
    if not COUNTS_FAULTS:
        return None
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class FaultCount:
    """``fn`` that counts the minor page faults of its calls, the first (warm-up) call left out.

    On the CPU a tensor the allocator maps fresh is page-faulted on its first write; how many
    faults a call takes shows how much of its memory is new each time (docs/BENCHMARKS.md).
    """

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn, self.calls, self.faults = fn, -1, 0

    def __call__(self) -> Any:
        before = minor_faults()
        out = self.fn()
        self.calls += 1
        if self.calls > 0 and COUNTS_FAULTS:
            self.faults += minor_faults() - before
        return out

    @property
    def per_call(self) -> float | None:
        """Faults per counted call, or None before any or without ``resource``."""
        return self.faults / self.calls if self.calls > 0 and COUNTS_FAULTS else None


def measure(fn: Callable[[], Any], device: torch.device, rounds: int = 3, min_time: float = 0.05) -> Timing:
    """Time a single ``fn()`` (see :func:`measure_many`)."""
    return measure_many({"fn": fn}, device, rounds, min_time)["fn"]
