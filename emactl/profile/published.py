"""The paper's cost table next to ours: ResNet-101, output stride 8, 513×513 input, batch 1.

Source of :data:`PUBLISHED`: Li et al., "Expectation-Maximization Attention Networks for
Semantic Segmentation", ICCV 2019 (arXiv:1907.13426), the comparison table for ResNet-101 at
output stride 8 with 513×513 inputs on VOC val. The extra columns are over the backbone; the backbone row is absolute. Its units
are the paper's "G" and "M", read here as 10⁹ and 10⁶ (FLOPs, bytes, parameters).

What we count, without computing anything (meta tensors):

* MACs with FlopCounterMode / 2 (and FLOPs = 2 × MACs), parameters, and activation memory as
  the bytes saved for backward (see :mod:`emactl.profile.memory`), fp32, batch 1;
* each network in full and its backbone alone; "extra" is the difference;
* a second convention, "context": only the module between the backbone and the final 3×3
  conv + classifier (EMANet: the 2048→C 3×3 reduction and the EMAU; DeepLabV3: the ASPP with
  its 1×1 projection). The paper's numbers match this convention, in MACs.
* the backbone both as torchvision builds it (7×7 stem) and with the three-3×3-conv "deep
  stem" (and multi-grid) of the original EMANet code; the EMANet rows are the network that
  ``recipes/voc_aug.yaml`` builds (:func:`emactl.importer.original_model`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch
import torchvision
from rich.console import Console
from torch import nn

from ..importer import original_model
from ..nn.backbone import build_backbone
from ..nn.emanet import build_model
from .counting import count_module, count_params
from .memory import peak_memory, saved_tensor_bytes, total_bytes

CROP, OUTPUT_STRIDE, NUM_CLASSES = 513, 8, 21

SOURCE = (
    "Li et al., Expectation-Maximization Attention Networks for Semantic Segmentation, ICCV 2019 "
    "(arXiv:1907.13426), its cost comparison table: ResNet-101, output stride 8, 513x513, VOC val"
)


@dataclass(frozen=True)
class Published:
    """One row of the paper's table. Costs are extra over the backbone, except the backbone's."""

    method: str
    miou_ss: float | None
    miou_ms_flip: float | None
    flops_g: float
    memory_mb: float
    params_m: float


PUBLISHED: tuple[Published, ...] = (
    Published("ResNet-101 backbone", None, None, 190.6, 2603.0, 42.6),
    Published("DeepLabV3", 78.51, 79.77, 63.4, 66.0, 15.5),
    Published("DeepLabV3+", 79.35, 80.57, 84.1, 99.3, 16.3),
    Published("PSANet", 78.51, 79.77, 56.3, 59.4, 18.5),
    Published("EMANet(256)", 79.73, 80.94, 21.1, 12.3, 4.87),
    Published("EMANet(512)", 80.05, 81.32, 43.1, 22.1, 10.0),
)

CONVENTION_NOTE = (
    "published 'FLOPs' are reproduced by our MACs (multiply-adds) of the context part alone "
    "(EMANet: 3x3 reduction + EMAU; DeepLabV3: ASPP incl. its 1x1 projection), i.e. without the "
    "final 3x3 conv + classifier that follow every context module; the published backbone "
    "(190.6G, 42.6M) is the deep-stem ResNet-101; 2 FLOPs/MAC doubles every ratio; the EMA unit's conv1 is "
    "counted as a convolution, as in the paper, although emactl runs it folded into the EM products "
    "(model.ema.fold), 1.01 GMACs fewer at 65x65"
)


def published(method: str) -> Published:
    return next(p for p in PUBLISHED if p.method == method)


def _emanet(channels: int) -> nn.Module:
    """The network ``recipes/voc_aug.yaml`` builds: the original code's (deep stem, multi-grid).

    Counted with the EMA unit's conv1 as a convolution, as the paper counts it; emactl runs it
    folded into the EM products (``model.ema.fold``), which saves N·C² − 2T·C²·K multiply-adds
    (1.01 G at 65×65, C=512, K=64, T=3)."""
    model = original_model(101)
    model = dataclasses.replace(model, head_channels=channels, ema=dataclasses.replace(model.ema, fold=False))
    return build_model(model, NUM_CLASSES)


def _deeplabv3() -> nn.Module:
    return torchvision.models.segmentation.deeplabv3_resnet101(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=False
    )


@dataclass(frozen=True)
class _Network:
    """A network of the check: its published row, how to build it, and what each convention counts."""

    method: str
    build: Callable[[], nn.Module]
    head: str  # the submodule that takes the layer-4 features
    context_label: str
    context: tuple[str, ...]  # submodules run in sequence on the layer-4 features


_NETWORKS = {
    "DeepLabV3 (torchvision)": _Network("DeepLabV3", _deeplabv3, "classifier", "ASPP with its 1x1 projection", ("classifier.0",)),
    "EMANet(256)": _Network("EMANet(256)", lambda: _emanet(256), "head", "3x3 reduction + EMAU", ("head.reduce", "head.context")),
    "EMANet(512)": _Network("EMANet(512)", lambda: _emanet(512), "head", "3x3 reduction + EMAU", ("head.reduce", "head.context")),
}
_BACKBONES = {
    "ResNet-101, torchvision 7x7 stem": lambda: build_backbone("resnet101", OUTPUT_STRIDE),
    "ResNet-101, deep 3x3 stem": lambda: build_backbone("resnet101_deep", OUTPUT_STRIDE, multi_grid=[1, 2, 4]),
}


def _row(method: str, counted: str, macs: int, params: int, activations: int, pub: Published) -> dict:
    return {
        "method": method,
        "counted": counted,
        "GMACs": macs / 1e9,
        "GFLOPs (2/MAC)": 2 * macs / 1e9,
        "published FLOPs (G)": pub.flops_g,
        "GMACs / published": macs / 1e9 / pub.flops_g,
        "GFLOPs / published": 2 * macs / 1e9 / pub.flops_g,
        "params (M)": params / 1e6,
        "published params (M)": pub.params_m,
        "params / published": params / 1e6 / pub.params_m,
        "activations (MB)": activations / 1e6,
        "published memory (MB)": pub.memory_mb,
        "activations / published": activations / 1e6 / pub.memory_mb,
    }


def published_check(console: Console | None = None) -> pd.DataFrame:
    """Our counts at the paper's setting next to the published ones, with ratios ours/published."""
    x = torch.empty(1, 3, CROP, CROP, device="meta")
    rows = []
    for label, build in _BACKBONES.items():
        if console is not None:
            console.log(f"published: {label}")
        with torch.device("meta"):
            model = build().eval()
        counts = count_module(model, x.shape)
        saved = saved_tensor_bytes(model, x)[""]
        pub = published("ResNet-101 backbone")
        rows.append(_row(label, "backbone", counts.macs, count_params(model), total_bytes(saved), pub))
    for label, net in _NETWORKS.items():
        if console is not None:
            console.log(f"published: {label}")
        with torch.device("meta"):
            model = net.build().eval()
        context = net.context
        counts = count_module(model, x.shape)
        parts = {"all": "", "backbone": "backbone", **{name: name for name in context}}
        saved = saved_tensor_bytes(model, x, parts)
        backbone = model.get_submodule("backbone")
        head_macs = counts.macs - counts.module_macs["backbone"]
        head_params = count_params(model) - count_params(backbone)
        pub = published(net.method)
        head_bytes = total_bytes(saved["all"], saved["backbone"])
        rows.append(_row(label, "head: all beyond backbone", head_macs, head_params, head_bytes, pub))
        ctx_storages: dict[int, int] = {}
        for name in context:
            ctx_storages.update(saved[name])
        rows.append(
            _row(
                label,
                f"context: {net.context_label}",
                sum(counts.module_macs[name] for name in context),
                sum(count_params(model.get_submodule(name)) for name in context),
                total_bytes(ctx_storages, saved["backbone"]),
                pub,
            )
        )
    return pd.DataFrame(rows)


