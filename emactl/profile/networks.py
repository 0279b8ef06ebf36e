"""Whole networks: EMANet against torchvision's DeepLabV3 and FCN and against a PSP head.

All four use the same dilated ResNet at output stride 8 (torchvision's segmentation models
always dilate layers 3 and 4; emactl's are built with ``output_stride=8``), the same crop and
the same number of classes. A training step is forward + cross-entropy + backward + SGD step
in train mode; inference is a forward pass in eval mode under ``no_grad``.
"""
from __future__ import annotations

from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
from rich.console import Console
from torch import nn

from ..config import EMAConfig, ModelConfig
from ..device import autocast
from ..nn.emanet import build_model
from .counting import count_module, count_params
from .timing import measure_many

NETWORKS = ("emanet", "psp", "deeplabv3", "fcn")
_EMACTL_HEADS = {"emanet": "ema", "psp": "psp"}


def network_config(name: str, backbone: str, channels: int = 512, bases: int = 64, iters: int = 3) -> ModelConfig:
    """emactl's config for ``emanet`` or ``psp``: the EMANet head with the given context module."""
    return ModelConfig(
        backbone=backbone,
        output_stride=8,
        head=_EMACTL_HEADS[name],
        head_channels=channels,
        ema=EMAConfig(bases=bases, iters=iters),
    )


def build_network(name: str, backbone: str, num_classes: int, channels: int = 512, bases: int = 64, iters: int = 3) -> nn.Module:
    """One of :data:`NETWORKS`, untrained; every one returns ``{"out": logits}``."""
    if name in _EMACTL_HEADS:
        return build_model(network_config(name, backbone, channels, bases, iters), num_classes)
    builder = getattr(torchvision.models.segmentation, f"{name}_{backbone}")
    return builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)


def _step_fns(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, dtype: torch.dtype
) -> tuple[Callable[[], None], Callable[[], None]]:
    """A training step (SGD, momentum 0.9, tiny lr so that repeated steps stay finite) and an
    inference call of ``model`` on one fixed batch."""
    device = x.device
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def train_step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            out = model(x)["out"]
        loss = F.cross_entropy(out.float(), target, ignore_index=255)
        loss.backward()
        opt.step()

    def inference() -> None:
        model.eval()
        with torch.no_grad(), autocast(device, dtype):
            model(x)["out"]

    return train_step, inference


def profile_networks(
    backbone: str,
    crop: int,
    batch: int,
    channels: int,
    bases: int,
    iters: int,
    num_classes: int,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int = 3,
    names: tuple[str, ...] = NETWORKS,
    console: Console | None = None,
) -> pd.DataFrame:
    """One row per network: parameters, MACs per image, training and inference speed.

    The networks share one batch and are timed in interleaved rounds.
    """
    x = torch.randn(batch, 3, crop, crop, device=device)
    target = torch.randint(0, num_classes, (batch, crop, crop), device=device)
    models, fns = {}, {}
    for name in names:
        models[name] = build_network(name, backbone, num_classes, channels, bases, iters).to(device)
        train_step, inference = _step_fns(models[name], x, target, dtype)
        fns[(name, "train")], fns[(name, "inference")] = train_step, inference
    if console is not None:
        console.log(f"networks: timing {', '.join(names)} ({backbone}, crop {crop}, batch {batch})")
    timings = measure_many(fns, device, rounds=repeats)
    rows = []
    for name in names:
        with torch.device("meta"):
            meta = build_network(name, backbone, num_classes, channels, bases, iters)
        counts = count_module(meta, (1, 3, crop, crop))
        t_train, t_infer = timings[(name, "train")], timings[(name, "inference")]
        rows.append(
            {
                "network": name,
                "backbone": f"{backbone} OS8",
                "crop": crop,
                "params (M)": count_params(models[name]) / 1e6,
                "GMACs/img": counts.macs / 1e9,
                "train step (ms)": t_train.ms,
                "train img/s": batch / t_train.median,
                "inference (ms)": t_infer.ms,
                "inference img/s": batch / t_infer.median,
            }
        )
    return pd.DataFrame(rows)


def network_ratios(df: pd.DataFrame, name: str = "emanet", other: str = "deeplabv3") -> pd.DataFrame:
    """EMANet's training step and inference time over DeepLabV3's, from :func:`profile_networks`'
    table (empty when either network is missing)."""
    rows = df.set_index("network")
    if name not in rows.index or other not in rows.index:
        return pd.DataFrame(columns=["metric", "value"])
    label = {"emanet": "EMANet", "deeplabv3": "DeepLabV3", "fcn": "FCN", "psp": "PSP"}
    a, b = label.get(name, name), label.get(other, other)
    return pd.DataFrame(
        [
            (f"{a} train step / {b} train step", rows.at[name, "train step (ms)"] / rows.at[other, "train step (ms)"]),
            (f"{a} inference / {b} inference", rows.at[name, "inference (ms)"] / rows.at[other, "inference (ms)"]),
        ],
        columns=["metric", "value"],
    )
