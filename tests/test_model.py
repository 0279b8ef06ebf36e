"""EMANet model: output shapes for each backbone/stride/head, and ImageNet weight loading."""
from __future__ import annotations

import pytest
import torch
import torchvision

from emactl.config import EMAConfig, ModelConfig
from emactl.errors import UserError
from emactl.nn.backbone import build_backbone
from emactl.nn.emanet import build_model, ema_units, set_eval_iters
from emactl.nn.heads import CONTEXTS

HEADS = ["ema", "nonlocal", "a2", "aspp", "psp", "fcn", "conv3x3"]


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(backbone="tiny", head_channels=16, mid_channels=8, ema=EMAConfig(bases=4))
    base.update(kw)
    return ModelConfig(**base)


def test_every_head_is_registered():
    assert set(HEADS) <= set(CONTEXTS.names())


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
