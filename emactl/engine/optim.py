"""SGD with the original EMANet parameter groups, and a poly schedule with linear warm-up.

Parameter groups follow the original training code:

* weights of convolutions and linear layers: ``lr``, weight decay ``weight_decay``;
* weights of normalisation layers (BN, SyncBN, GN, LN, IN): ``lr``, no weight decay;
* every bias (convolutions and normalisation layers alike): ``bias_lr_mult × lr``, no weight
  decay;
* anything else (e.g. learned EMA bases, ``model.ema.bases_update=backprop``): ``lr``, no weight
  decay — they are normalised on every forward pass, so decaying them is meaningless;
* and every parameter outside ``model.backbone`` (the head) additionally gets
  ``head_lr_mult × ``.

The learning rate factor at optimiser step ``it`` (0-based) is

    poly(it)   = (1 − it / iters) ** power
    warmup(it) = warmup_factor + (1 − warmup_factor) · it / warmup_iters   for it < warmup_iters
    factor(it) = poly(it) · warmup(it)

i.e. the warm-up scales the poly curve (as mmcv's poly schedule with linear warm-up does). It is
a :class:`~torch.optim.lr_scheduler.LambdaLR`, so its position is part of its ``state_dict``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import SGD
from torch.optim.lr_scheduler import LambdaLR

from ..config import TrainConfig

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP (``.module``) and torch.compile (``._orig_mod``)."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Split the trainable parameters into SGD groups (see the module docstring).

    Each group carries ``name`` (e.g. ``backbone.bias``) and ``lr_mult`` besides ``params``,
    ``lr`` and ``weight_decay``; empty groups are left out.
    """
    model = _unwrap(model)
    kinds: dict[str, str] = {}
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, NORM_TYPES)
        for pname, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            if pname == "bias":
                kinds[full] = "bias"
            elif is_norm:
                kinds[full] = "norm"
            elif p.dim() > 1 and isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                kinds[full] = "weight"
            else:
                kinds[full] = "other"

    groups: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "backbone" if name.startswith("backbone.") else "head"
        kind = kinds[name]
        mult = cfg.head_lr_mult if part == "head" else 1.0
        if kind == "bias":
            mult *= cfg.bias_lr_mult
        decay = cfg.weight_decay if kind == "weight" else 0.0
        key = f"{part}.{kind}"
        if key not in groups:
            groups[key] = {"name": key, "params": [], "lr": cfg.lr * mult, "lr_mult": mult, "weight_decay": decay}
        groups[key]["params"].append(p)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> SGD:
    """SGD with momentum over :func:`param_groups`."""
    return SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def poly_warmup_factor(it: int, iters: int, power: float, warmup_iters: int = 0, warmup_factor: float = 1.0) -> float:
    """The learning-rate multiplier at optimiser step ``it`` (0-based); 0 from ``iters`` on."""
    factor = max(0.0, 1.0 - it / iters) ** power
    if it < warmup_iters:
        alpha = it / warmup_iters
        factor *= warmup_factor + (1.0 - warmup_factor) * alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """Poly decay with optional linear warm-up, stepped once per optimiser step.

    The lambda is a plain function, so ``state_dict()`` holds only the position and base rates
    (``LambdaLR`` stores no state for plain functions) and loads with ``weights_only=True``.
    """
    iters, power = cfg.iters, cfg.poly_power
    warmup_iters, warmup_factor = cfg.warmup_iters, cfg.warmup_factor

    def factor(it: int) -> float:
        return poly_warmup_factor(it, iters, power, warmup_iters, warmup_factor)

    return LambdaLR(optimizer, factor)
