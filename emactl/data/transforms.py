"""Joint image/label transforms for training and validation.

Training: random scale in [scale_min, scale_max] (bilinear image, nearest label), a random
``crop_size`` crop, horizontal flip, optional photometric jitter, then normalisation. Crops
larger than the image are padded at the bottom/right: the image with the mean colour (zeros
after normalisation) and the label with the ignore index. The crop window is chosen first and
only the source region under it is resized, which gives the same result as scaling the whole
image and then cropping, at a fraction of the cost for large images (Cityscapes at 2×).

Validation: no resizing; just normalisation, so results are deterministic.

Randomness comes from torch's global generator, which DataLoader seeds differently in every
worker (numpy's global generator would repeat the same augmentations in each worker).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import DataConfig

TransformFn = Callable[[np.ndarray, np.ndarray], tuple[Tensor, Tensor]]

_GRAY = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def _tensor(array: np.ndarray, dtype: type | None = None) -> Tensor:
    """A tensor sharing memory with ``array`` where possible (copied if read-only)."""
    array = np.asarray(array, dtype=dtype)
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.array(array, order="C")
    return torch.from_numpy(array)


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def _randint(high: int) -> int:
    """Uniform integer in [0, high]."""
    return int(torch.randint(0, high + 1, ()))


def resize(image: Tensor, label: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Resize a (3, H, W) float image bilinearly and its (H, W) label by nearest neighbour."""
    h, w = label.shape
    if size == (h, w):
        return image, label
    shrink = size[0] < h or size[1] < w
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                          antialias=shrink)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0]
    return image, label.long()


def jitter(image: Tensor, strength: float) -> Tensor:
    """Random brightness, contrast and saturation, each by a factor in [1 - s, 1 + s].

    ``image`` is (3, H, W) in [0, 1]; the result is clamped to [0, 1].
    """
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    image = image * _uniform(lo, hi)
    mean = (image * _GRAY).sum(0).mean()
    image = (image - mean) * _uniform(lo, hi) + mean
    gray = (image * _GRAY).sum(0, keepdim=True)
    image = (image - gray) * _uniform(lo, hi) + gray
    return image.clamp_(0.0, 1.0)


class SegTransform:
    """The transform a dataset applies in ``__getitem__`` (a class, so it pickles for workers)."""

    def __init__(self, cfg: DataConfig, train: bool) -> None:
        self.train = train
        self.crop_size = cfg.crop_size
        self.scale_range = (cfg.scale_min, cfg.scale_max)
        self.flip = cfg.flip
        self.jitter = cfg.jitter
        self.ignore_index = cfg.ignore_index
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[Tensor, Tensor]:
        img = _tensor(image).permute(2, 0, 1)  # uint8 view; converted after cropping
        lab = _tensor(label, np.int64)
        if not self.train:
            return (img.float().div_(255.0) - self.mean) / self.std, lab
        lo, hi = self.scale_range
        scale = _uniform(lo, hi) if hi > lo else lo
        # The source region that the crop window covers once scaled, at a random position.
        c = self.crop_size
        h, w = lab.shape
        hs, ws = min(h, math.ceil(c / scale)), min(w, math.ceil(c / scale))
        top, left = _randint(h - hs), _randint(w - ws)
        img = img[:, top : top + hs, left : left + ws].float().div_(255.0)
        lab = lab[top : top + hs, left : left + ws]
        size = (min(c, max(1, round(hs * scale))), min(c, max(1, round(ws * scale))))
        img, lab = resize(img, lab, size)
        if self.flip and float(torch.rand(())) < 0.5:
            img, lab = img.flip(-1), lab.flip(-1)
        if self.jitter > 0:
            img = jitter(img, self.jitter)
        img = (img - self.mean) / self.std
        ch, cw = lab.shape
        if (ch, cw) != (c, c):
            out_img = img.new_zeros((3, c, c))
            out_lab = lab.new_full((c, c), self.ignore_index)
            out_img[:, :ch, :cw] = img
            out_lab[:ch, :cw] = lab
            img, lab = out_img, out_lab
        return img.contiguous(), lab.contiguous()


def build_transforms(cfg: DataConfig, train: bool) -> TransformFn:
    """Training (``train=True``) or deterministic validation transforms for ``cfg``."""
    return SegTransform(cfg, train)
