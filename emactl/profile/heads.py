"""Context modules side by side: EMAU, non-local, A², 3×3 conv, ASPP and PSP at one shape.

Every module maps C channels to C channels on an H×W map, as in the EMANet head where it sits
between the 2048→C reduction and the C→256 projection. Counts are per image (meta tensors);
memory and latency are for the whole batch on the chosen device.
"""
from __future__ import annotations

from typing import Callable

import pandas as pd
import torch
from rich.console import Console
from torch import nn

from ..config import EMAConfig, ModelConfig
from ..device import autocast
from ..nn.emanet import build_context
from .counting import count_module, count_params
from .memory import peak_memory
from .timing import measure_many


def head_config(channels: int, bases: int, iters: int) -> ModelConfig:
    """The model config the heads are built from (output stride 8: ASPP rates 12, 24, 36)."""
    return ModelConfig(head_channels=channels, output_stride=8, ema=EMAConfig(bases=bases, iters=iters))


def build_head(name: str, channels: int, bases: int = 64, iters: int = 3) -> nn.Module:
    """The registered context module ``name`` (C → C), built as ``emactl train`` builds it."""
    return build_context(name, channels, head_config(channels, bases, iters))


def meta_head(name: str, channels: int, bases: int, iters: int) -> nn.Module:
    with torch.device("meta"):
        return build_head(name, channels, bases, iters)


def _forward_and_train(module: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> tuple[Callable[[], None], Callable[[], None]]:
    """An inference call (eval, no_grad) and a training call (train mode, forward + backward to
    the input and the parameters, gradients reset first) of ``module`` on ``x``."""
    device = x.device
    grad_out = torch.ones_like(x)
    x_train = x.detach().clone().requires_grad_(True)

    def forward() -> None:
        module.eval()
        with torch.no_grad(), autocast(device, dtype):
            module(x)

    def train() -> None:
        module.train()
        module.zero_grad(set_to_none=True)
        x_train.grad = None
        with autocast(device, dtype):
            out = module(x_train)
        out.backward(grad_out.to(out.dtype))

    return forward, train


def profile_heads(
    names: tuple[str, ...],
    channels: int,
    size: int,
    batch: int,
    bases: int,
    iters: int,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int = 3,
    console: Console | None = None,
) -> pd.DataFrame:
    """One row per context module: parameters, MACs/FLOPs, elements, peak memory, latency.

    All modules see the same input and are timed in interleaved rounds; memory is measured
    after the timing runs, so caches and pools are warm.
    """
    shape = (1, channels, size, size)
    conv_macs = count_module(meta_head("conv3x3", channels, bases, iters), shape).macs
    x = torch.randn(batch, channels, size, size, device=device)
    modules = {name: build_head(name, channels, bases, iters).to(device) for name in names}
    calls = {name: _forward_and_train(module, x, dtype) for name, module in modules.items()}
    if console is not None:
        console.log(f"heads: timing {', '.join(names)} (C={channels}, {size}x{size}, batch {batch})")
    fns = {(name, mode): fn for name, pair in calls.items() for mode, fn in zip(("fwd", "train"), pair)}
    timings = measure_many(fns, device, rounds=repeats)
    rows = []
    for name in names:
        counts = count_module(meta_head(name, channels, bases, iters), shape)
        forward, train = calls[name]
        t_fwd, t_train = timings[(name, "fwd")], timings[(name, "train")]
        rows.append(
            {
                "head": name,
                "params (M)": count_params(modules[name]) / 1e6,
                "GMACs/img": counts.macs / 1e9,
                "GFLOPs/img": counts.flops / 1e9,
                "MACs / conv3x3": counts.macs / conv_macs,
                "non-GEMM Melem/img": counts.elements / 1e6,
                "fwd peak (MiB)": peak_memory(forward, device) / 2**20,
                "fwd+bwd peak (MiB)": peak_memory(train, device) / 2**20,
                "fwd (ms)": t_fwd.ms,
                "fwd+bwd (ms)": t_train.ms,
                "fwd img/s": batch / t_fwd.median,
                "fwd+bwd img/s": batch / t_train.median,
            }
        )
    return pd.DataFrame(rows)
