"""Memory: the peak a call adds on its device, and activation memory counted on meta tensors.

Two methods, and every table says which one it used:

* **measured peak** (:func:`peak_memory`): on CUDA, ``torch.cuda.max_memory_allocated`` minus
  the memory allocated before the call; on the CPU, the peak of the running sum of the
  allocation and free events that ``torch.profiler.profile(profile_memory=True)`` records
  during the call. Both count tensor memory only (not the CUDA caching allocator's reserve,
  not the process's RSS), and neither counts what was allocated before the call.
* **saved for backward** (:func:`saved_tensor_bytes`): the bytes of the distinct tensors that
  autograd saves for the backward pass, seen through ``torch.autograd.graph.saved_tensors_hooks``
  during a forward pass on meta tensors; parameters and buffers are excluded, and a storage
  saved twice (e.g. by a ReLU and the conv after it) counts once. This is the activation
  memory of training, computed without running anything.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

MEASURED_NOTE = {
    "cuda": "peak memory: torch.cuda.max_memory_allocated during the call minus memory allocated before it",
    "cpu": (
        "peak memory: peak of the running sum of allocation/free events recorded by "
        "torch.profiler (profile_memory=True) during the call; tensor memory only; on the CPU this "
        "includes oneDNN's per-call copy of each conv weight into its blocked layout, a term "
        "that does not grow with H*W"
    ),
}
SAVED_NOTE = (
    "activation memory: bytes of distinct tensors saved for backward "
    "(torch.autograd.graph.saved_tensors_hooks on meta tensors; parameters and buffers excluded)"
)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Silence fd 2 while profiling: the profiler's native code logs there on start and stop, and
    warns about every block freed that was allocated before it started (which we mean to skip)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak(fn: Callable[[], Any]) -> int:

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():
        prof.start()
        try:
            fn()
        finally:
            prof.stop()
    cpu = torch._C._autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes of tensor memory that ``fn()`` holds at its peak beyond what existed before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    return _cpu_peak(fn)


def measured_note(device: torch.device) -> str:
    return MEASURED_NOTE["cuda" if device.type == "cuda" else "cpu"]


def _storage_key(t: Tensor) -> int:
    # The address of the StorageImpl: views of one tensor share it, and it stays unique while
    # the tensor is alive (the autograd graph keeps every saved tensor alive until we finish).
    return t.untyped_storage()._cdata


def saved_tensor_bytes(model: nn.Module, x: Tensor, parts: Mapping[str, str] | None = None) -> dict[str, dict[int, int]]:
    """Storages saved for backward during ``model(x)``, per part: {part: {storage: bytes}}.

    ``parts`` maps a label to a submodule name (``""`` is the whole model); a storage belongs
    to every part whose forward was running when autograd saved it. Run on meta tensors to
    count without compute; gradients must be enabled (they are, inside this function).
    """
    parts = dict(parts or {"": ""})
    excluded = {_storage_key(t) for t in [*model.parameters(), *model.buffers()]}
    active: dict[str, int] = {label: 0 for label in parts}
    saved: dict[str, dict[int, int]] = {label: {} for label in parts}
    handles = []
    for label, name in parts.items():
        if name == "":
            active[label] = 1
            continue
        sub = model.get_submodule(name)

        def enter(_m: nn.Module, _args: Any, label: str = label) -> None:
            active[label] += 1

        def leave(_m: nn.Module, _args: Any, _out: Any, label: str = label) -> None:
            active[label] -= 1

        handles += [sub.register_forward_pre_hook(enter), sub.register_forward_hook(leave)]

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key not in excluded:
            for label, depth in active.items():
                if depth:
                    saved[label][key] = t.untyped_storage().nbytes()
        return t

    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        del out
    finally:
        for h in handles:
            h.remove()
    return saved


def total_bytes(storages: Mapping[int, int], minus: Mapping[int, int] | None = None) -> int:
    """Sum of ``storages`` not also in ``minus`` (e.g. a head's activations beyond its backbone's)."""
    minus = minus or {}
    return sum(n for k, n in storages.items() if k not in minus)
