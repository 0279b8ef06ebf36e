"""``emactl import``: EMANet weights trained by the original code or by mmsegmentation.

Each source is described by what its code builds, written out here as emactl settings, and by
a table that renames its state-dict keys to emactl's. The importer reads the file safely
(``weights_only=True``), checks that it is an EMANet of that source, derives the depth, the
number of classes and the head's options from the tensors themselves, builds the matching
emactl network, loads the renamed weights *strictly*, and writes a run directory that
``eval``, ``predict``, ``visualize`` and ``ablate --from`` accept like a trained run.

**original** (github.com/XiaLiPKU/EMANet): ``{"net": state_dict, "step": N}`` with keys
``extractor.{0,1,4,5,6,7}.*`` (deep stem, its BN, layers 1–4), ``fc0`` (3×3 2048→512),
``emau.{mu,conv1,conv2.0,conv2.1}``, ``fc1.0`` (3×3 512→256) and ``fc2`` (classifier). Its
network: deep stem, output stride 8 with multi-grid (1, 2, 4), ``align_corners=True``
upsampling; inputs normalised as ``(x/255 − MEAN) / MEAN`` (the ImageNet mean used twice, a
quirk its weights depend on), evaluated whole, zero-padded to 8k+1; bases update
``mu ← 0.9·mu + 0.1·mean_b(mu_T)`` without renormalisation.

**mmseg** (mmsegmentation's ``EMAHead`` on ``ResNetV1c``): ``{"meta": ..., "state_dict": ...}``
with keys ``backbone.*``, ``decode_head.{ema_in_conv, ema_mid_conv, ema_module.bases,
ema_out_conv, bottleneck, conv_cat, conv_seg}`` and ``auxiliary_head.{convs.0, conv_seg}``.
Its network: V1c stem, output stride 8 without multi-grid, ``concat_input``, an FCN auxiliary
head, ImageNet mean/std on RGB; bases update: the batch mean is L2-normalised, then mixed in
with weight 0.1. ``align_corners`` and the test mode (whole, or 769² sliding windows with
stride 513) follow the config text stored in the checkpoint's ``meta`` when there is one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataConfig,
    EMAConfig,
    EvalConfig,
    ModelConfig,
    Recipe,
    TrainConfig,
    apply_overrides,
    from_dict,
    to_dict,
)
from .engine.checkpoint import checkpoint_path, save_checkpoint
from .engine.rundir import capture_env, write_env, write_recipe
from .errors import UserError
from .io import load_torch, write_json
from .nn.backbone import DEPTHS
from .nn.weights import strict_load
from .nn.emanet import build_model

SOURCES = ("original", "mmseg")

# The dataset a class count most likely belongs to; `--set data.name=...` overrides it.
DATASET_BY_CLASSES = {21: "voc_aug", 19: "cityscapes", 59: "context", 60: "context60", 150: "ade20k", 171: "cocostuff"}


def original_model(depth: int = 101, num_bases: int = 64, channels: int = 512, mid: int = 256) -> ModelConfig:
    """The network of the original EMANet code (``network.py`` and ``settings.py``)."""
    return ModelConfig(
        backbone=f"resnet{depth}_deep",
        output_stride=8,
        multi_grid=[1, 2, 4],
        head="ema",
        head_channels=channels,
        mid_channels=mid,
        align_corners=True,
        dropout=0.1,
        aux=False,
        bn_momentum=3e-4,
        ema=EMAConfig(bases=num_bases, iters=3, norm="l2", grad="none", bases_update="moving_average",
                      momentum=0.9, renorm=False),
    )


def mmseg_model(depth: int = 50, num_bases: int = 64, channels: int = 512, mid: int = 256,
                concat_input: bool = True, aux: bool = True, align_corners: bool = False, iters: int = 3) -> ModelConfig:
    """The network of mmseg's ``emanet_r{50,101}-d8`` configs (``EMAHead`` on ``ResNetV1c``)."""
    return ModelConfig(
        backbone=f"resnet{depth}_v1c",
        output_stride=8,
        head="ema",
        head_channels=channels,
        mid_channels=mid,
        concat_input=concat_input,
        align_corners=align_corners,
        dropout=0.1,
        aux=aux,
        aux_weight=0.4,
        bn_momentum=0.1,
        ema=EMAConfig(bases=num_bases, iters=iters, norm="l2", grad="none", bases_update="normed_moving_average",
                      momentum=0.9, renorm=False),
    )


