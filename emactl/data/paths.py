"""Finding dataset files: the data root, a dataset's directory, split lists, image/label pairs.

Every failure is a one-line :class:`UserError` that names the path emactl looked at.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..config import DataConfig
from ..errors import UserError

ENV_VAR = "EMACTL_DATA"
HOW_TO_SET = f"set it with --set data.root=/path/to/data or the {ENV_VAR} environment variable"


@dataclass(frozen=True)
class Item:
    """One sample on disk: its name, its image and its label map (None when unlabelled)."""

    name: str
    image: Path
    label: Path | None


@dataclass(frozen=True)
class MissingFile:
    """A listed or expected file that does not exist. ``kind`` is ``image`` or ``label``."""

    path: Path
    kind: str
    message: str


def resolve_root(cfg: DataConfig) -> Path:
    """The data root: ``cfg.root``, else ``$EMACTL_DATA``; it must be an existing directory."""
    if cfg.root:
        root, source = Path(cfg.root).expanduser(), "data.root"
    elif os.environ.get(ENV_VAR):
        root, source = Path(os.environ[ENV_VAR]).expanduser(), ENV_VAR
    else:
        raise UserError(
            f"dataset {cfg.name!r} needs a data root, but data.root is empty and {ENV_VAR} is "
            f"not set; {HOW_TO_SET}"
        )
    if not root.is_dir():
        raise UserError(f"data root {root} (from {source}) is not a directory; {HOW_TO_SET}")
    return root


def find_dir(root: Path, candidates: Sequence[str], marker: str, what: str,
             how: str = HOW_TO_SET) -> Path:
    """The first ``root/candidate`` holding ``marker``, so users may point at any level.

    For example VOC accepts the directory holding ``VOCdevkit``, ``VOCdevkit`` itself or
    ``VOC2012``.
    """
    for candidate in candidates:
        base = (root / candidate) if candidate != "." else root
        if (base / marker).exists():
            return base
    looked = ", ".join(str((root / c) / marker if c != "." else root / marker) for c in candidates)
    raise UserError(f"no {what} under {root} (looked for {looked}); {how}")


def split_dir(parent: Path, split: str, aliases: Mapping[str, str]) -> str:
    """The sub-directory name for ``split``, accepting short aliases such as train → training."""
    if (parent / split).is_dir():
        return split
    alias = aliases.get(split)
    if alias is not None and (parent / alias).is_dir():
        return alias
    found = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    available = f"; available: {', '.join(found)}" if found else ""
    raise UserError(f"split {split!r}: directory {parent / split} not found{available}")


def read_split_list(path: Path, image_suffix: str = "", hint: str = "") -> list[str]:
    """Sample names from a split list, one per line (relative paths such as ``a/b`` allowed).

    Lines of the common ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` form are accepted too:
    then the first field's file name is used. Any other line is one name, spaces included.
    A trailing ``image_suffix`` is dropped.
    """
    if not path.is_file():
        others = sorted(p.stem for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
        available = f"; available splits: {', '.join(others)}" if others else ""
        raise UserError(f"split list {path} not found{available}{hint}")
    names = []
    for line in path.read_text().splitlines():
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        fields = name.split()
        if len(fields) == 2 and all("/" in f for f in fields):
            name = Path(fields[0]).name  # an "image-path label-path" pair
        elif name.startswith("/"):
            name = Path(name).name
        if image_suffix and name.endswith(image_suffix):
            name = name[: -len(image_suffix)]
        names.append(name)
    return names


def list_pairs(
    names: Iterable[str],
    image_dir: Path,
    image_suffix: str,
    label_dir: Path,
    label_suffix: str,
    list_file: Path,
) -> tuple[list[Item], list[MissingFile]]:
    """Pair each listed name with ``image_dir/name+suffix`` and ``label_dir/name+suffix``."""
    items, missing = [], []
    for name in names:
        image = image_dir / f"{name}{image_suffix}"
        label = label_dir / f"{name}{label_suffix}"
        ok = True
        for path, kind in ((image, "image"), (label, "label")):
            if not path.is_file():
                ok = False
                missing.append(MissingFile(path, kind, f"{kind} {path} for {name!r} (listed in "
                                                        f"{list_file}) does not exist"))
        if ok:
            items.append(Item(name, image, label))
    return items, missing


def _index(directory: Path, suffix: str, recursive: bool) -> dict[str, Path]:
    pattern = f"*{suffix}"
    files = directory.rglob(pattern) if recursive else directory.glob(pattern)
    return {str(p.relative_to(directory))[: -len(suffix)]: p for p in files if p.is_file()}


def scan_pairs(
    image_dir: Path,
    image_suffix: str,
    label_dir: Path,
    label_suffix: str,
    recursive: bool = False,
    hint: str = "",
) -> tuple[list[Item], list[MissingFile]]:
    """Pair the images found in ``image_dir`` with the labels in ``label_dir`` by file name.

    Names are relative paths without the suffix (``aachen/aachen_000000_000019`` for
    Cityscapes). An image without a label and a label without an image are both missing pairs.
    """
    for directory, kind in ((image_dir, "image"), (label_dir, "label")):
        if not directory.is_dir():
            extra = hint if kind == "label" else ""
            raise UserError(f"{kind} directory {directory} not found{extra}")
    images = _index(image_dir, image_suffix, recursive)
    labels = _index(label_dir, label_suffix, recursive)
    if not images and not labels:
        raise UserError(f"no images *{image_suffix} in {image_dir} and no labels *{label_suffix} "
                        f"in {label_dir}")
    items, missing = [], []
    for name in sorted(images):
        label = labels.get(name)
        if label is None:
            path = label_dir / f"{name}{label_suffix}"
            missing.append(MissingFile(path, "label", f"label {path} for image {images[name]} "
                                                      f"does not exist{hint}"))
        else:
            items.append(Item(name, images[name], label))
    for name in sorted(set(labels) - set(images)):
        path = image_dir / f"{name}{image_suffix}"
        missing.append(MissingFile(path, "image", f"image {path} for label {labels[name]} "
                                                  "does not exist"))
    return items, missing
