"""Tiny runs for the tests: one recipe (the tiny backbone on the synthetic ``shapes`` set) and
one way to write a run directory holding a checkpoint of it.

Each test module states only how its run differs from :data:`TINY`, as ``--set``-style
overrides; the shared session fixtures built on these are in ``conftest.py``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from emactl.config import apply_overrides, from_dict, to_dict
from emactl.engine.checkpoint import checkpoint_path, save_checkpoint
from emactl.nn.emanet import build_model

# The smallest recipe every end-to-end test starts from: 32 px crops, 16 channels, 4 bases.
TINY: dict[str, Any] = {
    "name": "tiny",
    "data": {"name": "shapes", "num_classes": 7, "workers": 0, "crop_size": 32},
    "model": {"backbone": "tiny", "head_channels": 16, "mid_channels": 16, "pretrained": None,
              "ema": {"bases": 4}},
}

# What a few-iteration CPU training adds to it (the trainer's own tests, the loggers, the losses).
TRAIN = (
    "name=t",
    "data.scale_min=0.75", "data.scale_max=1.25", "data.args.size=40", "data.args.train_length=12",
    "data.args.val_length=2", "model.ema.bases=8",
    "train.iters=6", "train.batch_size=4", "train.lr=0.01", "train.warmup_iters=2", "train.ckpt_every=3",
    "train.keep_ckpts=5", "train.log_every=1", "train.val_every=0", "train.device=cpu",
    "eval.batch_size=2",
)

# What a sweep cell adds to it: one-iteration steps with a checkpoint each (ablate, the README).
SWEEP = (
    "data.flip=false", "data.args.size=32", "data.args.train_length=8", "model.ema.iters=2",
    "train.batch_size=2", "train.ckpt_every=1", "train.log_every=1", "train.warmup_iters=0", "train.lr=0.01",
)


def tiny_recipe(*overrides: str) -> dict[str, Any]:
    """:data:`TINY` with ``a.b=value`` overrides applied (a new dict each call)."""
    return apply_overrides(TINY, list(overrides))


def write_run(root: Path, recipe: dict[str, Any], iteration: int,
              prepare: Callable[[nn.Module], None] | None = None) -> Path:
    """A run directory ``root`` holding one checkpoint (at ``iteration``) of an untrained model
    of ``recipe``; ``prepare`` may change the model's weights first."""
    cfg = from_dict(recipe)
    model = build_model(cfg.model, cfg.data.num_classes)
    if prepare is not None:
        prepare(model)
    save_checkpoint(checkpoint_path(root, iteration),
                    {"model": model.state_dict(), "recipe": to_dict(cfg), "iteration": iteration})
    return root


def randomise(model: nn.Module, seed: int, convs: bool = False) -> nn.Module:
    """BN statistics and affine terms away from (0, 1), so that folding or loading them matters;
    with ``convs`` random conv weights too, so that every tensor of a checkpoint matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            elif convs and isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def train_dict(tmp_path: Path, *overrides: str) -> dict[str, Any]:
    """The training recipe (:data:`TINY` + :data:`TRAIN`) writing its runs under ``tmp_path/runs``."""
    return tiny_recipe(*TRAIN, f"out_dir={tmp_path / 'runs'}", *overrides)


def make_recipe(tmp_path: Path, *overrides: str):
    """The training recipe as a :class:`~emactl.config.Recipe`."""
    return from_dict(train_dict(tmp_path, *overrides))


def write_recipe_file(tmp_path: Path, *overrides: str) -> Path:
    """The training recipe as ``tmp_path/recipe.yaml``."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(train_dict(tmp_path, *overrides)))
    return path
