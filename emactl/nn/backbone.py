"""Dilated ResNet backbones, with the three stems that EMANet weights were trained with.

A backbone returns ``{"layer3": ..., "layer4": ...}``. Output stride 8 dilates layers 3 and 4
(rates 2 and 4), output stride 16 dilates layer 4 only (rate 2), 32 is the plain network. The
first block of a dilated layer runs at half its rate (1 for layer 3, 2 for layer 4 at output
stride 8), as torchvision's ``replace_stride_with_dilation`` and mmseg's
``contract_dilation`` both do.

Stems, one registered name per depth (``resnet101``, ``resnet101_deep``, ``resnet101_v1c``):

* ``resnetN``: torchvision's 7×7 conv (3→64), BN, ReLU, max-pool;
* ``resnetN_deep``: the original EMANet code's stem: 3×3 convs 3→64 (stride 2)→64→128, with
  BN + ReLU after the first two, then BN(128), ReLU, max-pool; layer 1 takes 128 channels;
* ``resnetN_v1c``: mmseg's ``ResNetV1c``: 3×3 convs 3→32 (stride 2)→32→64, each followed by
  BN + ReLU, then max-pool.

``multi_grid`` (the original code uses ``(1, 2, 4)``) multiplies layer 4's rate per block as
the original code does: block *i* ≥ 1 runs at ``rate · grid[i]``, while the first block keeps
the halved rate and ``grid[0]`` is unused. At output stride 8 that gives dilations 2, 8, 16.

ImageNet weights come from ``model.pretrained``, a local file whose key layout is recognised
for the stem: torchvision's files (``conv1.*``, ``bn1.*``), the original code's deep-stem files
(``conv1.0.*`` … ``conv1.6.*``, ``bn1.*``) and mmcv's ``resnet{50,101}_v1c`` files
(``stem.0.*`` … ``stem.7.*``), optionally wrapped in ``{"state_dict": ...}``. For torchvision
stems a weight name (``resnet101``, ``ResNet101_Weights.IMAGENET1K_V2``) also works: the file is
taken from torch's hub cache, or downloaded into it, and loaded with ``weights_only=True``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ..errors import UserError
from ..io import load_torch
from ..registry import Registry
from .weights import strict_load

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")

DILATION = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}
DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STEMS = ("torchvision", "deep", "v1c")


class Backbone(nn.Module):
    """stem → layer1..4, returning layer 3 and layer 4 features."""

    def __init__(self, stem: nn.Module, layers: Sequence[nn.Module], channels: dict[str, int], stem_kind: str = "torchvision") -> None:
        super().__init__()
        self.stem = stem
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.channels = channels
        self.stem_kind = stem_kind

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.layer2(self.layer1(self.stem(x)))
        c3 = self.layer3(x)
        return {"layer3": c3, "layer4": self.layer4(c3)}


def _layers(resnet: ResNet) -> tuple[nn.Module, ...]:
    return resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4


def _torchvision_stem(resnet: ResNet) -> nn.Sequential:
    return nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _deep_stem() -> tuple[nn.Sequential, int]:
    """The original EMANet stem; keys ``stem.0.{0,1,3,4,6}`` and ``stem.1`` mirror its own."""
    convs = nn.Sequential(
        _conv3x3(3, 64, 2), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        _conv3x3(64, 64), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        _conv3x3(64, 128),
    )
    return nn.Sequential(convs, nn.BatchNorm2d(128), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)), 128


def _v1c_stem() -> tuple[nn.Sequential, int]:
    """mmseg's ResNetV1c stem; keys ``stem.{0,1,3,4,6,7}`` mirror ``backbone.stem.*``."""
    return nn.Sequential(
        _conv3x3(3, 32, 2), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        _conv3x3(32, 32), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        _conv3x3(32, 64), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ), 64


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _check_stride(output_stride: int) -> list[bool]:
    if output_stride not in DILATION:
        raise UserError(f"model.output_stride: got {output_stride}; choose one of 8, 16, 32")
    return DILATION[output_stride]


def apply_multi_grid(layer4: nn.Sequential, grid: Sequence[int]) -> None:
    """Set layer 4's per-block dilations to ``rate · grid[i]`` for blocks i ≥ 1 (see the module doc)."""
    if len(grid) != len(layer4):
        raise UserError(f"model.multi_grid: needs {len(layer4)} values (one per layer-4 block), got {list(grid)}")
    if any(g < 1 for g in grid):
        raise UserError(f"model.multi_grid: values must be >= 1, got {list(grid)}")
    rate = layer4[-1].conv2.dilation[0]
    for block, g in zip(list(layer4)[1:], list(grid)[1:]):
        d = rate * int(g)
        block.conv2.dilation, block.conv2.padding = (d, d), (d, d)


