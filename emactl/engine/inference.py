"""Test-time inference: whole image, sliding window, multi-scale and horizontal flip.

``predict_logits`` returns class scores at the input resolution. How the views combine:

- **Sliding window** (``eval.mode=slide``): square windows of ``eval.crop_size`` pixels on a
  grid with step ``eval.stride`` (default two thirds of the window, rounded down). The last
  window of each row and column is shifted back so it ends on the image border, so windows
  never leave the image. Where the image is *smaller* than the window, the window is
  zero-padded on the bottom/right up to ``crop_size`` — zero in normalised space is the
  dataset's mean colour — so the network always sees the input size it was trained on; the
  logits of the padding are cut off. Overlapping **logits** are summed and divided by a
  count map (how many windows cover each pixel), as in mmseg.
- **Padding** (``eval.pad_multiple``, the original EMANet evaluation: 8): each view is
  zero-padded (in normalised space) at the bottom and right to ``m·k + 1`` pixels a side, so
  an output-stride-``m`` network with ``align_corners=True`` upsampling lands its feature grid
  exactly on image pixels; the logits of the padding are cut off.
- **Multi-scale** (``eval.scales``): the image is resized bilinearly by each scale (sides
  rounded to the nearest pixel), run whole or sliding, and its logits resized back
  bilinearly. **Flip** (``eval.flip``) adds the horizontally mirrored image at every scale,
  whose logits are mirrored back.
- **Combining views**: with more than one view, the **softmax probabilities** of the views are
  averaged (as mmseg's test-time augmentation does; a confident view then cannot dominate
  through the scale of its logits), and the result is returned as log-probabilities, so
  ``softmax`` of the output gives the averaged probabilities and ``argmax`` the prediction.
  With a single view (one scale of 1.0, no flip), the raw logits are returned unchanged, so
  this path equals a plain forward pass.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import EvalConfig
from ..device import amp_dtype, autocast
from ..errors import UserError


def default_stride(crop_size: int) -> int:
    """Two thirds of the window (e.g. 341 for 513), at least one pixel."""
    return max(1, crop_size * 2 // 3)


def window_params(cfg: EvalConfig) -> tuple[int, int]:
    """``(crop_size, stride)`` for sliding-window inference, checked."""
    if cfg.crop_size is None:
        raise UserError("eval.crop_size: needed for eval.mode=slide (set --set eval.crop_size=N)")
    crop = int(cfg.crop_size)
    stride = int(cfg.stride) if cfg.stride is not None else default_stride(crop)
    if crop <= 0 or stride <= 0:
        raise UserError(f"eval.crop_size and eval.stride must be > 0, got {crop} and {stride}")
    if stride > crop:
        raise UserError(f"eval.stride={stride} is larger than eval.crop_size={crop}: windows would leave gaps")
    return crop, stride


def _starts(size: int, crop: int, stride: int) -> list[int]:
    """Window starts along one axis: a grid with step ``stride``, the last flush with the end."""
    if size <= crop:
        return [0]
    count = math.ceil((size - crop) / stride) + 1
    return [min(i * stride, size - crop) for i in range(count)]


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    if isinstance(out, dict):
        out = out["out"]
    return out.float()


def whole_inference(model: nn.Module, image: Tensor) -> Tensor:
    """One forward pass over the whole image; logits at the input size."""
    logits = _forward(model, image)
    if logits.shape[-2:] != image.shape[-2:]:
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return logits


def slide_inference(model: nn.Module, image: Tensor, num_classes: int, crop: int, stride: int) -> Tensor:
    """Sliding-window logits, averaged over overlapping windows (see the module docstring)."""
    b, _, h, w = image.shape
    logits = image.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for y in _starts(h, crop, stride):
        for x in _starts(w, crop, stride):
            window = image[:, :, y : y + crop, x : x + crop]
            wh, ww = window.shape[-2:]
            if wh < crop or ww < crop:
                window = F.pad(window, (0, crop - ww, 0, crop - wh))
            out = whole_inference(model, window)[:, :, :wh, :ww]
            logits[:, :, y : y + wh, x : x + ww] += out
            count[:, :, y : y + wh, x : x + ww] += 1
    return logits / count


def pad_to_multiple_plus_one(image: Tensor, multiple: int) -> Tensor:
    """Zero-pad ``image`` (…, H, W) at the bottom/right to sides of ``multiple · k + 1``."""
    h, w = image.shape[-2:]
    pad_h, pad_w = (1 - h) % multiple, (1 - w) % multiple
    return F.pad(image, (0, pad_w, 0, pad_h)) if pad_h or pad_w else image


def _views(cfg: EvalConfig) -> list[tuple[float, bool]]:
    """``(scale, flipped)`` for every test-time view."""
    return [(float(s), f) for s in cfg.scales for f in ((False, True) if cfg.flip else (False,))]


def predict_logits(
    model: nn.Module, image: Tensor, cfg: EvalConfig, num_classes: int, amp: str = "none"
) -> Tensor:
    """Class scores ``(B, K, H, W)`` (float32) for a normalised image batch ``(B, 3, H, W)``.

    The model should already be in eval mode. Runs under ``torch.inference_mode()`` and, with
    ``amp`` = ``bf16`` or ``fp16``, under autocast. Views are combined as described in the
    module docstring: raw logits for a single view, log of the mean softmax otherwise.
    """
    if image.dim() != 4:
        raise ValueError(f"expected an image batch (B, 3, H, W), got shape {tuple(image.shape)}")
    if cfg.mode not in ("whole", "slide"):
        raise UserError(f"eval.mode: got {cfg.mode!r}; choose one of: whole, slide")
    if not cfg.scales or any(s <= 0 for s in cfg.scales):
        raise UserError(f"eval.scales: need positive scales, got {cfg.scales}")
    crop, stride = window_params(cfg) if cfg.mode == "slide" else (0, 0)
    h, w = image.shape[-2:]
    views = _views(cfg)

    with torch.inference_mode(), autocast(image.device, amp_dtype(amp)):
        probs = None
        for scale, flip in views:
            img = image
            if scale != 1.0:
                size = (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
                img = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
            if flip:
                img = img.flip(-1)
            view_size = img.shape[-2:]
            if cfg.pad_multiple:
                img = pad_to_multiple_plus_one(img, cfg.pad_multiple)
            if cfg.mode == "slide":
                logits = slide_inference(model, img, num_classes, crop, stride)
            else:
                logits = whole_inference(model, img)
            logits = logits[..., : view_size[0], : view_size[1]]
            if flip:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            logits = logits.float()
            if len(views) == 1:
                return logits
            p = logits.softmax(dim=1)
            probs = p if probs is None else probs + p
        return (probs / len(views)).clamp_min(torch.finfo(torch.float32).tiny).log()
