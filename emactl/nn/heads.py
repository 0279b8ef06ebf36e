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

The modules take plain arguments and never the recipe: :func:`emactl.nn.emanet.build_model` is
the one place that maps ``model.*`` keys onto them. BatchNorm layers are built with PyTorch's
defaults; the builder sets every BatchNorm's momentum of the network afterwards.

Adding a head: write its module here and register a factory with :func:`register_context`,
saying what it offers (its ``kind``, whether it is an EMA unit); the recipe, ``emactl ablate
--heads`` and ``emactl profile`` take it from :data:`CONTEXTS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Registry
from .ema import EMAU

ContextKind = Literal["attention", "pyramid", "conv", "identity"]


@dataclass(frozen=True)
class ContextSpec:
    """A registered context module: how to build it and what callers may ask of it.

    ``build(channels, **options)`` returns a module mapping C channels to C. The builder passes
    every factory the same options, of which each takes what it needs: ``output_stride`` (int)
    and ``ema`` (the :class:`EMAU` keyword arguments). ``ema_unit`` says that the module is an
    EMA unit, so the EM settings (iterations, bases, bases update, …) apply to it. ``kind``
    groups the modules for the profile: ``attention`` (pixel affinities: cost that may grow
    faster than N), ``pyramid`` (pooled or dilated branches), ``conv`` (a local yardstick),
    ``identity`` (no module: nothing to measure).
    """

    build: Callable[..., nn.Module]
    kind: ContextKind
    ema_unit: bool = False

    def __call__(self, channels: int, **options: Any) -> nn.Module:
        return self.build(channels, **options)


CONTEXTS: Registry[ContextSpec] = Registry("head")


def register_context(name: str, kind: ContextKind, ema_unit: bool = False) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``build(channels, **options)`` as the context module ``name`` (see :class:`ContextSpec`)."""

    def deco(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        CONTEXTS.register(name)(ContextSpec(build, kind, ema_unit))
        return build

    return deco


def has_ema_unit(head: str) -> bool:
    """Whether the registered head ``head`` is an EMA unit (unknown names: a UserError)."""
    return CONTEXTS.get(head, "model.head").ema_unit


def context_names(kinds: Iterable[ContextKind]) -> tuple[str, ...]:
    """The registered heads of the given kinds, in registration order."""
    wanted = set(kinds)
    return tuple(name for name in CONTEXTS if CONTEXTS.get(name).kind in wanted)


def conv_bn_relu(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class NonLocal2d(nn.Module):
    """Embedded-Gaussian non-local block: y = x + BN(W · softmax(θ(x)ᵀφ(x)) g(x))."""

    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        inter = max(channels // reduction, 1)
        self.theta = nn.Conv2d(channels, inter, 1)
        self.phi = nn.Conv2d(channels, inter, 1)
        self.g = nn.Conv2d(channels, inter, 1)
        self.out = nn.Sequential(nn.Conv2d(inter, channels, 1, bias=False), nn.BatchNorm2d(channels))
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

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        m = n = max(channels // reduction, 1)
        self.a = nn.Conv2d(channels, m, 1)
        self.b = nn.Conv2d(channels, n, 1)
        self.v = nn.Conv2d(channels, n, 1)
        self.out = nn.Sequential(nn.Conv2d(m, channels, 1, bias=False), nn.BatchNorm2d(channels))

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

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        branches = [conv_bn_relu(cin, cout, 1)]
        branches += [conv_bn_relu(cin, cout, 3, dilation=r) for r in rates]
        self.branches = nn.ModuleList(branches)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(cin, cout, 1))
        self.project = conv_bn_relu(cout * (len(rates) + 2), cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in self.branches]
        outs.append(F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.project(torch.cat(outs, dim=1))


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: pool to each bin size, reduce, upsample, concatenate, fuse."""

    def __init__(self, cin: int, cout: int, bins: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        inter = max(cin // len(bins), 1)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(cin, inter, 1)) for b in bins
        )
        self.fuse = conv_bn_relu(cin + inter * len(bins), cout, 3)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(s(x), size=size, mode="bilinear", align_corners=False) for s in self.stages]
        return self.fuse(torch.cat([x, *pooled], dim=1))


def aspp_rates(output_stride: int) -> tuple[int, ...]:
    """DeepLabV3's rates (6, 12, 18) at output stride 16, doubled at 8, halved at 32."""
    return tuple(max(1, r * 16 // output_stride) for r in (6, 12, 18))


# Registration order is the order of the profile's tables.
@register_context("ema", "attention", ema_unit=True)
def ema_context(channels: int, ema: Mapping[str, Any] | None = None, **_: Any) -> EMAU:
    return EMAU(channels, **(ema or {}))


register_context("nonlocal", "attention")(lambda c, **_: NonLocal2d(c))
register_context("a2", "attention")(lambda c, **_: DoubleAttention(c))
register_context("conv3x3", "conv")(lambda c, **_: conv_bn_relu(c, c, 3))
register_context("aspp", "pyramid")(lambda c, output_stride=8, **_: ASPP(c, c, aspp_rates(output_stride)))
register_context("psp", "pyramid")(lambda c, **_: PyramidPooling(c, c))
register_context("fcn", "identity")(lambda c, **_: nn.Identity())


class SegHead(nn.Module):
    """reduce (3×3 conv) → context → project (3×3 conv) → Dropout2d → classifier (1×1 conv).

    ``context_layer(channels)`` builds the context module (C → C), between reduce and project
    so that parameters are initialised in layer order. With ``concat_input`` (mmseg's
    ``EMAHead``), a 3×3 conv + BN + ReLU over the channel concatenation [layer-4 features,
    project output] (cin + mid → mid) runs before the dropout.
    """

    def __init__(
        self,
        cin: int,
        num_classes: int,
        context_layer: Callable[[int], nn.Module],
        channels: int = 512,
        mid_channels: int = 256,
        concat_input: bool = False,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.reduce = conv_bn_relu(cin, channels, 3)
        self.context = context_layer(channels)
        self.project = conv_bn_relu(channels, mid_channels, 3)
        self.concat = conv_bn_relu(cin + mid_channels, mid_channels, 3) if concat_input else None
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(mid_channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.context(self.reduce(x)))
        if self.concat is not None:
            y = self.concat(torch.cat([x, y], dim=1))
        return self.classifier(self.dropout(y))


class AuxHead(nn.Module):
    """FCN auxiliary head on layer 3: 3×3 conv → 256, BN, ReLU, Dropout2d, 1×1 conv.

    This is mmseg's ``FCNHead(num_convs=1, channels=256, concat_input=False)`` as its EMANet
    configs build it (loss weight 0.4)."""

    def __init__(self, cin: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.block = conv_bn_relu(cin, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.block(x)))
