"""EMANet model: output shapes for each backbone/stride/head, and ImageNet weight loading."""
from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import pytest
import torch
import torchvision

from emactl.config import EMAConfig, ModelConfig
from emactl.errors import UserError
from emactl.nn.backbone import build_backbone
from emactl.nn.ema import EMAU
from emactl.nn.emanet import build_model, ema_units, set_eval_iters
from emactl.nn.heads import CONTEXTS, context_names, has_ema_unit
from emactl.profile.settings import HEADS as PROFILE_HEADS
from emactl.profile.settings import SCALING_HEADS

HEADS = ["ema", "nonlocal", "a2", "aspp", "psp", "fcn", "conv3x3"]


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(backbone="tiny", head_channels=16, mid_channels=8, ema=EMAConfig(bases=4))
    base.update(kw)
    return ModelConfig(**base)


def test_every_head_is_registered():
    assert set(HEADS) <= set(CONTEXTS.names())


def test_heads_say_whether_they_have_an_ema_unit():
    """ablate asks the registry, not the name (#15): only ``ema`` is an EMA unit today."""
    assert [h for h in HEADS if has_ema_unit(h)] == ["ema"]
    with pytest.raises(UserError, match="model.head: unknown head 'nope'"):
        has_ema_unit("nope")


def test_profile_head_lists_come_from_the_registry():
    """Every registered head with a module to measure, in registration order (the identity
    ``fcn`` has nothing to time); the scaling section: attention against the 3×3 conv."""
    assert PROFILE_HEADS == ("ema", "nonlocal", "a2", "conv3x3", "aspp", "psp")
    assert SCALING_HEADS == ("ema", "nonlocal", "a2", "conv3x3")
    assert set(context_names(("attention", "conv", "pyramid", "identity"))) == set(CONTEXTS.names())


def test_ema_config_fields_are_the_unit_arguments():
    """The builder passes model.ema to EMAU field by field: a new field needs a new argument."""
    fields = [f.name for f in dataclasses.fields(EMAConfig)]
    assert fields == list(inspect.signature(EMAU).parameters)[1:]


@pytest.mark.parametrize("aux", [False, True])
def test_bn_momentum_reaches_every_batchnorm(aux):
    """Layers are built with PyTorch's default momentum; the builder sets model.bn_momentum on
    every BatchNorm, the backbone's, the context's and the aux head's included."""
    model = build_model(tiny_cfg(bn_momentum=3e-4, aux=aux, concat_input=True), 3)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) > 10 and all(m.momentum == 3e-4 for m in norms)


