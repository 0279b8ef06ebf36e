"""Recipes: typed dataclasses, YAML loading, dotted overrides and validation.

A recipe is a YAML file whose keys mirror :class:`Recipe`. Every key is optional; missing keys
take the defaults below. Unknown keys, wrong types and bad choices raise :class:`UserError`
naming the dotted key path, which the CLI prints as one line with exit code 2.

Overrides use dotted paths with YAML-typed values: ``--set model.ema.iters=5``,
``--set eval.scales=[0.5,1.0,1.5]``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from .errors import UserError
from .nn.choices import BASES_UPDATES, GRAD_MODES, NORMS

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class EMAConfig:
    """The EMA unit. ``momentum`` is the weight on the *old* bases (0.9 as in the paper).

    Every field is a keyword argument of :class:`emactl.nn.ema.EMAU` of the same name; the
    choices come from :mod:`emactl.nn.choices`."""

    bases: int = 64
    iters: int = 3
    eval_iters: int | None = None
    temperature: float = 1.0
    norm: Literal[NORMS] = "l2"
    grad: Literal[GRAD_MODES] = "none"
    bases_update: Literal[BASES_UPDATES] = "moving_average"
    momentum: float = 0.9
    renorm: bool = True
    zero_init: bool = False
    fold: bool = True  # fold the unit's first 1x1 conv into the EM products (same result, less work)


@dataclass
class ModelConfig:
    """The network. ``backbone`` picks the ResNet and its stem (``resnet101``: torchvision's 7×7,
    ``resnet101_deep``: the original EMANet's, ``resnet101_v1c``: mmseg's); ``multi_grid`` sets
    layer 4's per-block rates as the original code does; ``concat_input`` adds mmseg's 3×3 conv
    over [layer-4 features, head output] before the classifier; ``align_corners`` is used by
    the final bilinear upsampling (the original code: true)."""

    name: str = "emanet"
    backbone: str = "resnet101"
    output_stride: Literal[8, 16, 32] = 8
    multi_grid: list[int] | None = None
    pretrained: str | None = None
    head: str = "ema"
    head_channels: int = 512
    mid_channels: int = 256
    concat_input: bool = False
    align_corners: bool = False
    dropout: float = 0.1
    aux: bool = False
    aux_weight: float = 0.4
    bn_momentum: float = 0.1
    ema: EMAConfig = field(default_factory=EMAConfig)


@dataclass
class DataConfig:
    """Where the data lives and how it is augmented.

    ``args`` holds dataset-specific keyword arguments (validated by the dataset itself).
    An empty ``root`` falls back to the environment variable ``EMACTL_DATA``.
    """

    name: str = "shapes"
    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int = 21
    ignore_index: int = 255
    class_names: list[str] | None = None
    crop_size: int = 513
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: bool = True
    jitter: float = 0.0
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    workers: int = 2
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Optimisation. ``batch_size`` is the global batch, split across ranks and accumulation."""

    iters: int = 30000
    batch_size: int = 16
    lr: float = 9e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bias_lr_mult: float = 2.0
    head_lr_mult: float = 1.0
    poly_power: float = 0.9
    warmup_iters: int = 0
    warmup_factor: float = 0.1
    amp: Literal["none", "bf16", "fp16"] = "none"
    accum_steps: int = 1
    sync_bn: bool = True
    channels_last: bool = False
    cudnn_benchmark: bool = True  # cuDNN times its algorithms for the fixed crop; not during validation
    compile: bool = False
    ckpt_every: int = 1000
    keep_ckpts: int = 3
    val_every: int = 0
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    # The loss (emactl.engine.losses): ce, weighted_ce (needs class_weights) or ohem, whose
    # min_kept counts the pixels of the whole micro-batch over all ranks (mmseg: per GPU).
    loss: Literal["ce", "ohem", "weighted_ce"] = "ce"
    class_weights: list[float] | Literal["frequency"] | None = None
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100000
    # Experiment loggers (emactl.engine.loggers); metrics.jsonl is always written.
    loggers: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["jsonl"])
    wandb_project: str = "emactl"
    wandb_mode: Literal["offline", "online"] = "offline"
    mlflow_tracking_uri: str = ""  # empty: a SQLite store, <run_dir>/mlflow.db


@dataclass
class EvalConfig:
    """Inference. ``mode`` is ``whole`` or ``slide``; ``scales`` and ``flip`` add multi-scale.

    ``pad_multiple`` (the original EMANet evaluation: 8) zero-pads each view at the bottom and
    right, in normalised space, to a height and width of ``pad_multiple · k + 1``, and crops
    the logits back to the view's size.
    """

    mode: Literal["whole", "slide"] = "whole"
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    crop_size: int | None = None
    stride: int | None = None
    iters: int | None = None
    batch_size: int = 1
    pad_multiple: int | None = None