def block_dilations(backbone: Backbone) -> dict[str, list[int]]:
    """The 3×3 dilation of every block, per layer (for tests and ``repr``-free inspection)."""
    return {
        name: [block.conv2.dilation[0] for block in getattr(backbone, name)]
        for name in ("layer1", "layer2", "layer3", "layer4")
    }


def resnet(depth: int, output_stride: int = 8, stem: str = "torchvision", multi_grid: Sequence[int] | None = None) -> Backbone:
    """A dilated ResNet-50/101/152 with the given stem (see the module docstring)."""
    dilate = _check_stride(output_stride)
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {STEMS}")
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None, replace_stride_with_dilation=dilate)
    if stem == "torchvision":
        stem_module = _torchvision_stem(net)
    else:
        stem_module, width = _deep_stem() if stem == "deep" else _v1c_stem()
        net.inplanes, net.dilation = width, 1
        net.layer1 = net._make_layer(Bottleneck, 64, DEPTHS[depth][0])
        _init(stem_module)
        _init(net.layer1)
    if multi_grid:
        apply_multi_grid(net.layer4, multi_grid)
    return Backbone(stem_module, _layers(net), {"layer3": 1024, "layer4": 2048}, stem)


def _dilate_basic(net: ResNet, dilate: list[bool]) -> None:
    """torchvision's BasicBlock refuses dilation; turn strides into dilation by hand."""
    dilation = 1
    for flag, layer in zip(dilate, (net.layer2, net.layer3, net.layer4)):
        if not flag:
            continue
        previous, dilation = dilation, dilation * 2
        for i, block in enumerate(layer):
            for conv in (block.conv1, block.conv2):
                d = previous if (i == 0 and conv is block.conv1) else dilation
                conv.stride, conv.dilation, conv.padding = (1, 1), (d, d), (d, d)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)


def _basic_resnet(depth: int, output_stride: int) -> Backbone:
    dilate = _check_stride(output_stride)
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    _dilate_basic(net, dilate)
    return Backbone(_torchvision_stem(net), _layers(net), {"layer3": 256, "layer4": 512})


for _depth in (18, 34):
    BACKBONES.register(f"resnet{_depth}")(lambda output_stride, multi_grid=None, _d=_depth: _basic_resnet(_d, output_stride))
for _depth in DEPTHS:
    for _stem, _suffix in (("torchvision", ""), ("deep", "_deep"), ("v1c", "_v1c")):
        BACKBONES.register(f"resnet{_depth}{_suffix}")(
            lambda output_stride, multi_grid=None, _d=_depth, _s=_stem: resnet(_d, output_stride, _s, multi_grid)
        )


def _small_resnet(strides: tuple[int, ...], widths: tuple[int, ...], stem: Callable[[], nn.Conv2d], stem_width: int) -> ResNet:
    """Four BasicBlocks; ``stem`` is called after the ResNet is made, which fixes the random init."""
    net = ResNet(BasicBlock, [1, 1, 1, 1])
    net.inplanes = stem_width
    net.conv1, net.bn1 = stem(), nn.BatchNorm2d(stem_width)
    net.layer1 = net._make_layer(BasicBlock, widths[0], 1, stride=strides[0])
    net.layer2 = net._make_layer(BasicBlock, widths[1], 1, stride=strides[1])
    net.layer3 = net._make_layer(BasicBlock, widths[2], 1, stride=strides[2])
    net.layer4 = net._make_layer(BasicBlock, widths[3], 1, stride=strides[3])
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


@BACKBONES.register("tiny")
def tiny_resnet(output_stride: int, multi_grid: Sequence[int] | None = None) -> Backbone:
    """A 4-stage ResNet of BasicBlocks, widths 16-32-64-128: trains in minutes on a CPU."""
    dilate = _check_stride(output_stride)
    net = _small_resnet((1, 2, 2, 2), (16, 32, 64, 128), lambda: nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False), 16)
    _dilate_basic(net, dilate)
    return Backbone(_torchvision_stem(net), _layers(net), {"layer3": 64, "layer4": 128})


