"""Whole, sliding-window, multi-scale and flip inference agree where they must."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from emactl.config import EMAConfig, EvalConfig, ModelConfig
from emactl.engine.inference import predict_logits
from emactl.errors import UserError
from emactl.nn.emanet import build_model

K = 4


def tiny_emanet() -> nn.Module:
    cfg = ModelConfig(backbone="tiny", head_channels=16, mid_channels=16, ema=EMAConfig(bases=4))
    return build_model(cfg, K).eval()


def pixelwise() -> nn.Module:
    return nn.Conv2d(3, K, 1).eval()


class MirrorConv(nn.Module):
    """A 3×3 conv whose kernels are left-right symmetric: model(flip(x)) == flip(model(x))."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, K, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(-1)) / 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


def whole(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return predict_logits(model, x, EvalConfig(), K)


def test_multiscale_at_one_without_flip_is_whole():
    model, x = tiny_emanet(), torch.randn(2, 3, 32, 40)
    out = predict_logits(model, x, EvalConfig(scales=[1.0], flip=False), K)
    with torch.no_grad():
        ref = model(x)["out"]
    assert out.shape == (2, K, 32, 40)
    assert torch.equal(out, ref)


def test_slide_with_window_covering_image_is_whole():
    model, x = tiny_emanet(), torch.randn(1, 3, 32, 32)
    out = predict_logits(model, x, EvalConfig(mode="slide", crop_size=32, stride=16), K)
    torch.testing.assert_close(out, whole(model, x))


def test_flip_on_flip_equivariant_model_changes_nothing():
    model, x = MirrorConv().eval(), torch.randn(2, 3, 12, 17)
    out = predict_logits(model, x, EvalConfig(flip=True), K)
    ref = whole(model, x)
    torch.testing.assert_close(out.softmax(1), ref.softmax(1))
    torch.testing.assert_close(out, ref.log_softmax(1))


@pytest.mark.parametrize("size", [(20, 27), (6, 27), (5, 5)])
def test_overlapping_slide_on_pixelwise_model_is_whole(size):
    """Overlaps, border-flush windows and windows padded past a small image all average out."""
    model, x = pixelwise(), torch.randn(2, 3, *size)
    out = predict_logits(model, x, EvalConfig(mode="slide", crop_size=8, stride=5), K)
    torch.testing.assert_close(out, whole(model, x), rtol=1e-5, atol=1e-6)


def test_multiscale_flip_slide_gives_log_probabilities():
    model, x = tiny_emanet(), torch.randn(1, 3, 20, 24)
    cfg = EvalConfig(mode="slide", crop_size=16, stride=12, scales=[0.75, 1.25], flip=True)
    out = predict_logits(model, x, cfg, K)
    assert out.shape == (1, K, 20, 24) and torch.isfinite(out).all()
    torch.testing.assert_close(out.exp().sum(1), torch.ones(1, 20, 24))


def test_bf16_autocast_is_close():
    model, x = pixelwise(), torch.randn(1, 3, 8, 8)
    out = predict_logits(model, x, EvalConfig(), K, amp="bf16")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, whole(model, x), rtol=0.05, atol=0.05)


def test_bad_window_settings_are_user_errors():
    model, x = pixelwise(), torch.randn(1, 3, 8, 8)
    with pytest.raises(UserError, match="crop_size"):
        predict_logits(model, x, EvalConfig(mode="slide"), K)
    with pytest.raises(UserError, match="stride"):
        predict_logits(model, x, EvalConfig(mode="slide", crop_size=4, stride=5), K)


def test_pad_multiple_pads_to_8k_plus_1_and_crops_back():
    """The original EMANet evaluation: zero padding (normalised space) to 8k+1, logits cropped."""
    model = tiny_emanet()
    x = torch.randn(1, 3, 37, 45)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    out = predict_logits(model, x, EvalConfig(pad_multiple=8), K)
    assert seen == [(41, 49)] and out.shape[-2:] == (37, 45)
    with torch.no_grad():
        ref = model(torch.nn.functional.pad(x, (0, 4, 0, 4)))["out"][..., :37, :45]
    assert torch.allclose(out, ref, atol=1e-6)
    assert not torch.allclose(out, whole(model, x), atol=1e-4)  # the padding is felt
    seen.clear()
    predict_logits(model, torch.randn(1, 3, 41, 33), EvalConfig(pad_multiple=8), K)
    assert seen == [(41, 33)]  # already 8k+1: untouched
