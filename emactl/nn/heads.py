"""Segmentation heads: the EMA head and the context modules it is compared against.

Every head shares one layout, so an ablation changes only the context module::

    layer-4 features ─ 3×3 conv → C, BN, ReLU ─ context(C → C) ─ 3×3 conv → mid, BN, ReLU
                     ─ Dropout2d ─ 1×1 conv → classes

The context modules, registered by name in :data:`CONTEXTS`:

* ``ema``: the EMA unit (EM attention with K bases, T iterations);
* ``nonlocal``: the embedded-Gaussian non-local block (Wang et al., 2018);
* ``a2``: the double-attention block (A²-Nets, Chen et al., 2018);
* ``aspp``: DeepLabV3's atrous spatial pyramid pooling;
* ``psp``: PSPNet's pyramid pooling module (bins 1, 2, 3, 6);
* ``conv3x3``: a plain 3×3 conv + BN + ReLU (the paper's cost yardstick);
* ``fcn``: no context at all (identity), a purely local baseline.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..registry import Registry
from .ema import EMAU

CONTEXTS: Registry[Callable[[int, ModelConfig], nn.Module]] = Registry("head")


def conv_bn_relu(cin: int, cout: int, k: int = 3, dilation: int = 1, bn_momentum: float = 0.1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout, momentum=bn_momentum),
        nn.ReLU(inplace=True),
    )


class NonLocal2d(nn.Module):
    """Embedded-Gaussian non-local block: y = x + BN(W · softmax(θ(x)ᵀφ(x)) g(x))."""

    def __init__(self, channels: int, reduction: int = 2, bn_momentum: float = 0.1) -> None:
        super().__init__()
        inter = max(channels // reduction, 1)
        self.theta = nn.Conv2d(channels, inter, 1)
        self.phi = nn.Conv2d(channels, inter, 1)
        self.g = nn.Conv2d(channels, inter, 1)
        self.out = nn.Sequential(nn.Conv2d(inter, channels, 1, bias=False), nn.BatchNorm2d(channels, momentum=bn_momentum))
        nn.init.zeros_(self.out[1].weight)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q = self.theta(x).flatten(2).transpose(1, 2)  # (B, N, C')
        k = self.phi(x).flatten(2)  # (B, C', N)
        v = self.g(x).flatten(2).transpose(1, 2)  # (B, N, C')
        attn = torch.softmax(torch.bmm(q, k), dim=-1)  # (B, N, N)
        y = torch.bmm(attn, v).transpose(1, 2).reshape(b, -1, h, w)
        return x + self.out(y)


class DoubleAttention(nn.Module):
    """A² block: gather m global descriptors with n attention maps, then distribute them."""

    def __init__(self, channels: int, reduction: int = 4, bn_momentum: float = 0.1) -> None:
        super().__init__()
        m = n = max(channels // reduction, 1)
        self.a = nn.Conv2d(channels, m, 1)
        self.b = nn.Conv2d(channels, n, 1)
        self.v = nn.Conv2d(channels, n, 1)
        self.out = nn.Sequential(nn.Conv2d(m, channels, 1, bias=False), nn.BatchNorm2d(channels, momentum=bn_momentum))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        feats = self.a(x).flatten(2)  # (B, m, N)
        gather = torch.softmax(self.b(x).flatten(2), dim=-1)  # (B, n, N): attention over pixels
        descriptors = torch.bmm(feats, gather.transpose(1, 2))  # (B, m, n)
        distribute = torch.softmax(self.v(x).flatten(2), dim=1)  # (B, n, N): over descriptors
        y = torch.bmm(descriptors, distribute).reshape(b, -1, h, w)
        return x + self.out(y)


class ASPP(nn.Module):
    """DeepLabV3's ASPP: a 1×1 conv, three dilated 3×3 convs and image pooling, fused by 1×1."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...], bn_momentum: float = 0.1) -> None:
        super().__init__()
        branches = [conv_bn_relu(cin, cout, 1, bn_momentum=bn_momentum)]
        branches += [conv_bn_relu(cin, cout, 3, dilation=r, bn_momentum=bn_momentum) for r in rates]
        self.branches = nn.ModuleList(branches)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(cin, cout, 1, bn_momentum=bn_momentum))
        self.project = conv_bn_relu(cout * (len(rates) + 2), cout, 1, bn_momentum=bn_momentum)

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.project(torch.cat(outs, dim=1))


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: pool to each bin size, reduce, upsample, concatenate, fuse."""

    def __init__(self, cin: int, cout: int, bins: tuple[int, ...] = (1, 2, 3, 6), bn_momentum: float = 0.1) -> None:
        super().__init__()
        inter = max(cin // len(bins), 1)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(cin, inter, 1, bn_momentum=bn_momentum)) for b in bins
        )
        self.fuse = conv_bn_relu(cin + inter * len(bins), cout, 3, bn_momentum=bn_momentum)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(s(x), size=size, mode="bilinear", align_corners=False) for s in self.stages]
        return self.fuse(torch.cat([x, *pooled], dim=1))


def ema_unit(channels: int, cfg: ModelConfig) -> EMAU:
    e = cfg.ema
    return EMAU(
        channels,
        bases=e.bases,
        iters=e.iters,
        eval_iters=e.eval_iters,
        temperature=e.temperature,
        norm=e.norm,
        grad=e.grad,
        bases_update=e.bases_update,
        momentum=e.momentum,
        renorm=e.renorm,
        bn_momentum=cfg.bn_momentum,
        zero_init=e.zero_init,
        cuda_graph=e.cuda_graph,
        fold=e.fold,
    )


def aspp_rates(output_stride: int) -> tuple[int, ...]:
    """DeepLabV3's rates (6, 12, 18) at output stride 16, doubled at 8, halved at 32."""
    return tuple(max(1, r * 16 // output_stride) for r in (6, 12, 18))


CONTEXTS.register("ema")(ema_unit)
CONTEXTS.register("nonlocal")(lambda c, cfg: NonLocal2d(c, bn_momentum=cfg.bn_momentum))
CONTEXTS.register("a2")(lambda c, cfg: DoubleAttention(c, bn_momentum=cfg.bn_momentum))
CONTEXTS.register("aspp")(lambda c, cfg: ASPP(c, c, aspp_rates(cfg.output_stride), cfg.bn_momentum))
CONTEXTS.register("psp")(lambda c, cfg: PyramidPooling(c, c, bn_momentum=cfg.bn_momentum))
CONTEXTS.register("conv3x3")(lambda c, cfg: conv_bn_relu(c, c, 3, bn_momentum=cfg.bn_momentum))
CONTEXTS.register("fcn")(lambda c, cfg: nn.Identity())


def build_context(name: str, channels: int, cfg: ModelConfig) -> nn.Module:
    return CONTEXTS.get(name, "model.head")(channels, cfg)


class SegHead(nn.Module):
    """reduce (3×3 conv) → context → project (3×3 conv) → Dropout2d → classifier (1×1 conv).

    With ``cfg.concat_input`` (mmseg's ``EMAHead``), a 3×3 conv + BN + ReLU over the channel
    concatenation [layer-4 features, project output] (cin + mid → mid) runs before the dropout.
    """

    def __init__(self, cin: int, num_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        c, mid, m = cfg.head_channels, cfg.mid_channels, cfg.bn_momentum
        self.reduce = conv_bn_relu(cin, c, 3, bn_momentum=m)
        self.context = build_context(cfg.head, c, cfg)
        self.project = conv_bn_relu(c, mid, 3, bn_momentum=m)
        self.concat = conv_bn_relu(cin + mid, mid, 3, bn_momentum=m) if cfg.concat_input else None
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = nn.Conv2d(mid, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.context(self.reduce(x)))
        if self.concat is not None:
            y = self.concat(torch.cat([x, y], dim=1))
        return self.classifier(self.dropout(y))


class AuxHead(nn.Module):
    """FCN auxiliary head on layer 3: 3×3 conv → 256, BN, ReLU, Dropout2d, 1×1 conv.

    This is mmseg's ``FCNHead(num_convs=1, channels=256, concat_input=False)`` as its EMANet
    configs build it (loss weight 0.4)."""

    def __init__(self, cin: int, num_classes: int, channels: int = 256, dropout: float = 0.1, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.block = conv_bn_relu(cin, channels, 3, bn_momentum=bn_momentum)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.block(x)))
