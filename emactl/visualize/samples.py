"""What the model-based figures draw from: a run's model, some images, and one recorded forward.

Images come either from the recipe's dataset (``split``, the first ``count`` samples, with
their ground truth) or from files the user names (no ground truth). A recorded forward is a
single whole-image pass in eval mode that keeps what the EMA unit saw and produced, so the
prediction shown beside the responsibility maps is the one they explain.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from ..config import Recipe
from ..data import Sample, build_dataset, build_transforms, read_image
from ..data.base import DATASETS
from ..engine.checkpoint import LoadedRun, latest_checkpoint
from ..engine.evaluate import load_for_eval, run_dir_of
from ..engine.inference import pad_to_multiple_plus_one
from ..errors import UserError
from ..nn.ema import EMAU
from ..nn.emanet import ema_units
from ..predict import dataset_palette, list_images
from .common import output_dir, save, unique_names


@dataclass
class ImageSet:
    """Raw samples plus what is needed to colour their labels."""

    samples: list[Sample]
    class_names: list[str]
    palette: np.ndarray
    ignore_index: int


@dataclass
class Recorded:
    """One image through the model: the prediction and the EMA unit's inputs and outputs.

    ``feats`` is the conv1 output (what EM clusters) and ``recon`` the reconstruction μZᵀ,
    both (C, h, w) at the feature resolution; ``resp`` is Z reshaped to (h, w, K). With
    ``eval.pad_multiple`` the features cover the padded input of size ``input_size``, whose
    top-left corner is the image.
    """

    pred: np.ndarray
    feats: Tensor
    recon: Tensor
    bases: Tensor
    resp: Tensor
    input_size: tuple[int, int]


def latest_run(runs_dir: str | os.PathLike = "runs") -> Path:
    """The run in ``runs_dir`` whose newest checkpoint was written last.

    Used when a command is given no run: it is the run a user most likely just trained.
    """
    root = Path(runs_dir)
    candidates = []
    if root.is_dir():
        for run in root.iterdir():
            ckpt = latest_checkpoint(run) if run.is_dir() else None
            if ckpt is not None:
                candidates.append((ckpt.stat().st_mtime, run))
    if not candidates:
        raise UserError(f"{root}: no run directory with checkpoints found; pass a run directory or checkpoint")
    return max(candidates, key=lambda c: c[0])[1]


def resolve_run(path: str | os.PathLike | None) -> Path:
    """The run or checkpoint path given, or the latest run in ``runs/`` (announced on stderr)."""
    if path is not None:
        if not Path(path).exists():
            raise UserError(f"{path}: no such run directory or file")
        return Path(path)
    run = latest_run()
    print(f"using the latest run: {run}", file=sys.stderr)
    return run


def load_run(path: str | os.PathLike | None, overrides: Sequence[str], device: str) -> tuple[LoadedRun, torch.device, Path]:
    """The model (eval mode, on ``device``), the device and the run directory for figures."""
    path = resolve_run(path)
    run, _, dev = load_for_eval(path, list(overrides), device=device)
    return run, dev, run_dir_of(path)


def require_ema(run: LoadedRun, command: str) -> EMAU:
    """The (first) EMA unit of the model; a model without one cannot be drawn."""
    units = ema_units(run.model)
    if not units:
        raise UserError(
            f"{run.checkpoint}: model.head={run.recipe.model.head!r} has no EMA unit; "
            f"`visualize {command}` needs a model trained with model.head=ema"
        )
    return units[0]


def recipe_class_names(recipe: Recipe) -> list[str]:
    """Class names without building the dataset (its files may be absent with ``--images``)."""
    k = recipe.data.num_classes
    if recipe.data.class_names is not None:
        return list(recipe.data.class_names)
    standard = getattr(DATASETS.get(recipe.data.name, "data.name"), "CLASSES", None)
    if standard is not None and len(standard) == k:
        return list(standard)
    return [f"class_{i}" for i in range(k)]


def _list_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        files.extend(list_images(path))
    return files


def load_images(recipe: Recipe, images: Sequence[str | os.PathLike] | None, split: str | None, count: int) -> ImageSet:
    """The named image files (or folders of images), else the first ``count`` samples of ``split``."""
    if count < 1:
        raise UserError(f"--count: must be >= 1, got {count}")
    if images:
        samples = [Sample(read_image(p), None, p.stem) for p in _list_images(images)]
        return ImageSet(samples, recipe_class_names(recipe), dataset_palette(recipe), recipe.data.ignore_index)
    split = split or recipe.data.val_split
    dataset = build_dataset(recipe.data, split, train=False)
    if len(dataset) == 0:
        raise UserError(f"dataset {recipe.data.name!r} split {split!r} holds no images")
    samples = [dataset.load(i) for i in range(min(count, len(dataset)))]
    return ImageSet(samples, list(dataset.class_names), dataset.palette, dataset.ignore_index)


def normalise(recipe: Recipe, image: np.ndarray) -> Tensor:
    """A (1, 3, H, W) model input: the recipe's validation transform (normalisation only)."""
    tensor, _ = build_transforms(recipe.data, train=False)(image, np.zeros(image.shape[:2], dtype=np.int64))
    return tensor[None]