@dataclass
class LauncherConfig:
    """Where ``emactl ablate`` runs its train-side cells (``train`` and ``eval`` ignore it).

    ``local``: processes on this machine (``--jobs``); ``slurm``: one SLURM job per cell
    through submitit, on ``partition`` with ``gpus_per_cell`` GPUs (more than one: ``torchrun``
    inside the job), ``time_min`` minutes and ``account``. It is not part of a sweep's identity:
    the same sweep may be resumed on another partition or locally.
    """

    kind: Literal["local", "slurm"] = "local"
    partition: str | None = None
    gpus_per_cell: int = 1
    time_min: int = 1440
    account: str | None = None


@dataclass
class Recipe:
    name: str = "run"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


def choices(cls: type, name: str) -> tuple[Any, ...]:
    """The allowed values of a ``Literal`` recipe field, e.g. ``choices(EMAConfig, "norm")``."""
    tp = typing.get_type_hints(cls)[name]
    if get_origin(tp) is not Literal:
        raise TypeError(f"{cls.__name__}.{name} is not a Literal field")
    return get_args(tp)


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain dictionaries, with errors that name the dotted key.


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted."""

    def bad(allowed: str) -> UserError:
        return UserError(f"{source}: {key}: got {value!r}; expected {allowed}")

    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad(f"a mapping of {tp.__name__} keys")
        return _build(tp, value, key, source)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise UserError(
                f"{source}: {key}: got {value!r}; choose one of: "
                + ", ".join(str(c) for c in choices)
            )
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key, source)
            except UserError:
                continue
        raise bad(_type_name(tp))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad(_type_name(tp))
        (item,) = get_args(tp)
        return [_convert(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        # PyYAML (YAML 1.1) reads exponents without a dot, e.g. ``1e-3``, as strings.
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(value):  # YAML's .nan and .inf: no setting means anything with them
            raise bad("a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise UserError(f"{source}: unknown key {key!r}; allowed keys: {', '.join(names)}")
        kwargs[k] = _convert(v, hints[k], key, source)
    return cls(**kwargs)


def from_dict(data: dict, source: str = "recipe") -> Recipe:
    """Build and validate a :class:`Recipe` from a plain dictionary."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    recipe = _build(Recipe, data, "", source)
    validate(recipe, source)
    return recipe


def to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def _positive(source: str, **values: float) -> None:
    for key, v in values.items():
        if v is not None and v <= 0:
            raise UserError(f"{source}: {key.replace('__', '.')}: must be > 0, got {v}")


def validate(r: Recipe, source: str = "recipe") -> None:
    """Value checks that types alone cannot express."""
    e = r.model.ema
    _positive(
        source,
        model__ema__bases=e.bases,
        model__ema__iters=e.iters,
        model__ema__eval_iters=e.eval_iters,
        model__ema__temperature=e.temperature,
        model__head_channels=r.model.head_channels,
        model__mid_channels=r.model.mid_channels,
        data__num_classes=r.data.num_classes,
        data__crop_size=r.data.crop_size,
        data__scale_min=r.data.scale_min,
        train__iters=r.train.iters,
        train__batch_size=r.train.batch_size,
        train__lr=r.train.lr,
        train__accum_steps=r.train.accum_steps,
        train__ckpt_every=r.train.ckpt_every,
        train__keep_ckpts=r.train.keep_ckpts,
        train__log_every=r.train.log_every,
        eval__crop_size=r.eval.crop_size,
        eval__stride=r.eval.stride,
        eval__iters=r.eval.iters,
        eval__batch_size=r.eval.batch_size,
        eval__pad_multiple=r.eval.pad_multiple,
        launcher__time_min=r.launcher.time_min,
    )
    if r.launcher.gpus_per_cell < 0:
        raise UserError(f"{source}: launcher.gpus_per_cell: must be >= 0, got {r.launcher.gpus_per_cell}")
    if not 0.0 <= e.momentum <= 1.0:
        raise UserError(f"{source}: model.ema.momentum: must be in [0, 1], got {e.momentum}")
    if e.bases_update == "backprop" and e.grad != "full":
        raise UserError(
            f"{source}: model.ema.bases_update=backprop needs model.ema.grad=full "
            f"(got {e.grad!r}: no gradient would reach the bases)"
        )
    if r.model.multi_grid is not None and any(g < 1 for g in r.model.multi_grid):
        raise UserError(f"{source}: model.multi_grid: values must be >= 1, got {r.model.multi_grid}")
    if not 0.0 <= r.model.dropout < 1.0:
        raise UserError(f"{source}: model.dropout: must be in [0, 1), got {r.model.dropout}")
    if r.data.scale_max < r.data.scale_min:
        raise UserError(f"{source}: data.scale_max: must be >= data.scale_min")
    if len(r.data.mean) != 3 or len(r.data.std) != 3:
        raise UserError(f"{source}: data.mean and data.std need 3 values (RGB)")
    if any(s <= 0 for s in r.eval.scales) or not r.eval.scales:
        raise UserError(f"{source}: eval.scales: need a non-empty list of positive scales")
    if r.data.class_names is not None and len(r.data.class_names) != r.data.num_classes:
        raise UserError(
            f"{source}: data.class_names: {len(r.data.class_names)} names for "
            f"data.num_classes={r.data.num_classes}"
        )
    if r.train.batch_size % r.train.accum_steps:
        raise UserError(
            f"{source}: train.batch_size={r.train.batch_size} is not divisible by "
            f"train.accum_steps={r.train.accum_steps}"
        )
    if not 0.0 < r.train.ohem_thresh <= 1.0:
        raise UserError(f"{source}: train.ohem_thresh: must be in (0, 1], got {r.train.ohem_thresh}")
    if r.train.ohem_min_kept < 0:
        raise UserError(f"{source}: train.ohem_min_kept: must be >= 0")
    for key, value in (("train.warmup_iters", r.train.warmup_iters), ("train.val_every", r.train.val_every),
                       ("data.workers", r.data.workers), ("train.seed", r.train.seed)):
        if value < 0:
            raise UserError(f"{source}: {key}: must be >= 0, got {value}")
    if not r.name or "/" in r.name or "\\" in r.name or r.name in (".", ".."):
        raise UserError(f"{source}: name: got {r.name!r}; must be a folder name without '/', not '.' or '..'")


