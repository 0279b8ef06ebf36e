"""The dataset interface, the shared loader for image/label file pairs, and the factory.

Every dataset is a :class:`SegDataset` registered in :data:`DATASETS` under the name recipes
use (``data.name``). Its constructor is ``(cfg, split, train, strict=True, *, options...)``;
the keyword-only options are what ``data.args`` may set, so unknown keys are caught before a
dataset is built.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor

from ..config import DataConfig
from ..errors import UserError
from ..registry import Registry
from .palette import palette_from, voc_palette
from .paths import Item, MissingFile, find_dir, list_pairs, read_split_list, resolve_root
from .readers import DataFileError, read_image, read_label
from .transforms import build_transforms

DATASETS: Registry = Registry("dataset")


@dataclass
class Sample:
    """One raw sample, before transforms.

    ``image`` is (H, W, 3) uint8 RGB; ``label`` is (H, W) int64 with the dataset's mapping
    already applied (ignored pixels hold ``cfg.ignore_index``), or None when unlabelled.
    """

    image: np.ndarray
    label: np.ndarray | None
    name: str


class SegDataset(torch.utils.data.Dataset):
    """A segmentation dataset: raw samples through :meth:`load`, tensors through indexing.

    Subclasses set ``CLASSES`` (the standard class names; None for user-defined class sets),
    optionally ``COLOURS``, and implement ``__len__``, :meth:`load_raw` and :meth:`source`.
    """

    CLASSES: ClassVar[Sequence[str] | None] = None
    # Colours of the first classes in the palette; the VOC palette when None.
    COLOURS: ClassVar[Sequence[Sequence[int]] | None] = None
    # Datasets whose stored labels are one above the class index (0 = ignored) set this.
    reduce_zero_label: bool = False

    def __init__(self, cfg: DataConfig, split: str, train: bool) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.split = split
        self.train = train
        self.ignore_index = cfg.ignore_index
        standard = self.CLASSES
        if standard is not None and cfg.num_classes != len(standard):
            raise UserError(
                f"data.num_classes={cfg.num_classes} but dataset {cfg.name} has "
                f"{len(standard)} classes; set data.num_classes={len(standard)}"
            )
        self.num_classes: int = cfg.num_classes
        if cfg.class_names is not None:
            self.class_names: list[str] = list(cfg.class_names)
        elif standard is not None:
            self.class_names = list(standard)
        else:
            self.class_names = [f"class_{i}" for i in range(cfg.num_classes)]
        self.palette: np.ndarray = palette_from(self.COLOURS) if self.COLOURS else voc_palette()
        self.transform = build_transforms(cfg, train)
        # Files the layout expects but that are absent (file datasets with strict=False).
        self.missing: list[MissingFile] = []

    def __len__(self) -> int:
        raise NotImplementedError

    def load_raw(self, i: int) -> Sample:
        """The sample with its label mapped but not checked against the class range."""
        raise NotImplementedError

    def source(self, i: int) -> str:
        """Where sample ``i`` comes from (the label file), for messages."""
        raise NotImplementedError

    def load(self, i: int) -> Sample:
        """Sample ``i`` before transforms; label values outside the class range raise."""
        sample = self.load_raw(i)
        if sample.label is not None:
            self.check_label(sample.label, self.source(i))
        return sample

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        sample = self.load(i)
        label = sample.label
        if label is None:
            label = np.full(sample.image.shape[:2], self.ignore_index, dtype=np.int64)
        return self.transform(sample.image, label)

    def invalid_values(self, label: np.ndarray) -> np.ndarray:
        """The sorted distinct values of ``label`` outside [0, num_classes) ∪ {ignore}."""
        if label.size == 0 or (label.min() >= 0 and label.max() < self.num_classes):
            return np.zeros(0, dtype=np.int64)
        bad = ((label < 0) | (label >= self.num_classes)) & (label != self.ignore_index)
        return np.unique(label[bad])

    def describe_invalid(self, values: np.ndarray, where: str) -> str:
        """A one-line explanation of out-of-range label values and how to fix them."""
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
        one = len(values) == 1
        stored = ""
        if self.reduce_zero_label:
            raw = ", ".join(str(v + 1) for v in values[:8])
            stored = f" (stored as {raw}; dataset {self.name} shifts labels down by one)"
        fix = "fix the label map or set data.num_classes"
        if self.CLASSES is not None:
            fix = ("fix the label map, or use data.name=folder and set data.num_classes for a "
                   "different class set")
        return (
            f"label {'value' if one else 'values'} {shown} in {where}{stored} "
            f"{'is' if one else 'are'} outside [0, {self.num_classes}) and "
            f"{'is' if one else 'are'} not the ignore index {self.ignore_index}; {fix}"
        )

    def check_label(self, label: np.ndarray, where: str) -> None:
        values = self.invalid_values(label)
        if values.size:
            raise DataFileError(self.describe_invalid(values, where), where, "bad value")


class ImageListDataset(SegDataset):
    """Image/label file pairs on disk: the shared logic of every file-based loader.

    The constructor finds the dataset's directory under the data root (:meth:`find_base`,
    from ``ROOT_CANDIDATES``/``ROOT_MARKER``/``ROOT_WHAT``) and its pairs for the split
    (:meth:`find_items`, which each subclass implements with :mod:`emactl.data.paths`); a
    subclass with options sets them before calling it. Stored labels are mapped by
    :meth:`map_label`: the stored ignore value (255) becomes ``cfg.ignore_index``; with
    ``reduce_zero_label`` stored 0 is ignored too and every other value is shifted down by one.
    """

    stored_ignore: int = 255
    # Where the dataset's directory may sit under the data root (tried in order), the entry
    # that marks it, and what a message calls it; without a marker the root is the directory.
    ROOT_CANDIDATES: ClassVar[Sequence[str]] = (".",)
    ROOT_MARKER: ClassVar[str | None] = None
    ROOT_WHAT: ClassVar[str] = ""

    def __init__(self, cfg: DataConfig, split: str, train: bool, strict: bool = True) -> None:
        super().__init__(cfg, split, train)
        self.items: list[Item] = []
        self.base: Path = self.find_base(resolve_root(cfg))
        self.set_items(*self.find_items(self.base, split), strict)

    def find_base(self, root: Path) -> Path:
        """The dataset's directory under ``root`` (users may point at any accepted level)."""
        if self.ROOT_MARKER is None:
            return root
        return find_dir(root, self.ROOT_CANDIDATES, self.ROOT_MARKER, self.ROOT_WHAT)

    def find_items(self, base: Path, split: str) -> tuple[list[Item], list[MissingFile]]:
        """The complete pairs of ``split`` under ``base`` and the files that are missing."""
        raise NotImplementedError

    def set_items(self, items: list[Item], missing: list[MissingFile], strict: bool) -> None:
        """Keep the complete pairs; with ``strict`` any missing file raises (naming it)."""
        if strict and missing:
            more = ""
            if len(missing) > 1:
                more = (f" (and {len(missing) - 1} more missing files; `emactl data check` "
                        "lists them all)")
            raise UserError(missing[0].message + more)
        self.items, self.missing = items, missing

    @staticmethod
    def items_from_list(
        list_file: Path,
        image_dir: Path,
        image_suffix: str,
        label_dir: Path,
        label_suffix: str,
        hint: str = "",
    ) -> tuple[list[Item], list[MissingFile]]:
        """Pairs from a split list of names (the VOC/Context/folder layouts)."""
        names = read_split_list(list_file, image_suffix, hint)
        if not label_dir.is_dir():
            raise UserError(f"label directory {label_dir} not found{hint}")
        return list_pairs(names, image_dir, image_suffix, label_dir, label_suffix, list_file)

    def __len__(self) -> int:
        return len(self.items)

    def source(self, i: int) -> str:
        item = self.items[i]
        return str(item.label if item.label is not None else item.image)

    def map_label(self, stored: np.ndarray) -> np.ndarray:
        """Stored label values → class indices (int64), ignored pixels → ``ignore_index``."""
        label = stored.astype(np.int64)
        ignore = stored == self.stored_ignore
        if self.reduce_zero_label:
            ignore |= stored == 0
            label -= 1
        label[ignore] = self.ignore_index
        return label

    def read_stored_label(self, path: Path) -> np.ndarray:
        """The label map as stored in ``path``, before :meth:`map_label`."""
        return read_label(path)

    def load_raw(self, i: int) -> Sample:
        item = self.items[i]
        image = read_image(item.image)
        label = None
        if item.label is not None:
            stored = self.read_stored_label(item.label)
            if stored.shape != image.shape[:2]:
                (lh, lw), (ih, iw) = stored.shape, image.shape[:2]
                raise DataFileError(
                    f"{item.label}: label map is {lw}x{lh} but its image {item.image} is {iw}x{ih}",
                    item.label,
                    "size mismatch",
                )
            label = self.map_label(stored)
        return Sample(image, label, item.name)