@torch.no_grad()
def forward_record(run: LoadedRun, unit: EMAU, image: np.ndarray, device: torch.device) -> Recorded:
    """Run one whole image through the model and keep what ``unit`` saw and produced."""
    captured: dict[str, Tensor] = {}
    # the unit may fold conv1 into its products, so its features are computed here from its input
    hook = unit.register_forward_pre_hook(lambda m, args: captured.__setitem__("feats", m.conv1(args[0]).detach()))
    was_recording = unit.record
    unit.record = True
    try:
        x = normalise(run.recipe, image)
        if run.recipe.eval.pad_multiple:
            x = pad_to_multiple_plus_one(x, run.recipe.eval.pad_multiple)
        out = run.model(x.to(device))
    finally:
        unit.record = was_recording
        hook.remove()
    logits = out["out"] if isinstance(out, dict) else out
    last = unit.last
    feats = captured["feats"][0].float().cpu()
    c, h, w = feats.shape
    return Recorded(
        pred=logits.argmax(dim=1)[0, : image.shape[0], : image.shape[1]].cpu().numpy().astype(np.int64),
        feats=feats,
        recon=last.recon[0].float().cpu().reshape(c, h, w),
        bases=last.bases[0].float().cpu(),
        resp=last.resp[0].float().cpu().reshape(h, w, -1),
        input_size=(int(x.shape[-2]), int(x.shape[-1])),
    )


@dataclass
class PerImage:
    """What a per-image figure draws from: the loaded run, its device, its EMA unit (when the
    figure needs one) and the chosen images."""

    run: LoadedRun
    device: torch.device
    unit: EMAU | None
    images: ImageSet

    def title(self, sample: Sample) -> str:
        """``<image> — <run name>, iteration <n>``: the first line of every per-image figure."""
        return f"{sample.name} — {self.run.recipe.name}, iteration {self.run.iteration}"

    def record(self, image: np.ndarray) -> Recorded:
        """One recorded forward of ``image`` through the run's EMA unit."""
        assert self.unit is not None, "record() needs draw_per_image(..., ema_command=...)"
        return forward_record(self.run, self.unit, image, self.device)


def draw_per_image(
    prefix: str,
    figure: Callable[[PerImage, Sample], Figure],
    path: str | os.PathLike | None,
    images: Sequence[str | os.PathLike] | None,
    out: str | os.PathLike | None,
    split: str | None,
    count: int,
    overrides: Sequence[str],
    device: str,
    ema_command: str | None = None,
) -> list[Path]:
    """Load the run and the images once, then write ``<prefix>_<image>.png`` per image from
    ``figure(context, sample)``; return the paths.

    With ``ema_command`` the model must have an EMA unit (else one line naming the command).
    """
    run, dev, run_dir = load_run(path, overrides, device)
    unit = require_ema(run, ema_command) if ema_command is not None else None
    image_set = load_images(run.recipe, images, split, count)
    context = PerImage(run, dev, unit, image_set)
    out_dir = output_dir(out, run_dir)
    written = []
    for sample, name in zip(image_set.samples, unique_names(s.name for s in image_set.samples)):
        written.append(save(figure(context, sample), out_dir / f"{prefix}_{name}.png"))
    return written
