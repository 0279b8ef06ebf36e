"""Joint transforms: crop, padding, flip consistency, scaling, jitter, deterministic validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from emactl.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from emactl.data import build_transforms
from emactl.data.transforms import jitter, resize


def cfg(**kw) -> DataConfig:
    base = dict(crop_size=16, scale_min=1.0, scale_max=1.0, flip=False)
    base.update(kw)
    return DataConfig(**base)


def coded(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An image whose red channel is 10 × the label, so any joint transform can be checked."""
    label = np.random.default_rng(0).integers(0, 21, size=(h, w))
    label[0, 0] = 255
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[..., 0] = np.where(label == 255, 250, label * 10)
    image[..., 1] = np.arange(w)[None, :] * 4  # a horizontal ramp reveals flips
    return image, label


def unnormalise(image: torch.Tensor, c: DataConfig) -> torch.Tensor:
    mean = torch.tensor(c.mean).view(3, 1, 1)
    std = torch.tensor(c.std).view(3, 1, 1)
    return ((image * std + mean) * 255).round()


def test_crop_size_and_dtypes():
    torch.manual_seed(0)
    c = cfg(crop_size=8, scale_min=0.5, scale_max=2.0, flip=True, jitter=0.3)
    image, label = coded(20, 30)
    for _ in range(10):
        x, y = build_transforms(c, train=True)(image, label)
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32
        assert y.shape == (8, 8) and y.dtype == torch.int64


def test_padding_uses_mean_colour_and_ignore():
    torch.manual_seed(0)
    c = cfg(crop_size=16)
    image, label = coded(10, 12)
    x, y = build_transforms(c, train=True)(image, label)
    assert x.shape == (3, 16, 16)
    assert (x[:, 10:, :] == 0).all() and (x[:, :, 12:] == 0).all()  # mean colour
    assert (y[10:, :] == 255).all() and (y[:, 12:] == 255).all()
    assert (y[:10, :12] == torch.from_numpy(label)).all()
    assert torch.allclose(unnormalise(x, c)[:, :10, :12],
                          torch.from_numpy(image).permute(2, 0, 1).float(), atol=1e-3)


def test_padding_with_custom_ignore_index():
    c = cfg(crop_size=16, ignore_index=-1)
    _, y = build_transforms(c, train=True)(*coded(10, 12))
    assert (y[10:, :] == -1).all()


def test_flip_keeps_image_and_label_aligned():
    torch.manual_seed(0)
    c = cfg(crop_size=12, flip=True)
    image, label = coded(12, 12)
    flipped = 0
    for _ in range(20):
        x, y = build_transforms(c, train=True)(image, label)
        pixels = unnormalise(x, c)
        expected = torch.where(y == 255, 250, y * 10).float()
        assert torch.equal(pixels[0], expected)
        flipped += bool(pixels[1, 0, 0] > pixels[1, 0, -1])
    assert 0 < flipped < 20


def test_random_crop_is_a_window_of_the_input():
    torch.manual_seed(0)
    c = cfg(crop_size=6)
    image, label = coded(10, 14)
    x, y = build_transforms(c, train=True)(image, label)
    lab = torch.from_numpy(label)
    windows = [(i, j) for i in range(5) for j in range(9) if torch.equal(lab[i:i + 6, j:j + 6], y)]
    assert windows


def test_scale_resizes_image_bilinear_and_label_nearest():
    image = torch.rand(3, 10, 20)
    label = torch.randint(0, 5, (10, 20))
    img2, lab2 = resize(image, label, (15, 30))
    assert img2.shape == (3, 15, 30) and lab2.shape == (15, 30)
    assert set(lab2.unique().tolist()) <= set(label.unique().tolist())  # no blended labels
    c = cfg(crop_size=64, scale_min=2.0, scale_max=2.0)
    image, label = coded(10, 12)
    x, y = build_transforms(c, train=True)(image, label)
    assert (y[20:] == 255).all() and (y[:, 24:] == 255).all()
    assert torch.equal(y[:20, :24], torch.from_numpy(label).repeat_interleave(2, 0)
                       .repeat_interleave(2, 1))


def test_scaled_crop_covers_the_scaled_window():
    """Upscaled 2×, a 16 px crop shows an 8 px region of the source, magnified."""
    torch.manual_seed(0)
    c = cfg(crop_size=16, scale_min=2.0, scale_max=2.0)
    image, label = coded(30, 40)
    _, y = build_transforms(c, train=True)(image, label)
    lab = torch.from_numpy(label)
    source = y[::2, ::2]
    assert any(torch.equal(lab[i:i + 8, j:j + 8], source) for i in range(23) for j in range(33))
    c = cfg(crop_size=8, scale_min=0.5, scale_max=0.5)  # shrunk: a 16 px region becomes 8 px
    x, y = build_transforms(c, train=True)(image, label)
    assert x.shape == (3, 8, 8) and (y != 255).all()


def test_jitter_changes_colours_within_range():
    torch.manual_seed(0)
    image = torch.rand(3, 8, 8)
    out = jitter(image, 0.4)
    assert out.shape == image.shape and not torch.equal(out, image)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.allclose(jitter(image, 0.0), image, atol=1e-6)


def test_validation_is_deterministic_and_does_not_resize():
    c = cfg(crop_size=8, scale_min=0.5, scale_max=2.0, flip=True, jitter=0.5)
    image, label = coded(13, 17)
    t = build_transforms(c, train=False)
    x1, y1 = t(image, label)
    x2, y2 = t(image, label)
    assert x1.shape == (3, 13, 17) and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(y1, torch.from_numpy(label))
    expected = (torch.from_numpy(image).permute(2, 0, 1) / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
    assert torch.allclose(x1, expected / torch.tensor(IMAGENET_STD).view(3, 1, 1), atol=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_transform_pickles(train):
    import pickle

    t = pickle.loads(pickle.dumps(build_transforms(cfg(), train)))
    x, y = t(*coded(16, 16))
    assert x.shape == (3, 16, 16)
