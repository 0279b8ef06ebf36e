"""Dilated ResNet backbones from torchvision, plus a tiny one for CPU demos and tests.

A backbone returns ``{"layer3": ..., "layer4": ...}``. Output stride 8 dilates layers 3 and 4
(rates 2 and 4), output stride 16 dilates layer 4 only, 32 is the plain network.

ImageNet weights come from ``model.pretrained``: a local torchvision state-dict file
(``resnet101-63fe2227.pth``, or any ``.pth`` holding a ResNet state dict), or a torchvision
weight name (``resnet101``, ``ResNet101_Weights.IMAGENET1K_V2``) that torchvision fetches into
its cache when the internet is reachable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet

from ..errors import UserError
from ..io import load_torch
from ..registry import Registry

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")

DILATION = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}


class Backbone(nn.Module):
    """Wrap a torchvision ResNet: stem → layer1..4, returning layer 3 and layer 4 features."""

    def __init__(self, resnet: ResNet, channels: dict[str, int]) -> None:
        super().__init__()
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        self.layer3, self.layer4 = resnet.layer3, resnet.layer4
        self.channels = channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.layer2(self.layer1(self.stem(x)))
        c3 = self.layer3(x)
        return {"layer3": c3, "layer4": self.layer4(c3)}


def _dilate_basic(resnet: ResNet, dilate: list[bool]) -> None:
    """torchvision's BasicBlock refuses dilation; turn strides into dilation by hand."""
    dilation = 1
    for flag, layer in zip(dilate, (resnet.layer2, resnet.layer3, resnet.layer4)):
        if not flag:
            continue
        previous, dilation = dilation, dilation * 2
        for i, block in enumerate(layer):
            for conv in (block.conv1, block.conv2):
                d = previous if (i == 0 and conv is block.conv1) else dilation
                conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)


def _torchvision_resnet(name: str, output_stride: int) -> Backbone:
    if output_stride not in DILATION:
        raise UserError(f"model.output_stride: got {output_stride}; choose one of 8, 16, 32")
    dilate = DILATION[output_stride]
    builder = getattr(torchvision.models, name)
    if name in ("resnet18", "resnet34"):
        resnet = builder(weights=None)
        _dilate_basic(resnet, dilate)
        c3, c4 = 256, 512
    else:
        resnet = builder(weights=None, replace_stride_with_dilation=dilate)
        c3, c4 = 1024, 2048
    return Backbone(resnet, {"layer3": c3, "layer4": c4})


for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
    BACKBONES.register(_name)(lambda output_stride, _n=_name: _torchvision_resnet(_n, output_stride))


@BACKBONES.register("tiny")
def tiny_resnet(output_stride: int) -> Backbone:
    """A 4-stage ResNet of BasicBlocks, widths 16-32-64-128: trains in minutes on a CPU."""
    resnet = ResNet(BasicBlock, [1, 1, 1, 1], width_per_group=64)
    widths = (16, 32, 64, 128)
    resnet.inplanes = widths[0]
    resnet.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
    resnet.bn1 = nn.BatchNorm2d(widths[0])
    resnet.layer1 = resnet._make_layer(BasicBlock, widths[0], 1)
    resnet.layer2 = resnet._make_layer(BasicBlock, widths[1], 1, stride=2)
    resnet.layer3 = resnet._make_layer(BasicBlock, widths[2], 1, stride=2)
    resnet.layer4 = resnet._make_layer(BasicBlock, widths[3], 1, stride=2)
    for m in resnet.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if output_stride not in DILATION:
        raise UserError(f"model.output_stride: got {output_stride}; choose one of 8, 16, 32")
    _dilate_basic(resnet, DILATION[output_stride])
    return Backbone(resnet, {"layer3": widths[2], "layer4": widths[3]})


@BACKBONES.register("micro")
def micro_resnet(output_stride: int) -> Backbone:
    """Four BasicBlocks, widths 16-32-64-128, no dilation: a receptive field of only 103 px.

    Its point is a field of view much smaller than the image, as a ResNet-101's is on a
    512-px photo (its *effective* field is far smaller than the theoretical one), so that
    on 128-px ``shapes`` images context beyond a shape's neighbourhood has to come from the
    head. Strides: stem 2, then 2, 2 (output stride 8); at 16 and 32 the last blocks stride too.
    """
    if output_stride not in DILATION:
        raise UserError(f"model.output_stride: got {output_stride}; choose one of 8, 16, 32")
    strides = {8: (2, 1, 1), 16: (2, 2, 1), 32: (2, 2, 2)}[output_stride]
    resnet = ResNet(BasicBlock, [1, 1, 1, 1])
    resnet.inplanes = 16
    resnet.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
    resnet.bn1 = nn.BatchNorm2d(16)
    resnet.maxpool = nn.Identity()
    resnet.layer1 = resnet._make_layer(BasicBlock, 32, 1, stride=2)
    resnet.layer2 = resnet._make_layer(BasicBlock, 64, 1, stride=strides[0])
    resnet.layer3 = resnet._make_layer(BasicBlock, 64, 1, stride=strides[1])
    resnet.layer4 = resnet._make_layer(BasicBlock, 128, 1, stride=strides[2])
    for m in resnet.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return Backbone(resnet, {"layer3": 64, "layer4": 128})


def build_backbone(name: str, output_stride: int = 8, pretrained: str | None = None) -> Backbone:
    backbone = BACKBONES.get(name, "model.backbone")(output_stride)
    if pretrained:
        load_pretrained(backbone, pretrained, name)
    return backbone


def _fetch_by_name(weight: str, arch: str) -> dict[str, Tensor]:
    """Resolve a torchvision weight name; torchvision downloads it into its cache if needed."""
    try:
        if weight == arch or weight.lower() == arch:
            weights = torchvision.models.get_model_weights(arch).DEFAULT
        else:
            weights = torchvision.models.get_weight(weight)
    except (ValueError, KeyError, AttributeError):
        raise UserError(
            f"model.pretrained: {weight!r} is neither a file nor a torchvision weight name "
            f"(e.g. {arch} or a path to a .pth state-dict file)"
        ) from None
    try:
        return weights.get_state_dict(progress=False)
    except Exception as e:  # no internet: say how to get the file in place
        raise UserError(
            f"model.pretrained: cannot fetch {weights} ({type(e).__name__}); download "
            f"{weights.url} elsewhere and set model.pretrained=/path/to/{Path(weights.url).name}"
        ) from None


def load_pretrained(backbone: Backbone, source: str, arch: str) -> None:
    """Load ImageNet weights into ``backbone`` from a file or a torchvision weight name."""
    path = Path(source).expanduser()
    if path.suffix in (".pth", ".pt") or path.exists():
        state = load_torch(path)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        where = str(path)
    else:
        state = _fetch_by_name(source, arch)
        where = source
    if not isinstance(state, dict):
        raise UserError(f"{where}: not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    mapped = {}
    for k, v in state.items():
        for old, new in (("conv1.", "stem.0."), ("bn1.", "stem.1.")):
            if k.startswith(old):
                k = new + k[len(old):]
        mapped[k] = v
    own = backbone.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    wrong = [k for k in own if k in mapped and tuple(mapped[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = (
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]}), {len(wrong)} of wrong shape (e.g. {wrong[:2]})"
        )
        raise UserError(
            f"{where}: weights do not match backbone {arch!r}: {detail}; "
            f"use the torchvision {arch} ImageNet state dict or change model.backbone"
        )
    with torch.no_grad():
        backbone.load_state_dict(mapped, strict=True)
