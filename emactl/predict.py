"""``emactl predict``: segment a folder of images with a trained run.

For every image ``<stem>.<ext>`` it writes ``<out>/<stem>.png``, a palette PNG whose pixel
values are the predicted class indices (so the folder can serve as a mask directory), and with
``overlay`` also ``<out>/overlays/<stem>.jpg`` (``.png`` for non-JPEG inputs): the image
blended with the class colours. Inference uses the stored recipe's eval settings (mode,
scales, flip, window) and its normalisation; ``--set`` overrides them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from .config import EvalConfig, Recipe, dump_yaml, with_overrides
from .data import DATASETS, build_transforms, colorize, read_image, save_palette_png, voc_palette
from .data.palette import palette_from
from .engine.evaluate import load_for_eval, resolve_eval_config
from .engine.inference import predict_logits
from .errors import UserError
from .io import atomic_path, write_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
OVERLAY_DIR = "overlays"


def list_images(path: str | os.PathLike) -> list[Path]:
    """One image file, or the image files directly inside a folder (sorted by name)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"{path}: no such image file or folder")
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return images


def dataset_palette(recipe: Recipe) -> np.ndarray:
    """The (256, 3) palette of the recipe's dataset (its class's ``COLOURS``, else VOC's),
    without needing its files on disk."""
    colours = DATASETS.get(recipe.data.name, "data.name").COLOURS
    return palette_from(colours) if colours else voc_palette()


def blend(image: np.ndarray, label: np.ndarray, palette: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) · image + alpha · colour(label)`` as (H, W, 3) uint8."""
    colours = colorize(label, palette).astype(np.float32)
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def normalise(image: np.ndarray, recipe: Recipe) -> torch.Tensor:
    """One (H, W, 3) uint8 RGB image as the (1, 3, H, W) float tensor the network takes."""
    transform = build_transforms(recipe.data, train=False)
    tensor, _ = transform(image, np.zeros(image.shape[:2], dtype=np.int64))
    return tensor[None]


def predict_label(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor], image: np.ndarray, recipe: Recipe, cfg: EvalConfig,
    device: torch.device,
) -> np.ndarray:
    """The (H, W) int64 class map of one (H, W, 3) uint8 RGB image."""
    logits = predict_logits(model, normalise(image, recipe).to(device), cfg, recipe.data.num_classes)
    return logits.argmax(dim=1)[0].cpu().numpy().astype(np.int64)


def _save_rgb(path: Path, array: np.ndarray) -> Path:
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return path


def _outputs(images: list[Path], out_dir: Path, overlay: bool) -> list[tuple[Path, Path, Path | None]]:
    """``(image, mask, overlay)`` paths, refusing clashes that would lose or overwrite files."""
    plan, seen = [], {}
    inputs = {p.resolve() for p in images}
    for image in images:
        mask = out_dir / f"{image.stem}.png"
        if mask.name in seen:
            raise UserError(f"{image} and {seen[mask.name]} would both write {mask}; rename one")
        seen[mask.name] = image
        if mask.resolve() in inputs:
            raise UserError(f"{mask}: the mask would overwrite an input image; choose another --out")
        suffix = ".jpg" if image.suffix.lower() in (".jpg", ".jpeg") else ".png"
        over = out_dir / OVERLAY_DIR / f"{image.stem}{suffix}" if overlay else None
        plan.append((image, mask, over))
    return plan


def load_predictor(
    path: str | os.PathLike, overrides: list[str], device: str
) -> tuple[Any, Recipe, EvalConfig, torch.device]:
    """``(model, recipe, eval settings, device)`` of a run, a checkpoint or an exported ``.onnx``
    file (run by onnxruntime on the CPU, with the recipe stored in its metadata)."""
    if Path(path).suffix.lower() != ".onnx":
        run, cfg, dev = load_for_eval(path, overrides, device=device)
        return run.model, run.recipe, cfg, dev
    # Not at the top: emactl.export imports this module (it checks an export against predict's code).
    from .export import OnnxModel, onnx_eval_config

    session = OnnxModel(path)
    recipe = with_overrides(session.recipe_dict(), overrides, str(path))
    return session, recipe, onnx_eval_config(resolve_eval_config(recipe)), torch.device("cpu")


def predict_images(
    run_path: str | os.PathLike,
    inputs: str | os.PathLike,
    out_dir: str | os.PathLike,
    overlay: bool = False,
    alpha: float = 0.5,
    overrides: list[str] | None = None,
    device: str = "auto",
    progress: bool = True,
) -> list[Path]:
    """Segment ``inputs`` (an image or a folder) with a run, a checkpoint or an exported ONNX
    file; return the written files.

    A corrupt image stops the run with a UserError naming it; files written before it stay
    valid (every write is atomic).
    """
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--alpha: must be in [0, 1], got {alpha}")
    images = list_images(inputs)
    out_dir = Path(out_dir)
    plan = _outputs(images, out_dir, overlay)
    model, recipe, cfg, dev = load_predictor(run_path, overrides or [], device)
    if recipe.data.num_classes > 256:
        raise UserError(f"data.num_classes={recipe.data.num_classes}: a palette PNG holds at most 256 classes")
    palette = dataset_palette(recipe)
    written = [write_text(out_dir / "recipe.yaml", dump_yaml(recipe))]
    columns = (TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress, transient=True) as bar:
        task = bar.add_task("predict", total=len(plan))
        for image_path, mask_path, overlay_path in plan:
            image = read_image(image_path)
            label = predict_label(model, image, recipe, cfg, dev)
            save_palette_png(mask_path, label, palette)
            written.append(mask_path)
            if overlay_path is not None:
                written.append(_save_rgb(overlay_path, blend(image, label, palette, alpha)))
            bar.advance(task)
    return written
