"""Evaluation: run a model over a dataset, accumulate the confusion matrix, write the tables.

``evaluate`` is the loop shared by ``emactl eval`` and the trainer's periodic validation;
``evaluate_run`` is the library code behind ``emactl eval``. Under ``torch.distributed`` each
rank evaluates the images ``rank, rank + world, ...`` — every image exactly once, no padding
duplicates as ``DistributedSampler`` would add — and the confusion matrices are summed with
``all_reduce``. Only rank 0 writes files and prints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import EvalConfig, Recipe, dump_yaml, validate
from ..data import build_dataset
from ..data.loading import batches
from ..device import resolve_device
from ..errors import UserError
from ..io import ensure_dir, folder_lock, write_text
from ..lists import items
from ..nn.emanet import ema_units, set_eval_iters
from ..tables import describe_paths, print_table, save_table
from .checkpoint import CKPT_DIR, LoadedRun, load_model, resolve_checkpoint
from .distributed import cleanup, init_distributed, is_initialized
from .inference import predict_logits, window_params
from .metrics import ConfusionMeter, compute_metrics

EVAL_DIR = "eval"


@dataclass
class EvalResult:
    """Metrics of one evaluation.

    ``confusion`` is the (K, K) int64 matrix on the CPU, rows = ground truth; ``summary`` holds
    aAcc, mAcc, mIoU and fwIoU in percent; ``per_class`` has columns class, IoU, Acc, pixels;
    ``meta`` describes what was evaluated (checkpoint, eval settings, image count).
    """

    confusion: Tensor
    summary: dict[str, float]
    per_class: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)


def resolve_eval_config(recipe: Recipe) -> EvalConfig:
    """The recipe's eval settings with sliding-window defaults filled in and checked.

    An unset ``eval.crop_size`` takes the training crop (``data.crop_size``).
    """
    cfg = dataclasses.replace(recipe.eval, scales=list(recipe.eval.scales))
    if cfg.mode == "slide":
        if cfg.crop_size is None:
            cfg.crop_size = recipe.data.crop_size
        cfg.crop_size, cfg.stride = window_params(cfg)
    return cfg


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collate(batch: list[tuple[Tensor, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
    """Keep images as lists: validation images may differ in size and must not be padded."""
    return [b[0] for b in batch], [b[1] for b in batch]


def _same_size_groups(images: list[Tensor]) -> list[list[int]]:
    """Indices of consecutive images with equal sizes, to be stacked into one forward pass."""
    groups: list[list[int]] = []
    for i, img in enumerate(images):
        if groups and images[groups[-1][0]].shape == img.shape:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]eval"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=True,
    )


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    cfg: EvalConfig,
    num_classes: int,
    ignore_index: int,
    device: torch.device | str,
    progress: bool = True,
    workers: int = 0,
    amp: str = "none",
) -> EvalResult:
    """Evaluate ``model`` on every image of ``dataset`` (items ``(image (3,H,W), label (H,W))``).

    Batches of ``cfg.batch_size`` images are run through :func:`predict_logits`; images of
    different sizes in one batch are run separately rather than padded. The model is put in
    eval mode and restored to its previous mode afterwards. Collective: under
    ``torch.distributed`` every rank must call it.
    """
    device = torch.device(device)
    rank, world = _rank_world()
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    meter = ConfusionMeter(num_classes, ignore_index, device)
    was_training = inner.training
    inner.eval()
    try:
        with _progress(progress and rank == 0) as bar:
            task = bar.add_task("eval", total=len(indices))
            for images, labels in batches(loader):
                for group in _same_size_groups(images):
                    x = torch.stack([images[i] for i in group]).to(device, non_blocking=True)
                    y = torch.stack([labels[i] for i in group]).to(device, non_blocking=True)
                    logits = predict_logits(inner, x, cfg, num_classes, amp=amp)
                    meter.update(logits.argmax(dim=1), y)
                bar.advance(task, len(images))
    finally:
        inner.train(was_training)
    confusion = meter.reduce().cpu()
    names = getattr(dataset, "class_names", None)
    if names is None or len(names) != num_classes:
        names = [str(i) for i in range(num_classes)]
    summary, per_class = compute_metrics(confusion, names)
    return EvalResult(confusion, summary, per_class, {"images": len(dataset)})


METRIC_COLUMNS = ("aAcc", "mAcc", "mIoU", "fwIoU")
# The columns of every summary.csv, whether `emactl train` or `emactl eval` wrote it.
SUMMARY_COLUMNS = METRIC_COLUMNS + ("setting", "split", "mode", "scales", "flip", "crop_size", "stride", "em_iters",
                                    "iteration", "checkpoint", "images")


def _number(v: float) -> str:
    return f"{v:g}"


def setting_name(meta: dict[str, Any]) -> str:
    """A folder name for one evaluation setting: ``val_whole_s1_T3_it1000``.

    Split, inference mode (with the window for ``slide``), scales, flip, EM iterations T and
    the checkpoint's iteration: everything that changes the numbers, so two settings never
    share a folder.
    """
    parts = [str(meta.get("split") or "val")]
    mode = str(meta.get("mode") or "whole")
    if mode == "slide" and meta.get("crop_size") is not None:
        mode += f"{meta['crop_size']}x{meta.get('stride')}"
    parts.append(mode)
    scales = meta.get("scales") or [1.0]
    parts.append("s" + "-".join(_number(float(x)) for x in scales))
    if meta.get("flip"):
        parts.append("flip")
    if meta.get("em_iters") is not None:
        parts.append(f"T{meta['em_iters']}")
    if meta.get("iteration") is not None:
        parts.append(f"it{meta['iteration']}")
    return "_".join(parts)


def describe_setting(meta: dict[str, Any]) -> str:
    """The setting in words for titles: ``whole image, scales 0.75/1/1.25 + flip, T=3, iteration 1000``."""
    text = "sliding window" if meta.get("mode") == "slide" else "whole image"
    scales = [float(x) for x in items(str(meta.get("scales") or "1"))]
    text += ", single scale" if scales == [1.0] else ", scales " + "/".join(_number(x) for x in scales)
    if str(meta.get("flip")).lower() in ("true", "1"):
        text += " + flip"
    if meta.get("em_iters") is not None and not pd.isna(meta.get("em_iters")):
        text += f", T={int(meta['em_iters'])}"
    if meta.get("iteration") is not None and not pd.isna(meta.get("iteration")):
        text += f", iteration {int(meta['iteration'])}"
    return text


def in_run(checkpoint: Path, run_dir: Path) -> Path:
    """``checkpoint`` relative to ``run_dir`` when it lies inside (a run can move), else as given."""
    try:
        return checkpoint.resolve().relative_to(run_dir.resolve())
    except ValueError:
        return checkpoint


def eval_meta(
    cfg: EvalConfig, split: str, model: nn.Module, iteration: int | None, checkpoint: str | os.PathLike | None
) -> dict[str, Any]:
    """What an evaluation ran: the ``meta`` of :class:`EvalResult`, ``setting`` included
    (``checkpoint`` as given: callers pass it relative to the run directory, see :func:`in_run`)."""
    units = ema_units(model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model)
    meta: dict[str, Any] = {
        "split": split,
        "mode": cfg.mode,
        "scales": list(cfg.scales),
        "flip": cfg.flip,
        "crop_size": cfg.crop_size if cfg.mode == "slide" else None,
        "stride": cfg.stride if cfg.mode == "slide" else None,
        "em_iters": units[0].eval_iters if units else None,
        "iteration": iteration,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
    }
    meta["setting"] = setting_name(meta)
    return meta


def summary_frame(result: EvalResult) -> pd.DataFrame:
    """One row with the :data:`SUMMARY_COLUMNS` (lists joined by commas; missing entries empty)."""
    row: dict[str, Any] = dict(result.summary)
    for key, value in result.meta.items():
        row[key] = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value
    extra = [k for k in row if k not in SUMMARY_COLUMNS]
    return pd.DataFrame([row], columns=[*SUMMARY_COLUMNS, *extra])


def print_eval(result: EvalResult, title: str | None = None, con: Console | None = None) -> None:
    """Print the summary (one metric or setting per row, so it fits a terminal) and per-class tables."""
    row = summary_frame(result).iloc[0]
    keep = [k for k in row.index if k in METRIC_COLUMNS or (row[k] is not None and not pd.isna(row[k]))]
    values = [f"{float(row[k]):.2f} %" if k in METRIC_COLUMNS else row[k] for k in keep]
    shown = pd.DataFrame({"": keep, "value": pd.Series(values, dtype=object)})
    print_table(shown, title=title, con=con)
    print_table(result.per_class, title="per class (IoU and Acc in %)", con=con)


def write_eval(result: EvalResult, out_dir: Path, class_names: Sequence[str]) -> list[Path]:
    """Write ``summary.{csv,md}``, ``per_class.{csv,md}`` and ``confusion.csv`` atomically.

    ``confusion.csv`` is labelled with ``class_names``: rows are ground truth, columns
    predictions, the corner cell reads ``gt\\pred``.
    """
    out_dir = Path(out_dir)
    k = result.confusion.shape[0]
    names = [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}-class confusion matrix")
    per_class = result.per_class.copy()
    per_class["class"] = names
    confusion = pd.DataFrame(result.confusion.cpu().numpy(), index=names, columns=names)
    confusion.index.name = "gt\\pred"
    paths = save_table(summary_frame(result), out_dir / "summary")
    paths += save_table(per_class, out_dir / "per_class")
    paths.append(write_text(out_dir / "confusion.csv", confusion.to_csv()))
    return paths


def run_dir_of(path: str | os.PathLike) -> Path:
    """The run directory for a run dir or checkpoint path.

    A checkpoint inside ``runs/x/checkpoints/`` belongs to ``runs/x``; a checkpoint file
    anywhere else is treated as its own folder's run.
    """
    path = Path(path)
    if path.is_dir():
        return path
    if path.parent.name == CKPT_DIR:
        return path.parent.parent
    return path.parent


def load_for_eval(
    path: str | os.PathLike,
    overrides: list[str],
    iters: int | None = None,
    device: str = "auto",
    settings: Mapping[str, Any] | None = None,
) -> tuple[LoadedRun, EvalConfig, torch.device]:
    """Load a run or checkpoint for inference: model on the device, eval settings, EM iterations.

    ``settings`` replace fields of the recipe's ``eval`` section after ``overrides``, e.g.
    ``{"mode": "slide", "flip": True}`` from ``emactl eval --mode slide --flip``.
    EM iterations at test time: ``iters``, else the recipe's ``eval.iters``, else the model's
    own ``model.ema.eval_iters`` / ``model.ema.iters``.
    """
    dev = resolve_device(device)
    run = load_model(path, overrides, map_location=str(dev))
    if settings:
        run.recipe.eval = dataclasses.replace(run.recipe.eval, **settings)
        validate(run.recipe, "command line")
    cfg = resolve_eval_config(run.recipe)
    units = ema_units(run.model)
    if iters is not None:
        if iters <= 0:
            raise UserError(f"--iters: must be > 0, got {iters}")
        if not units:
            raise UserError(f"--iters: model.head={run.recipe.model.head!r} has no EMA unit to iterate")
    em_iters = iters if iters is not None else cfg.iters
    if em_iters is not None and units:
        set_eval_iters(run.model, em_iters)
    run.model.eval()
    return run, cfg, dev


def evaluate_run(
    path: str | os.PathLike,
    overrides: list[str],
    iters: int | None = None,
    out_dir: Path | None = None,
    device: str = "auto",
    progress: bool = True,
    settings: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Evaluate a run directory (its newest checkpoint) or a checkpoint file on its val split.

    The recipe stored in the checkpoint, adjusted by ``overrides`` and then ``settings`` (values
    of ``eval`` fields), gives the dataset and the eval settings; see :func:`load_for_eval` for the EM iterations. Results go to ``out_dir``
    or ``<run_dir>/eval/`` together with the resolved recipe, and are printed as tables.
    """
    own_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_initialized()
    if own_group:  # started by torchrun: join the group so the confusion matrix is all-reduced
        device = str(init_distributed(device).device)
    try:
        return _evaluate_run(path, overrides, iters, out_dir, device, progress, settings)
    finally:
        if own_group:
            cleanup()


