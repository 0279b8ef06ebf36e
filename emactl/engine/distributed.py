"""torch.distributed helpers: set-up from torchrun's environment, rank queries, reductions.

``torchrun --nproc_per_node N -m emactl train RECIPE`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and
starts a process group with NCCL on CUDA and gloo on the CPU. Without those variables (a plain
``emactl train``) nothing is initialised and every helper answers as a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..device import resolve_device
from ..errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group from torchrun's variables (if present) and pick the device.

    NCCL is used when the device is CUDA, gloo otherwise. A second call reuses the group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    dev = resolve_device(device, "train.device", local_rank, local_world_size)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not is_initialized():
        if not dist.is_available():
            raise UserError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(minutes=30)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    if is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    """Destroy the process group, if one was started."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized() and get_world_size() > 1:
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce ``tensor`` in place (``sum``, ``mean`` or ``max``) and return it."""
    if not is_initialized() or get_world_size() == 1:
        return tensor
    if op == "mean":
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= get_world_size()
    elif op == "sum":
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    elif op == "max":
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    else:
        raise ValueError(f"unknown reduction {op!r}")
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list without a process group)."""
    if not is_initialized() or get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_initialized() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def convert_sync_bn(model: nn.Module, device: torch.device, enabled: bool) -> nn.Module:
    """Convert BatchNorm to SyncBatchNorm — on CUDA with several processes only.

    SyncBN has no CPU kernels; on the CPU (gloo) each rank keeps plain per-rank BN statistics.
    """
    if enabled and device.type == "cuda" and get_world_size() > 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
