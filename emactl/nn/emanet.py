"""EMANet: a dilated ResNet, a segmentation head with a context module, bilinear upsampling.

This module is the one place where ``model.*`` recipe keys become keyword arguments:
``build_model(cfg, num_classes)`` is the factory the engine, ablation and profiler use, and
:func:`build_context` builds a registered context module alone (the profile times those). Every
other module of :mod:`emactl.nn` takes plain arguments and can be used without :mod:`emactl.config`.

The model returns ``{"out": logits}`` at the input resolution, plus ``{"aux": logits}`` from
the layer-3 FCN head when it has one and is training.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Iterator

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..registry import Registry
from .backbone import Backbone, build_backbone
from .ema import EMAU
from .heads import CONTEXTS, AuxHead, SegHead

MODELS: Registry[Callable[[ModelConfig, int], nn.Module]] = Registry("model")


class SegmentationNet(nn.Module):
    """backbone → head (→ aux head on layer 3) → bilinear upsampling to the input size."""

    def __init__(self, backbone: Backbone, head: nn.Module, aux: nn.Module | None = None, align_corners: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux = aux
        self.align_corners = align_corners

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        feats = self.backbone(x)
        corners = self.align_corners
        out = {"out": F.interpolate(self.head(feats["layer4"]), size=size, mode="bilinear", align_corners=corners)}
        if self.aux is not None and self.training:
            out["aux"] = F.interpolate(self.aux(feats["layer3"]), size=size, mode="bilinear", align_corners=corners)
        return out

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Everything outside the backbone (gets ``train.head_lr_mult``)."""
        for name, p in self.named_parameters():
            if not name.startswith("backbone."):
                yield p


def context_options(cfg: ModelConfig) -> dict[str, Any]:
    """The options every context factory receives (see :class:`emactl.nn.heads.ContextSpec`):
    ``model.ema`` maps field by field onto :class:`EMAU`'s keyword arguments."""
    return {"output_stride": cfg.output_stride, "ema": dataclasses.asdict(cfg.ema)}


def set_bn_momentum(module: nn.Module, momentum: float) -> None:
    """``model.bn_momentum`` for every BatchNorm, the backbone's included: layers are built with
    PyTorch's default and take the recipe's value here, in one place."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def build_context(name: str, channels: int, cfg: ModelConfig) -> nn.Module:
    """The registered context module ``name`` (C → C), as :func:`build_model` builds it."""
    context = CONTEXTS.get(name, "model.head")(channels, **context_options(cfg))
    set_bn_momentum(context, cfg.bn_momentum)
    return context


@MODELS.register("emanet")
def emanet(cfg: ModelConfig, num_classes: int) -> SegmentationNet:
    backbone = build_backbone(cfg.backbone, cfg.output_stride, cfg.pretrained, cfg.multi_grid)
    channels = backbone.channels
    context = partial(CONTEXTS.get(cfg.head, "model.head"), **context_options(cfg))
    head = SegHead(channels["layer4"], num_classes, context, channels=cfg.head_channels,
                   mid_channels=cfg.mid_channels, concat_input=cfg.concat_input, dropout=cfg.dropout)
    aux = AuxHead(channels["layer3"], num_classes, dropout=cfg.dropout) if cfg.aux else None
    model = SegmentationNet(backbone, head, aux, align_corners=cfg.align_corners)
    set_bn_momentum(model, cfg.bn_momentum)
    return model


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return MODELS.get(cfg.name, "model.name")(cfg, num_classes)


def ema_units(model: nn.Module) -> list[EMAU]:
    return [m for m in model.modules() if isinstance(m, EMAU)]


def set_eval_iters(model: nn.Module, iters: int) -> None:
    """Override the EM iterations used in eval mode (``emactl eval --iters``)."""
    for unit in ema_units(model):
        unit.eval_iters = iters
