"""Checkpoints: atomic saves, safe loads, and rebuilding a model from a run or a file.

A checkpoint is a dict saved with :func:`torch.save` and loaded with ``weights_only=True``::

    {"model": state_dict, "recipe": plain-dict recipe, "iteration": int, ...training state}

Run directories keep them in ``runs/<name>/checkpoints/iter_0001000.pt``; the newest is the
one with the highest iteration.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from ..config import Recipe, to_dict, with_overrides
from ..errors import UserError
from ..io import load_torch, save_torch
from ..nn.weights import strict_load
from ..nn.emanet import build_model

CKPT_DIR = "checkpoints"
_CKPT_RE = re.compile(r"iter_(\d+)\.pt$")


def checkpoint_path(run_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"iter_{iteration:07d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CKPT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _CKPT_RE.search(p.name)]
    return sorted(found, key=lambda p: int(_CKPT_RE.search(p.name).group(1)))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints.

    The trainer calls it only right after saving a checkpoint it checked to be finite (see
    :func:`first_non_finite`), so the newest checkpoint, which is always kept, is a good one.
    """
    for old in list_checkpoints(run_dir)[:-max(1, keep)]:
        old.unlink(missing_ok=True)


def first_non_finite(tensors: Any, prefix: str = "") -> str | None:
    """The name of the first floating-point tensor in a (nested) state holding NaN or inf."""
    if isinstance(tensors, torch.Tensor):
        if tensors.is_floating_point() or tensors.is_complex():
            return None if bool(torch.isfinite(tensors).all()) else (prefix or "tensor")
        return None
    if isinstance(tensors, dict):
        items: Any = tensors.items()
    elif isinstance(tensors, (list, tuple)):
        items = enumerate(tensors)
    else:
        return None
    for key, value in items:
        found = first_non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Save atomically: a kill at any moment leaves either the old file or the new one."""
    return save_torch(state, path)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file as given, or the newest checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise UserError(f"{path}: run directory holds no checkpoints in {CKPT_DIR}/; train first")
        return ckpt
    if not path.exists():
        raise UserError(f"{path}: no such run directory or checkpoint file")
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "recipe" not in ckpt:
        raise UserError(f"{path}: not an emactl checkpoint (expected keys 'model' and 'recipe')")
    return ckpt


def _warn(message: str) -> None:
    Console(stderr=True, soft_wrap=True).print(f"warning: {message}", markup=False, highlight=False)


def load_newest(run_dir: str | os.PathLike, set_aside: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of a run that loads, and its contents; None if it has none.

    A newest checkpoint that cannot be loaded (truncated, corrupt, not an emactl checkpoint)
    does not block the run: the previous intact one is used, with a warning naming the bad
    file and saying to remove it. ``set_aside`` (for ``--resume``, which will write newer
    checkpoints) renames bad files to ``*.corrupt`` instead, so they are kept but no longer
    taken for the newest. If none loads, the UserError names the newest and the fix.
    """
    ckpts = list_checkpoints(run_dir)
    bad: list[tuple[Path, str]] = []
    for path in reversed(ckpts):
        try:
            ckpt = load_checkpoint(path)
        except UserError as e:
            bad.append((path, str(e)))
            continue
        if bad:
            names = ", ".join(p.name for p, _ in bad)
            if set_aside:
                for p, _ in bad:
                    p.rename(p.with_name(p.name + ".corrupt"))
                action = f"renamed {names} to *.corrupt"
            else:
                action = f"remove {names} to silence this"
            _warn(f"{bad[0][1]}; using {path} instead ({action})")
        return path, ckpt
    if bad:
        others = f" (and {len(bad) - 1} older ones)" if len(bad) > 1 else ""
        raise UserError(
            f"{bad[0][1]}{others}; no checkpoint of {run_dir} loads: remove them, or train afresh with another --name"
        )
    return None


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` that explains an incompatible checkpoint in one line."""
    strict_load(model, state, f"{source}: incompatible checkpoint",
                "the recipe's model settings must match the ones it was trained with")


@dataclass
class LoadedRun:
    recipe: Recipe
    model: nn.Module
    checkpoint: Path
    iteration: int


def load_model(path: str | os.PathLike, overrides: list[str] | None = None, map_location: str = "cpu") -> LoadedRun:
    """Rebuild the model of a run directory or checkpoint file and load its weights.

    The recipe comes from the checkpoint itself; ``overrides`` (``a.b=v``) adjust it, e.g. the
    eval settings. ``model.pretrained`` is dropped: the checkpoint holds all the weights.
    """
    found = load_newest(path) if Path(path).is_dir() else None
    if found is not None:
        ckpt_path, ckpt = found
    else:
        ckpt_path = resolve_checkpoint(path)
        ckpt = load_checkpoint(ckpt_path)
    recipe = with_overrides(ckpt["recipe"], [*(overrides or []), "model.pretrained=null"],
                            f"{ckpt_path} (stored recipe)")
    model = build_model(recipe.model, recipe.data.num_classes)
    load_state(model, ckpt["model"], str(ckpt_path))
    model.to(map_location)
    return LoadedRun(recipe, model, ckpt_path, int(ckpt.get("iteration", 0)))


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the underlying model (unwrapping DDP and torch.compile)."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    return inner.state_dict()


def recipe_state(recipe: Recipe) -> dict[str, Any]:
    return to_dict(recipe)


# --------------------------------------------------------------------------------------------
# Training state: RNG states in a form ``torch.load(weights_only=True)`` accepts.


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The RNG states of this process as tensors, ints and floats (no numpy, no tuples of objects).

    Covers torch's CPU generator, the CUDA generator of ``device`` (when it is a CUDA device),
    Python's ``random`` and numpy's legacy global generator.
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what :func:`rng_state` captured (the CUDA state only onto a CUDA ``device``)."""
    torch.set_rng_state(state["torch"].cpu())
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