@BACKBONES.register("micro")
def micro_resnet(output_stride: int, multi_grid: Sequence[int] | None = None) -> Backbone:
    """Four BasicBlocks, widths 32-64-64-128, no dilation: a receptive field of only 103 px.

    Its point is a field of view much smaller than the image, as a ResNet-101's is on a
    512-px photo (its *effective* field is far smaller than the theoretical one), so that
    on 128-px ``shapes`` images context beyond a shape's neighbourhood has to come from the
    head. Strides: stem 2, then 2, 2 (output stride 8); at 16 and 32 the last blocks stride too.
    """
    _check_stride(output_stride)
    strides = {8: (2, 1, 1), 16: (2, 2, 1), 32: (2, 2, 2)}[output_stride]
    net = _small_resnet((2, *strides), (32, 64, 64, 128), lambda: nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), 16)
    net.maxpool = nn.Identity()
    return Backbone(_torchvision_stem(net), _layers(net), {"layer3": 64, "layer4": 128})


def build_backbone(
    name: str, output_stride: int = 8, pretrained: str | None = None, multi_grid: Sequence[int] | None = None
) -> Backbone:
    backbone = BACKBONES.get(name, "model.backbone")(output_stride, multi_grid=multi_grid)
    if multi_grid and not name.startswith("resnet"):
        raise UserError(f"model.multi_grid: backbone {name!r} has no Bottleneck layer 4; use a resnet50/101/152 backbone")
    if pretrained:
        load_pretrained(backbone, pretrained, name)
    return backbone


def _hub_file(weight: str, arch: str) -> Path:
    """The local file of a torchvision weight name: torch's hub cache, downloaded if missing.

    ``Weights.get_state_dict`` would unpickle the cached file with ``weights_only=False``, so
    a file planted in the cache could run code; the file is fetched here and loaded by the
    caller through :func:`emactl.io.load_torch` instead.
    """
    try:
        if weight == arch or weight.lower() == arch:
            weights = torchvision.models.get_model_weights(arch).DEFAULT
        else:
            weights = torchvision.models.get_weight(weight)
    except (ValueError, KeyError, AttributeError):
        raise UserError(
            f"model.pretrained: {weight!r} is neither a file nor a torchvision weight name "
            f"(e.g. resnet101 or a path to a .pth state-dict file)"
        ) from None
    name = Path(weights.url).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(path), progress=False)
        except Exception as e:  # no internet: say how to get the file in place
            raise UserError(
                f"model.pretrained: cannot fetch {weights} ({type(e).__name__}); download "
                f"{weights.url} elsewhere and set model.pretrained=/path/to/{name}"
            ) from None
    return path


def _unwrap(state: object, where: str) -> dict[str, Tensor]:
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{where}: not a state dict of tensors (nor {{'state_dict': ...}})")
    return state


def map_imagenet_keys(state: dict[str, Tensor], stem_kind: str) -> dict[str, Tensor]:
    """An ImageNet ResNet state dict in emactl's key layout (drops the classifier ``fc``).

    torchvision and the original deep-stem files name the stem ``conv1``/``bn1``; mmcv's V1c
    files already call it ``stem``. Prefixes ``module.`` and ``backbone.`` are dropped.
    """
    mapped = {}
    for k, v in state.items():
        k = k.removeprefix("module.").removeprefix("backbone.")
        if k.startswith("fc."):
            continue
        if stem_kind in ("torchvision", "deep"):
            for old, new in (("conv1.", "stem.0."), ("bn1.", "stem.1.")):
                if k.startswith(old):
                    k = new + k[len(old):]
        mapped[k] = v
    return mapped


def load_pretrained(backbone: Backbone, source: str, arch: str) -> None:
    """Load ImageNet weights into ``backbone`` from a file (or, for torchvision stems, a weight name)."""
    layouts = {
        "torchvision": "torchvision's ImageNet ResNet file",
        "deep": "the original EMANet's deep-stem ImageNet ResNet file (conv1.0 ... conv1.6, bn1)",
        "v1c": "mmcv's resnet_v1c ImageNet file (stem.0 ... stem.7)",
    }
    path = Path(source).expanduser()
    if path.suffix in (".pth", ".pt") or path.exists() or backbone.stem_kind != "torchvision":
        where = str(path)
        if not path.is_file():
            raise UserError(
                f"model.pretrained: {path}: no such file; download {layouts[backbone.stem_kind]} for {arch} "
                "and give its path (or set model.pretrained=null to start from random weights)"
            )
    else:
        path, where = _hub_file(source, arch), source
    state = map_imagenet_keys(_unwrap(load_torch(path), where), backbone.stem_kind)
    strict_load(
        backbone, state, f"{where}: weights do not match backbone {arch!r}",
        f"use {layouts[backbone.stem_kind]} of the same depth or change model.backbone",
    )