def measured_published_memory(device: torch.device, console: Console | None = None) -> pd.DataFrame:
    """Inference peak memory at the paper's setting (513×513, batch 1, fp32), measured on ``device``.

    The backbone is measured on the image. A head's peak is measured on its own, on layer-4
    features (1, 2048, 65, 65) that already exist: the whole network's peak lies inside the
    backbone, so "network minus backbone" would say nothing about the head.
    """
    image = torch.randn(1, 3, CROP, CROP, device=device)
    side = (CROP - 1) // OUTPUT_STRIDE + 1
    feats = torch.randn(1, 2048, side, side, device=device)

    def peak(fn: Callable[[], object]) -> int:
        with torch.no_grad():
            fn()  # warm-up
            return peak_memory(fn, device)

    if console is not None:
        console.log(f"published: measuring inference memory of the ResNet-101 backbone at {CROP}x{CROP}")
    backbone = build_backbone("resnet101", OUTPUT_STRIDE).to(device).eval()
    rows = [
        ("ResNet-101, torchvision 7x7 stem", "backbone, on the image", peak(lambda net=backbone: net(image)), published("ResNet-101 backbone"))
    ]
    del backbone
    for label, net in _NETWORKS.items():
        if console is not None:
            console.log(f"published: measuring inference memory of the {label} head on {side}x{side} features")
        model = net.build().to(device).eval()
        head = model.get_submodule(net.head)
        context = [model.get_submodule(name) for name in net.context]

        def run_context(context: list[torch.nn.Module] = context) -> torch.Tensor:
            y = feats
            for module in context:
                y = module(y)
            return y

        rows.append((label, f"head ({net.head}), on the features", peak(lambda head=head: head(feats)), published(net.method)))
        rows.append((label, f"context: {net.context_label}, on the features", peak(run_context), published(net.method)))
        del model, head, context
    df = pd.DataFrame(
        [
            {"method": label, "counted": counted, "inference peak (MB)": nbytes / 1e6, "published memory (MB)": pub.memory_mb}
            for label, counted, nbytes, pub in rows
        ]
    )
    df["ours / published"] = df["inference peak (MB)"] / df["published memory (MB)"]
    return df
