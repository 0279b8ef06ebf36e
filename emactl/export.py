"""``emactl export``: a trained network as ONNX, TorchScript or a ``torch.export`` program.

What is exported (:class:`ExportNet`) is one whole-image view of ``emactl predict``:

- input: one float32 NCHW tensor, the RGB image scaled to 0–1 and normalised with the run's
  ``mean`` / ``std`` (``(x / 255 - mean) / std``); output: the logits (N, K, H, W) at the
  input size;
- the EM iterations are fixed at the run's eval T (``eval.iters``, else the unit's own);
- BatchNorm that directly follows a convolution is folded into it (:func:`fold_batchnorm`);
  the EMA unit folds its own conv2 + BN in eval mode;
- ``eval.pad_multiple`` (the original code's protocol) is **inside the graph**: the input is
  zero-padded at the bottom/right to ``m·k + 1`` pixels a side and the logits cropped back,
  as :func:`emactl.engine.inference.predict_logits` does; ``model.align_corners`` is part of
  the network's own upsampling. A runtime therefore needs only the normalisation.

Multi-scale, flip and sliding windows are not in the graph: they combine several forward
passes. The ONNX file carries the whole eval section (``eval`` metadata) and
``emactl predict`` replays it around the ONNX model, so ``emactl predict MODEL.onnx`` gives the
masks of ``emactl predict RUN``.

ONNX metadata properties (all JSON): ``mean``, ``std`` (for RGB input scaled to 0–1; emactl
networks never take 0–255 input, so there is no ``input_scale``), ``classes``, ``em_iters``
(null without an EMA unit), ``pad_multiple``, ``align_corners``, ``eval`` and ``recipe``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .config import EvalConfig, Recipe, to_dict
from .engine.evaluate import load_for_eval
from .engine.inference import predict_logits
from .errors import UserError
from .io import atomic_path
from .nn.emanet import ema_units
from .predict import normalise

FORMATS = ("onnx", "torchscript", "exported")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2"}
EXTRA = 'emactl export needs onnx and onnxruntime: pip install -e ".[export]"'
OPSET = 17
MASK_AGREEMENT = 0.999  # fraction of pixels whose class must match emactl predict
LOGIT_TOLERANCE = 1e-4  # max |onnx - torch| / max |torch|


def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or a UserError naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UserError(EXTRA) from None
    return onnx, onnxruntime


class AdaptiveAvgPool(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as two averaging matrices built from the input's size.

    ONNX has no adaptive pooling to sizes other than 1 (it exports only when the input divides
    evenly); bin ``i`` of ``o`` covers ``[floor(i·H/o), ceil((i+1)·H/o))`` exactly as PyTorch's.
    """

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)

    @staticmethod
    def _matrix(size: Tensor | int, bins: int, like: Tensor) -> Tensor:
        idx = torch.arange(size, device=like.device)
        i = torch.arange(bins, device=like.device)
        start = torch.div(i * size, bins, rounding_mode="floor")
        end = torch.div((i + 1) * size + bins - 1, bins, rounding_mode="floor")
        inside = ((idx[None] >= start[:, None]) & (idx[None] < end[:, None])).to(like.dtype)
        return inside / inside.sum(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        oh, ow = self.output_size
        if (oh, ow) == (1, 1):
            return x.mean(dim=(2, 3), keepdim=True)
        rows = self._matrix(x.shape[2], oh, x)  # (oh, H)
        cols = self._matrix(x.shape[3], ow, x)  # (ow, W)
        return torch.matmul(torch.matmul(rows, x), cols.t())


def _fuse(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    return torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d (in an ``nn.Sequential``, or the
    ``convN``/``bnN`` pairs of torchvision's residual blocks) into the conv; return how many.
    The model must be in eval mode; it is changed in place."""
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for a, b in zip(names, names[1:]):
                conv, bn = module._modules[a], module._modules[b]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                    module._modules[a], module._modules[b] = _fuse(conv, bn), nn.Identity()
                    folded += 1
        if isinstance(module, (BasicBlock, Bottleneck)):
            for i in (1, 2, 3):
                conv, bn = getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None)
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    setattr(module, f"conv{i}", _fuse(conv, bn))
                    setattr(module, f"bn{i}", nn.Identity())
                    folded += 1
    return folded


def _replace_adaptive_pools(model: nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d):
                setattr(module, name, AdaptiveAvgPool(child.output_size))


class ExportNet(nn.Module):
    """One whole-image view of ``predict_logits``: pad to ``m·k + 1``, forward, crop the logits."""

    def __init__(self, model: nn.Module, pad_multiple: int | None) -> None:
        super().__init__()
        self.model = model
        self.pad_multiple = int(pad_multiple or 0)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[2], x.shape[3]
        if self.pad_multiple:
            m = self.pad_multiple
            x = F.pad(x, (0, (1 - w) % m, 0, (1 - h) % m))
        out = self.model(x)
        if isinstance(out, dict):
            out = out["out"]
        return out[:, :, :h, :w].float()


def export_network(model: nn.Module, pad_multiple: int | None) -> ExportNet:
    """A copy of ``model`` ready to trace: eval mode, BN folded, adaptive pools made exportable."""
    net = copy.deepcopy(model).eval()
    fold_batchnorm(net)
    _replace_adaptive_pools(net)
    return ExportNet(net, pad_multiple).eval()


def metadata(recipe: Recipe, cfg: EvalConfig, em_iters: int | None) -> dict[str, str]:
    """The ONNX metadata properties (see the module docstring), every value JSON."""
    # Not at the top: importing emactl.visualize loads matplotlib, which exporting does not otherwise need.
    from .visualize.samples import recipe_class_names

    data = recipe.data
    return {
        "mean": json.dumps([float(v) for v in data.mean]),
        "std": json.dumps([float(v) for v in data.std]),
        "classes": json.dumps(recipe_class_names(recipe)),
        "em_iters": json.dumps(em_iters),
        "pad_multiple": json.dumps(cfg.pad_multiple),
        "align_corners": json.dumps(bool(recipe.model.align_corners)),
        "eval": json.dumps(to_dict(recipe)["eval"]),
        "recipe": json.dumps(to_dict(recipe)),
        "producer": "emactl",
    }


def check_size(size: tuple[int, int] | None, dynamic: bool) -> None:
    if size is not None and dynamic:
        raise UserError("--size and --dynamic: choose one (a fixed input size, or any size)")
    if size is not None and min(size) < 1:
        raise UserError(f"--size: sides must be >= 1, got {size[0]} {size[1]}")


def _dummy(size: tuple[int, int], batch: int) -> Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))


def write_onnx(net: nn.Module, example: Tensor, path: Path, dynamic: bool, meta: dict[str, str]) -> None:
    """Trace ``net`` on ``example`` into an ONNX file at ``path``, with metadata ``meta``.

    The legacy (TorchScript-based) exporter: the dynamo one needs onnxscript, another package."""
    onnx, _ = require_onnx()
    axes = {"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}}
    with torch.no_grad():
        torch.onnx.export(net, (example,), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes=axes if dynamic else None, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    proto = onnx.load(str(path))
    for key, value in meta.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(proto, str(path))


def _torchscript(net: ExportNet, example: Tensor, path: Path) -> None:
    with torch.no_grad():
        traced = torch.jit.trace(net, (example,), check_trace=False)
    with atomic_path(path) as tmp:
        torch.jit.save(traced, str(tmp))


def _exported(net: ExportNet, example: Tensor, path: Path, dynamic: bool) -> None:
    shapes = None
    if dynamic:
        dim = torch.export.Dim.AUTO
        shapes = {"x": {0: dim, 2: dim, 3: dim}}
    with torch.no_grad():
        program = torch.export.export(net, (example,), dynamic_shapes=shapes)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: the temporary name lacks .pt2
        torch.export.save(program, f)


@dataclass
class Agreement:
    """How the ONNX model compares with ``emactl predict`` on one sample image."""

    mask: float  # fraction of pixels with the same class
    logits: float  # max |onnx - torch| / max |torch|
    size: tuple[int, int]

    @property
    def ok(self) -> bool:
        return self.mask >= MASK_AGREEMENT and self.logits <= LOGIT_TOLERANCE

    def describe(self) -> str:
        h, w = self.size
        return (f"onnxruntime vs emactl predict on a {h}x{w} sample: masks agree on {100 * self.mask:.3f}% of pixels, "
                f"max relative logit error {self.logits:.2e}")


def sample_image(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A deterministic (H, W, 3) uint8 test image: smooth colour blobs plus a little noise, so
    the network sees structure rather than white noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    coarse = rng.integers(0, 256, size=(max(2, h // 8), max(2, w // 8), 3)).astype(np.float32)
    image = F.interpolate(torch.from_numpy(coarse).permute(2, 0, 1)[None], size=(h, w), mode="bilinear",
                          align_corners=False)[0].permute(1, 2, 0).numpy()
    image += rng.normal(0, 8, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def compare(a: Tensor, b: Tensor) -> tuple[float, float]:
    """``(mask agreement, max relative logit error)`` of logits ``a`` against the reference ``b``."""
    agree = (a.argmax(dim=1) == b.argmax(dim=1)).float().mean().item()
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    return agree, err


def check_onnx(path: Path, run: Any, cfg: EvalConfig, device: torch.device, size: tuple[int, int],
               image: np.ndarray | None = None) -> Agreement:
    """Segment one image with ``emactl predict``'s code on the run and on the ONNX file."""
    recipe = run.recipe
    image = sample_image(size) if image is None else image
    tensor = normalise(image, recipe)
    reference = predict_logits(run.model, tensor.to(device), cfg, recipe.data.num_classes).cpu()
    session = OnnxModel(path)
    logits = predict_logits(session, tensor, onnx_eval_config(cfg), recipe.data.num_classes)
    agree, err = compare(logits, reference)
    return Agreement(agree, err, (image.shape[0], image.shape[1]))


def onnx_eval_config(cfg: EvalConfig) -> EvalConfig:
    """The eval settings to replay around an exported graph: whole-image views leave the
    ``pad_multiple`` padding to the graph (so a fixed-size export takes the image's own size);
    a sliding window pads the view first, as :func:`predict_logits` does, and the graph's
    padding is then a no-op for windows of ``m·k + 1`` pixels."""
    if cfg.mode == "whole":
        return dataclasses.replace(cfg, pad_multiple=None)
    return cfg


class OnnxModel:
    """An ONNX file under onnxruntime, called like a model: normalised images in, logits out."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        onnx, ort = require_onnx()
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such ONNX file")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise UserError(f"{path}: not a readable ONNX model ({str(e).splitlines()[0][:200]})") from None
        self.meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.input = self.session.get_inputs()[0]
        self.path = path

    def recipe_dict(self) -> dict[str, Any]:
        """The run's recipe, as stored by :func:`metadata`."""
        if "recipe" not in self.meta:
            raise UserError(f"{self.path}: no emactl recipe in its metadata; export it with emactl export")
        return json.loads(self.meta["recipe"])

    def __call__(self, x: Tensor) -> Tensor:
        shape = self.input.shape
        fixed = [d for d in shape[2:] if isinstance(d, int)]
        if len(fixed) == 2 and tuple(fixed) != tuple(x.shape[2:]):
            raise UserError(f"{self.path}: exported for {fixed[0]}x{fixed[1]} input, got {x.shape[2]}x{x.shape[3]}; "
                            "export with --dynamic for other sizes")
        out = self.session.run(None, {self.input.name: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)


def export_run(run_path: str | os.PathLike, fmt: str, out: str | os.PathLike, size: tuple[int, int] | None = None,
               dynamic: bool = False, overrides: list[str] | None = None, device: str = "cpu",
               check: bool = True) -> Agreement | None:
    """Export a run (see the module docstring); for ONNX, return the check on a sample image."""
    if fmt not in FORMATS:
        raise UserError(f"--format: got {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_size(size, dynamic)
    if fmt == "onnx":
        require_onnx()
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name such as model{SUFFIXES[fmt]}")
    run, cfg, dev = load_for_eval(run_path, overrides or [], device=device)
    recipe = run.recipe
    multi_view = cfg.mode != "whole" or len(cfg.scales) != 1 or cfg.scales[0] != 1.0 or cfg.flip
    if size is not None and multi_view:
        raise UserError("--size: the recipe's eval uses several views (slide, scales or flip) of other sizes; "
                        "export with --dynamic, or set eval.mode=whole eval.scales=[1.0] eval.flip=false")
    shape = size or (recipe.data.crop_size or 65,) * 2
    units = ema_units(run.model)
    em_iters = units[0].eval_iters if units else None
    net = export_network(run.model, cfg.pad_multiple).to(dev)
    example = _dummy(shape, 2 if dynamic else 1).to(dev)  # torch.export keeps a batch of 1 fixed
    with warnings.catch_warnings():
        # tracing warns about every Python int it records (the padding, the crop): expected
        # here, where the graph is checked against eager PyTorch instead
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            _torchscript(net, example, out)
            return None
        if fmt == "exported":
            _exported(net, example, out, dynamic)
            return None
        with atomic_path(out) as tmp:
            write_onnx(net, example, tmp, dynamic, metadata(recipe, cfg, em_iters))
            if not check:
                return None
            # a dynamic export is checked at a size it was not traced at
            agreement = check_onnx(tmp, run, cfg, dev, shape if size is not None else (shape[0] + 3, shape[1] + 7))
            if not agreement.ok:  # the file is not written
                raise UserError(f"{out}: not written: {agreement.describe()}; need >= {100 * MASK_AGREEMENT:g}% "
                                f"and <= {LOGIT_TOLERANCE:g}")
    return agreement