# --------------------------------------------------------------------------------------------
# Files and overrides.


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set model.ema.iters=5")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with every ``a.b.c=value`` override applied."""
    data = copy.deepcopy(data) if data else {}
    for item in overrides:
        path, value = parse_override(item)
        set_path(data, path, value, repr(item))
    return data


def set_path(data: dict, path: list[str], value: Any, what: str) -> None:
    """``data[a][b][c] = value`` for the path [a, b, c], making missing sections; ``what`` names
    the override in the error when a step of the path is a value, not a section."""
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {what}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _duplicate_key(node: yaml.Node) -> tuple[str, yaml.Mark] | None:
    """The first mapping key that appears twice in the same mapping of a composed YAML tree."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    return key.value, key.start_mark
                seen.add(key.value)
            found = _duplicate_key(value)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _duplicate_key(item)
            if found:
                return found
    return None


def read_yaml(path: str | os.PathLike) -> dict:
    """A recipe file's mapping, read with ``yaml.safe_load``; every problem is one UserError.

    A key given twice in one mapping is refused: YAML keeps the last silently, so an edit
    that adds a key already set further down would be ignored.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; expected a recipe YAML file, e.g. recipes/shapes.yaml")
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}, line {line}); save the recipe as UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read recipe ({e.strerror})") from None
    try:
        duplicate = _duplicate_key(yaml.compose(text, Loader=yaml.SafeLoader))
        if duplicate:
            key, mark = duplicate
            raise UserError(f"{path}: key {key!r} appears twice in one section (line {mark.line + 1}); keep one")
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    return data or {}


def with_overrides(data: dict, overrides: list[str], source: str) -> Recipe:
    """``data`` with ``overrides`` applied, as a Recipe; an error names whoever caused it.

    A mistake the file ``source`` has on its own is blamed on the file; one that comes with
    the overrides on the first ``--set KEY=VALUE`` that brings it in.
    """
    applied = apply_overrides(data, overrides)  # a malformed item already names its --set
    try:
        return from_dict(applied, source=source)
    except UserError as e:
        if not overrides:
            raise
        full = str(e)
    for n in range(len(overrides) + 1):
        try:
            from_dict(apply_overrides(data, overrides[:n]), source=source)
        except UserError as e:
            if str(e) == full:
                culprit = source if n == 0 else f"--set {overrides[n - 1]}"
                raise UserError(culprit + full[len(source):]) from None
    raise UserError(full)


def load_recipe(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file (or the defaults when ``path`` is None) and apply overrides.

    An error about a key that an override set names that ``--set`` item, not the file.
    """
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "recipe"
    if not isinstance(data, dict):
        return from_dict(data, source=source)  # raises: a recipe must be a mapping
    return with_overrides(data, overrides or [], source)


def dump_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)
