"""EMANet: a dilated ResNet, a segmentation head with a context module, bilinear upsampling.

``build_model(cfg, num_classes)`` is the one factory the engine, ablation and profiler use.
The model returns ``{"out": logits}`` at the input resolution, plus ``{"aux": logits}`` from
the layer-3 FCN head when ``model.aux`` is on and the model is training.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..registry import Registry
from .backbone import build_backbone
from .ema import EMAU
from .heads import AuxHead, SegHead

MODELS: Registry[Callable[[ModelConfig, int], nn.Module]] = Registry("model")


class SegmentationNet(nn.Module):
    """backbone → head (→ aux head on layer 3) → bilinear upsampling to the input size
    (``align_corners`` as ``cfg.align_corners``)."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone, cfg.output_stride, cfg.pretrained, cfg.multi_grid)
        channels = self.backbone.channels
        self.head = SegHead(channels["layer4"], num_classes, cfg)
        self.aux = AuxHead(channels["layer3"], num_classes, dropout=cfg.dropout, bn_momentum=cfg.bn_momentum) if cfg.aux else None
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = cfg.bn_momentum

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        feats = self.backbone(x)
        corners = self.cfg.align_corners
        out = {"out": F.interpolate(self.head(feats["layer4"]), size=size, mode="bilinear", align_corners=corners)}
        if self.aux is not None and self.training:
            out["aux"] = F.interpolate(self.aux(feats["layer3"]), size=size, mode="bilinear", align_corners=corners)
        return out

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Everything outside the backbone (gets ``train.head_lr_mult``)."""
        for name, p in self.named_parameters():
            if not name.startswith("backbone."):
                yield p


@MODELS.register("emanet")
def emanet(cfg: ModelConfig, num_classes: int) -> SegmentationNet:
    return SegmentationNet(cfg, num_classes)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    return MODELS.get(cfg.name, "model.name")(cfg, num_classes)


def ema_units(model: nn.Module) -> list[EMAU]:
    return [m for m in model.modules() if isinstance(m, EMAU)]


def set_eval_iters(model: nn.Module, iters: int) -> None:
    """Override the EM iterations used in eval mode (``emactl eval --iters``)."""
    for unit in ema_units(model):
        unit.eval_iters = iters