def _evaluate_run(
    path: str | os.PathLike,
    overrides: list[str],
    iters: int | None,
    out_dir: Path | None,
    device: str,
    progress: bool,
    settings: Mapping[str, Any] | None,
) -> EvalResult:
    resolve_checkpoint(path)  # a missing run is refused before any folder is made for it
    main = _rank_world()[0] == 0
    target = Path(out_dir) if out_dir is not None else run_dir_of(path) / EVAL_DIR
    with contextlib.ExitStack() as stack:
        if main:  # refuse an output that cannot be written, or a run in use, before the work
            ensure_dir(target, "--out")
            if out_dir is None:
                stack.enter_context(folder_lock(
                    run_dir_of(path), "emactl eval", "wait for it to finish, or pass --out DIR"))
        return _evaluate_into(path, overrides, iters, target, device, progress, settings,
                              per_setting=out_dir is None)


def _evaluate_into(
    path: str | os.PathLike,
    overrides: list[str],
    iters: int | None,
    target: Path,
    device: str,
    progress: bool,
    settings: Mapping[str, Any] | None = None,
    per_setting: bool = False,
) -> EvalResult:
    run, cfg, dev = load_for_eval(path, overrides, iters, device, settings)
    recipe = run.recipe
    dataset = build_dataset(recipe.data, recipe.data.val_split, train=False)
    if dataset.num_classes != recipe.data.num_classes:
        raise UserError(
            f"{run.checkpoint}: the model predicts {recipe.data.num_classes} classes but dataset "
            f"{recipe.data.name!r} has {dataset.num_classes}"
        )
    if len(dataset) == 0:
        raise UserError(f"dataset {recipe.data.name!r} split {recipe.data.val_split!r} holds no images")
    result = evaluate(
        run.model,
        dataset,
        cfg,
        dataset.num_classes,
        dataset.ignore_index,
        dev,
        progress=progress,
        workers=recipe.data.workers,
    )
    result.meta.update(eval_meta(cfg, recipe.data.val_split, run.model, run.iteration,
                                 in_run(Path(run.checkpoint), run_dir_of(path))))

    if _rank_world()[0] == 0:
        if per_setting:  # emactl eval: one folder per setting, beside training's own eval/
            target = target / result.meta["setting"]
        names = [str(n) for n in result.per_class["class"]]
        paths = write_eval(result, target, names)
        paths.append(write_text(target / "recipe.yaml", dump_yaml(recipe)))
        print_eval(result, title=f"{recipe.name}: {describe_setting(summary_frame(result).iloc[0].to_dict())}")
        Console(stderr=True, soft_wrap=True).print(f"wrote {describe_paths(paths)}", markup=False, highlight=False)
    return result