def test_nn_reads_without_the_recipe():
    """Only the builder (nn/emanet.py) imports emactl.config; the layers take plain arguments."""
    code = ("import sys, emactl.nn.heads, emactl.nn.ema, emactl.nn.backbone, emactl.nn.choices; "
            "assert 'emactl.config' not in sys.modules, 'emactl.config imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_shape_per_head(head, output_stride):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(head=head, output_stride=output_stride, aux=True), 5).train()
    out = model(torch.randn(2, 3, 41, 37))
    assert out["out"].shape == (2, 5, 41, 37)
    assert out["aux"].shape == (2, 5, 41, 37)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 41, 37))
    assert set(out) == {"out"}


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_backbone_feature_stride(name, output_stride):
    with torch.device("meta"):
        backbone = build_backbone(name, output_stride)
        feats = backbone(torch.empty(1, 3, 64, 64))
    side = 64 // output_stride
    assert feats["layer4"].shape == (1, backbone.channels["layer4"], side, side)
    assert feats["layer3"].shape[-1] == 64 // min(output_stride, 16)


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_micro_backbone_strides(output_stride):
    backbone = build_backbone("micro", output_stride).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 64))
    assert feats["layer4"].shape == (1, 128, 64 // output_stride, 64 // output_stride)
    assert feats["layer3"].shape[1] == backbone.channels["layer3"]


def test_micro_backbone_receptive_field_is_103_px():
    """The input pixels that reach one output pixel span 103 px, as the docstring says."""
    torch.manual_seed(0)
    backbone = build_backbone("micro", 8).eval()
    x = torch.randn(1, 3, 192, 192, requires_grad=True)
    backbone(x)["layer4"][0, :, 12, 12].sum().backward()
    rows, cols = (x.grad[0].abs().sum(0) > 0).nonzero().unbind(1)
    assert rows.max() - rows.min() + 1 == 103
    assert cols.max() - cols.min() + 1 == 103


def test_resnet18_dilated_forward_matches_stride():
    model = build_model(tiny_cfg(backbone="resnet18", output_stride=8), 3).eval()
    with torch.no_grad():
        feats = model.backbone(torch.randn(1, 3, 32, 32))
    assert feats["layer4"].shape == (1, 512, 4, 4)


def test_set_eval_iters_reaches_every_unit():
    model = build_model(tiny_cfg(), 3)
    set_eval_iters(model, 7)
    units = ema_units(model)
    assert units and all(u.eval_iters == 7 and u.iters == 3 for u in units)


def test_pretrained_from_state_dict_file(tmp_path):
    """A torchvision-format state dict (with the fc layer) loads into the dilated backbone."""
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone("resnet18", 8, str(path))
    assert torch.equal(backbone.stem[0].weight, reference.conv1.weight)
    assert torch.equal(backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert torch.equal(backbone.stem[1].running_var, reference.bn1.running_var)


def test_pretrained_mismatch_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(UserError, match=r"do not match backbone 'resnet18'.*unexpected"):
        build_backbone("resnet18", 8, str(path))


def test_pretrained_not_a_state_dict(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load"):
        build_backbone("resnet18", 8, str(path))


def test_unknown_names_list_choices():
    with pytest.raises(UserError, match="model.head: unknown head 'nope'.*ema"):
        build_model(tiny_cfg(head="nope"), 3)
    with pytest.raises(UserError, match="model.backbone.*resnet101"):
        build_model(tiny_cfg(backbone="vgg"), 3)


# --------------------------------------------------------------------------------------------
# Backbone variants: the stems and per-block dilations of torchvision, the original EMANet
# code (deep stem, multi-grid) and mmseg's ResNetV1c, as their sources build them.


def _dilations(backbone) -> dict[str, list[int]]:
    return {name: [b.conv2.dilation[0] for b in getattr(backbone, name)] for name in ("layer3", "layer4")}


@pytest.mark.parametrize(
    "name, output_stride, grid, layer3, layer4",
    [
        ("resnet50", 8, None, [1, 2, 2, 2, 2, 2], [2, 4, 4]),
        ("resnet50_v1c", 8, None, [1, 2, 2, 2, 2, 2], [2, 4, 4]),  # mmseg: contract_dilation
        ("resnet50_deep", 8, [1, 2, 4], [1, 2, 2, 2, 2, 2], [2, 8, 16]),  # the original at OS 8
        ("resnet50_deep", 16, [1, 2, 4], [1, 1, 1, 1, 1, 1], [1, 4, 8]),  # ... and at OS 16
        ("resnet101_deep", 8, [1, 2, 4], [1] + [2] * 22, [2, 8, 16]),
    ],
)
def test_backbone_dilations(name, output_stride, grid, layer3, layer4):
    with torch.device("meta"):
        backbone = build_backbone(name, output_stride, multi_grid=grid)
    assert _dilations(backbone) == {"layer3": layer3, "layer4": layer4}
    for block in backbone.layer4:
        assert block.conv2.padding == block.conv2.dilation


def test_backbone_stems():
    with torch.device("meta"):
        deep = build_backbone("resnet50_deep", 8).state_dict()
        v1c = build_backbone("resnet50_v1c", 8).state_dict()
        tv = build_backbone("resnet50", 8).state_dict()
    assert [tuple(deep[f"stem.0.{i}.weight"].shape) for i in (0, 3, 6)] == [(64, 3, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3)]
    assert deep["stem.1.weight"].shape == (128,) and deep["layer1.0.conv1.weight"].shape == (64, 128, 1, 1)
    assert deep["layer1.0.downsample.0.weight"].shape == (256, 128, 1, 1)
    assert [tuple(v1c[f"stem.{i}.weight"].shape) for i in (0, 3, 6)] == [(32, 3, 3, 3), (32, 32, 3, 3), (64, 32, 3, 3)]
    assert [v1c[f"stem.{i}.weight"].shape[0] for i in (1, 4, 7)] == [32, 32, 64]
    assert tv["stem.0.weight"].shape == (64, 3, 7, 7)
    with torch.device("meta"):
        stem = build_backbone("resnet50_deep", 8).stem
    assert stem[0][0].stride == (2, 2) and stem[0][3].stride == (1, 1) and isinstance(stem[3], torch.nn.MaxPool2d)


def test_multi_grid_needs_one_value_per_block():
    with pytest.raises(UserError, match="model.multi_grid: needs 3 values"):
        build_backbone("resnet50_deep", 8, multi_grid=[1, 2])


def _imagenet_file(backbone_name: str, layout: str, path, wrap: bool = False) -> dict[str, torch.Tensor]:
    """A file in a source's ImageNet layout, made from a random backbone (its state returned)."""
    torch.manual_seed(3)
    own = build_backbone(backbone_name, 8).state_dict()
    state = {}
    for k, v in own.items():
        if k.endswith("num_batches_tracked"):
            continue  # older files have no counters
        if layout == "conv1":  # torchvision and the original deep-stem files
            k = k.replace("stem.0.", "conv1.", 1) if k.startswith("stem.0.") else k
            k = k.replace("stem.1.", "bn1.", 1) if k.startswith("stem.1.") else k
        state[k] = v.clone()
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    torch.save({"state_dict": state} if wrap else state, path)
    return own


@pytest.mark.parametrize("name, layout, wrap", [("resnet50_deep", "conv1", False), ("resnet50_v1c", "stem", True)])
def test_pretrained_deep_stem_files(tmp_path, name, layout, wrap):
    """The original's deep-stem files (conv1.0 … conv1.6, bn1) and mmcv's v1c files (stem.*)."""
    path = tmp_path / f"{name}.pth"
    own = _imagenet_file(name, layout, path, wrap)
    torch.manual_seed(4)
    backbone = build_backbone(name, 8, str(path))
    loaded = backbone.state_dict()
    assert all(torch.equal(loaded[k], own[k]) for k in own if not k.endswith("num_batches_tracked"))


def test_pretrained_wrong_stem_names_the_keys(tmp_path):
    path = tmp_path / "deep.pth"
    _imagenet_file("resnet50_deep", "conv1", path)
    with pytest.raises(UserError) as info:
        build_backbone("resnet50_v1c", 8, str(path))
    message = str(info.value)
    assert "missing (e.g. ['stem.0.weight'" in message and "unexpected (e.g. ['bn1.bias'" in message
    assert "mmcv's resnet_v1c" in message


def test_torchvision_weight_name_never_unpickles_code(tmp_path, monkeypatch):
    """A pickle planted in torch's hub cache under a torchvision weight name must not run."""
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    name = torchvision.models.ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[-1]
    planted = tmp_path / "torch" / "hub" / "checkpoints" / name
    planted.parent.mkdir(parents=True)
    torch.save({"conv1.weight": Payload()}, planted)
    with pytest.raises(UserError) as info:
        build_backbone("resnet18", 8, "resnet18")
    assert not marker.exists()
    assert name in str(info.value) and "weights_only=False" not in str(info.value)
