"""Devices and precisions by name: the one device resolver, dtype table and autocast helper.

Every command takes ``--device auto|cpu|cuda|cuda:N`` and every precision option names a dtype
(``fp32``, ``bf16``, ``fp16``); these are the only places the names are turned into torch objects.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP = ("none", "bf16", "fp16")  # train.amp / eval amp: "none" is fp32 without autocast


def resolve_device(name: str, option: str = "--device", local_rank: int = 0,
                   local_world_size: int = 1) -> torch.device:
    """``auto`` → CUDA when available, else the CPU; ``cuda`` → this process's local GPU.

    ``option`` names the setting in errors (``--device``, ``train.device``). NCCL needs a GPU of
    its own for every process, so with more processes on this node (``local_world_size``) than
    GPUs, ``auto`` picks the CPU and ``cuda`` is an error.
    """
    text = name.strip().lower()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text == "auto":
        text = "cuda" if 0 < gpus and local_world_size <= gpus else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"{option}: got {name!r}; choose one of auto, cpu, cuda, cuda:N")
    if device.type == "cpu":
        return torch.device("cpu")
    if not gpus:
        raise UserError(f"{option} {name}: CUDA is not available on this machine; use --device cpu or auto")
    if local_world_size > gpus:
        raise UserError(
            f"{option} {name}: {local_world_size} processes on this node but {gpus} GPU(s), and NCCL needs one "
            f"GPU per process; start torchrun with --nproc_per_node {gpus}, or use --device cpu"
        )
    if device.index is None:
        return torch.device("cuda", local_rank % gpus)
    if device.index >= gpus:
        raise UserError(f"{option} {name}: only {gpus} CUDA device(s) present")
    return device


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` setting (``none``, ``bf16``, ``fp16``); None for ``none``."""
    if amp not in AMP:
        raise UserError(f"amp: got {amp!r}; choose one of: {', '.join(AMP)}")
    return None if amp == "none" else DTYPES[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision in ``dtype`` with parameters kept fp32, as in training; None or fp32: no-op."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