@dataclass
class Converted:
    """A source checkpoint turned into emactl terms."""

    state: dict[str, Tensor]  # emactl keys
    recipe: Recipe
    iteration: int
    notes: dict[str, Any] = field(default_factory=dict)


def _rename(state: dict[str, Tensor], table: dict[str, str], source: str, where: str) -> dict[str, Tensor]:
    """Rename keys by their longest matching prefix in ``table``; a key matching none is refused."""
    prefixes = sorted(table, key=len, reverse=True)
    out, unknown = {}, []
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                out[table[prefix] + key[len(prefix):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise UserError(
            f"{where}: {len(unknown)} keys of no known {source} EMANet module (e.g. {unknown[:3]}); "
            f"is this an EMANet checkpoint of the {source} code?"
        )
    return out


def _depth(state: dict[str, Tensor], layer3: str, where: str) -> int:
    blocks = {int(m.group(1)) for k in state if (m := re.match(re.escape(layer3) + r"(\d+)\.", k))}
    count = max(blocks) + 1 if blocks else 0
    for depth, layers in DEPTHS.items():
        if layers[2] == count:
            return depth
    raise UserError(f"{where}: layer 3 has {count} blocks; expected 6, 23 or 36 (ResNet-50, 101 or 152)")


def _tensor(state: dict[str, Tensor], key: str, where: str, source: str) -> Tensor:
    if key not in state:
        raise UserError(f"{where}: no {key!r}: not an EMANet checkpoint of the {source} code")
    return state[key]


def _find_state(obj: Any) -> dict[str, Tensor] | None:
    """The state dict inside a checkpoint (under ``net``, ``state_dict`` or ``model``, or the
    object itself), with DataParallel's ``module.`` prefix dropped; None when there is none."""
    if not isinstance(obj, dict):
        return None
    for inner in (obj.get("net"), obj.get("state_dict"), obj.get("model"), obj):
        if isinstance(inner, dict) and inner and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in inner.items()):
            return {k.removeprefix("module."): v for k, v in inner.items()}
    return None


def _layout(obj: Any, state: dict[str, Tensor] | None) -> str | None:
    """Which code wrote a checkpoint: ``original``, ``mmseg``, ``emactl`` or None."""
    if isinstance(obj, dict) and "recipe" in obj and "model" in obj:
        return "emactl"
    if state is None:
        return None
    if any(k.startswith(("emau.", "extractor.")) for k in state):
        return "original"
    if any(k.startswith(("decode_head.", "auxiliary_head.")) for k in state):
        return "mmseg"
    return None


def _source_state(obj: Any, source: str, where: str, expected: str) -> dict[str, Tensor]:
    """The state dict of a ``source`` checkpoint, or one line saying what the file is instead."""
    state = _find_state(obj)
    layout = _layout(obj, state)
    if layout == source and state is not None:
        return state
    if layout in SOURCES:
        raise UserError(f"{where}: this is an {layout} checkpoint, not an {source} one; use `emactl import {layout}`")
    if layout == "emactl":
        raise UserError(f"{where}: this is an emactl checkpoint; use it directly (emactl eval/predict)")
    found = sorted(map(str, obj))[:6] if isinstance(obj, dict) else type(obj).__name__
    raise UserError(f"{where}: unknown checkpoint layout (top-level {found}); expected {expected}")


# --------------------------------------------------------------------------------------------
# The original EMANet code.

ORIGINAL_KEYS = {
    "extractor.0.": "backbone.stem.0.",
    "extractor.1.": "backbone.stem.1.",
    "extractor.4.": "backbone.layer1.",
    "extractor.5.": "backbone.layer2.",
    "extractor.6.": "backbone.layer3.",
    "extractor.7.": "backbone.layer4.",
    "fc0.conv.": "head.reduce.0.",
    "fc0.bn.": "head.reduce.1.",
    "emau.mu": "head.context.mu",
    "emau.conv1.": "head.context.conv1.",
    "emau.conv2.0.": "head.context.conv2.",
    "emau.conv2.1.": "head.context.bn.",
    "fc1.0.conv.": "head.project.0.",
    "fc1.0.bn.": "head.project.1.",
    "fc2.": "head.classifier.",
}


def original_recipe(name: str, num_classes: int, model: ModelConfig) -> Recipe:
    """The original code's training and inference settings (``settings.py``, ``dataset.py``)."""
    return Recipe(
        name=name,
        data=DataConfig(name=DATASET_BY_CLASSES.get(num_classes, "folder"),
                        train_split="trainaug" if num_classes == 21 else "train", val_split="val",
                        num_classes=num_classes, crop_size=513, scale_min=0.5, scale_max=2.0,
                        mean=list(IMAGENET_MEAN), std=list(IMAGENET_MEAN)),
        model=model,
        train=TrainConfig(iters=30000, batch_size=16, lr=9e-3, momentum=0.9, weight_decay=1e-4, bias_lr_mult=2.0,
                          poly_power=0.9, ckpt_every=2000),
        eval=EvalConfig(mode="whole", scales=[1.0], flip=False, pad_multiple=8),
    )


def convert_original(obj: Any, name: str, where: str) -> Converted:
    state = _source_state(obj, "original", where,
                          "{'net': state_dict, 'step': N} with keys extractor.*, fc0.*, emau.*, fc1.*, fc2.*")
    mu = _tensor(state, "emau.mu", where, "original")
    classifier = _tensor(state, "fc2.weight", where, "original")
    project = _tensor(state, "fc1.0.conv.weight", where, "original")
    model = original_model(_depth(state, "extractor.6.", where), num_bases=mu.shape[-1], channels=mu.shape[1],
                           mid=project.shape[0])
    recipe = original_recipe(name, classifier.shape[0], model)
    step = obj.get("step", 0) if isinstance(obj, dict) else 0
    return Converted(_rename(state, ORIGINAL_KEYS, "original", where), recipe, int(step) if isinstance(step, int) else 0)


# --------------------------------------------------------------------------------------------
# mmsegmentation.

MMSEG_KEYS = {
    "backbone.": "backbone.",
    "decode_head.ema_in_conv.conv.": "head.reduce.0.",
    "decode_head.ema_in_conv.bn.": "head.reduce.1.",
    "decode_head.ema_mid_conv.conv.": "head.context.conv1.",
    "decode_head.ema_module.bases": "head.context.mu",
    "decode_head.ema_out_conv.conv.": "head.context.conv2.",
    "decode_head.ema_out_conv.bn.": "head.context.bn.",
    "decode_head.bottleneck.conv.": "head.project.0.",
    "decode_head.bottleneck.bn.": "head.project.1.",
    "decode_head.conv_cat.conv.": "head.concat.0.",
    "decode_head.conv_cat.bn.": "head.concat.1.",
    "decode_head.conv_seg.": "head.classifier.",
    "auxiliary_head.convs.0.conv.": "aux.block.0.",
    "auxiliary_head.convs.0.bn.": "aux.block.1.",
    "auxiliary_head.conv_seg.": "aux.classifier.",
}


def _config_text(obj: Any) -> str:
    meta = obj.get("meta") if isinstance(obj, dict) else None
    text = meta.get("config") if isinstance(meta, dict) else None
    return text if isinstance(text, str) else ""


def _mmseg_eval(config: str) -> tuple[bool, EvalConfig]:
    """``align_corners`` and the test mode from the config text stored in ``meta`` (if any)."""
    corners = bool(re.search(r"align_corners\s*=\s*True", config))
    if re.search(r"mode\s*=\s*['\"]slide['\"]", config):
        crop = re.search(r"crop_size\s*=\s*\((\d+),\s*(\d+)\)", config[config.find("test_cfg"):] if "test_cfg" in config else config)
        stride = re.search(r"stride\s*=\s*\((\d+),\s*(\d+)\)", config)
        if crop and stride and crop.group(1) == crop.group(2) and stride.group(1) == stride.group(2):
            return corners, EvalConfig(mode="slide", crop_size=int(crop.group(1)), stride=int(stride.group(1)))
    return corners, EvalConfig(mode="whole")


def mmseg_recipe(name: str, num_classes: int, model: ModelConfig, evaluation: EvalConfig) -> Recipe:
    """mmseg's Cityscapes EMANet schedule (80k iterations, 4 GPUs × 2 images, lr 0.01)."""
    crop = evaluation.crop_size or 769
    return Recipe(
        name=name,
        data=DataConfig(name=DATASET_BY_CLASSES.get(num_classes, "folder"), num_classes=num_classes, crop_size=crop,
                        scale_min=0.5, scale_max=2.0, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
        model=model,
        train=TrainConfig(iters=80000, batch_size=8, lr=0.01, momentum=0.9, weight_decay=5e-4, bias_lr_mult=1.0,
                          poly_power=0.9, ckpt_every=8000),
        eval=evaluation,
    )


def convert_mmseg(obj: Any, name: str, where: str) -> Converted:
    state = _source_state(obj, "mmseg", where,
                          "{'meta': ..., 'state_dict': ...} with keys backbone.*, decode_head.*, auxiliary_head.*")
    state = {k: v for k, v in state.items() if not k.startswith("data_preprocessor.")}
    if "decode_head.ema_module.bases" not in state:
        heads = sorted({k.split(".")[1] for k in state if k.startswith("decode_head.")})
        raise UserError(
            f"{where}: an mmseg checkpoint of another head (decode_head holds {heads[:5]}); "
            "emactl imports EMANet (EMAHead) checkpoints only"
        )
    if "backbone.stem.0.weight" not in state:
        raise UserError(f"{where}: the backbone is not mmseg's ResNetV1c (no backbone.stem.0.weight); emactl imports EMAHead on ResNetV1c")
    bases = state["decode_head.ema_module.bases"]
    config = _config_text(obj)
    corners, evaluation = _mmseg_eval(config)
    stages = re.search(r"num_stages\s*=\s*(\d+)", config)
    model = mmseg_model(
        _depth(state, "backbone.layer3.", where),
        num_bases=bases.shape[-1],
        channels=bases.shape[1],
        mid=_tensor(state, "decode_head.bottleneck.conv.weight", where, "mmseg").shape[0],
        concat_input="decode_head.conv_cat.conv.weight" in state,
        aux="auxiliary_head.conv_seg.weight" in state,
        align_corners=corners,
        iters=int(stages.group(1)) if stages else 3,
    )
    recipe = mmseg_recipe(name, _tensor(state, "decode_head.conv_seg.weight", where, "mmseg").shape[0], model, evaluation)
    meta = obj.get("meta", {}) if isinstance(obj, dict) else {}
    classes = meta.get("CLASSES") or meta.get("classes") if isinstance(meta, dict) else None
    if isinstance(classes, (list, tuple)) and len(classes) == recipe.data.num_classes and all(isinstance(c, str) for c in classes):
        recipe.data.class_names = list(classes)
    iteration = meta.get("iter", 0) if isinstance(meta, dict) else 0
    notes = {"align_corners_from": "meta.config" if config else "default (no config text in meta)"}
    return Converted(_rename(state, MMSEG_KEYS, "mmseg", where), recipe, int(iteration) if isinstance(iteration, int) else 0, notes)


CONVERTERS: dict[str, Callable[[Any, str, str], Converted]] = {"original": convert_original, "mmseg": convert_mmseg}


# --------------------------------------------------------------------------------------------
# The run directory.


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _apply_overrides(recipe: Recipe, overrides: list[str], where: str) -> Recipe:
    """``--set`` overrides on the imported recipe; the class count stays the checkpoint's."""
    data = apply_overrides(to_dict(recipe), overrides)
    new = from_dict(data, source="--set")
    if new.data.num_classes != recipe.data.num_classes:
        raise UserError(
            f"--set data.num_classes={new.data.num_classes}: {where} predicts {recipe.data.num_classes} classes; "
            "drop the override (the class count comes from the checkpoint)"
        )
    return new


def import_checkpoint(
    source: str, path: str | Path, name: str, out_dir: str | Path = "runs", overrides: list[str] | None = None
) -> Path:
    """Convert a checkpoint of ``source`` into ``<out_dir>/<name>/``; return the run directory."""
    if source not in CONVERTERS:
        raise UserError(f"source: got {source!r}; choose one of: {', '.join(SOURCES)}")
    path = Path(path)
    run_dir = Path(out_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir}: already exists and is not empty; choose another --name or --out")
    converted = CONVERTERS[source](load_torch(path), name, str(path))
    recipe = _apply_overrides(converted.recipe, overrides or [], str(path))
    recipe = dataclasses.replace(recipe, name=name, out_dir=str(out_dir))
    model = build_model(recipe.model, recipe.data.num_classes)
    strict_load(model, converted.state, f"{path}: does not fit the network of its recipe",
                "the --set overrides must not change the network's shape")
    state = model.state_dict()
    iteration = converted.iteration
    save_checkpoint(checkpoint_path(run_dir, iteration), {"model": state, "recipe": to_dict(recipe), "iteration": iteration})
    write_recipe(run_dir, recipe)
    write_env(run_dir, capture_env(torch.device("cpu"), 1, "none"))
    write_json(run_dir / "import.json", {
        "source": source, "file": str(path.resolve()), "sha256": _sha256(path),
        "tensors": len(converted.state), "iteration": iteration, **converted.notes,
    })
    return run_dir