# --------------------------------------------------------------------------------------------
# The factory.


def dataset_options(factory: Any) -> dict[str, inspect.Parameter]:
    """The keyword-only constructor parameters of a dataset: what ``data.args`` may set."""
    params = inspect.signature(factory).parameters
    return {n: p for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _coerce(value: Any, default: Any, key: str) -> Any:
    """Check an option's value against the type of its default."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"{key}: got {value!r}; expected true or false")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}: got {value!r}; expected an integer")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}: got {value!r}; expected a number")
        return float(value)
    elif isinstance(default, str) and not isinstance(value, str):
        raise UserError(f"{key}: got {value!r}; expected a string")
    return value


def dataset_kwargs(name: str, factory: Any, args: dict[str, Any]) -> dict[str, Any]:
    """Validate ``data.args`` against the options of dataset ``name``."""
    options = dataset_options(factory)
    kwargs = {}
    for key, value in args.items():
        if key not in options:
            allowed = ", ".join(options) or "(none)"
            raise UserError(
                f"data.args.{key}: unknown option for dataset {name}; allowed: {allowed}"
            )
        kwargs[key] = _coerce(value, options[key].default, f"data.args.{key}")
    return kwargs


def build_dataset(cfg: DataConfig, split: str, train: bool, strict: bool = True) -> SegDataset:
    """The dataset ``cfg.name`` for ``split``; ``train=True`` gives training transforms.

    ``strict=False`` keeps going past missing files (``emactl data check`` reports them all).
    """
    factory = DATASETS.get(cfg.name, "data.name")
    kwargs = dataset_kwargs(cfg.name, factory, dict(cfg.args))
    return factory(cfg, split, train, strict, **kwargs)

