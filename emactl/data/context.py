"""PASCAL Context: 59 classes (``context``) or 60 with background (``context60``).

Layout: ``VOC2010/{JPEGImages, SegmentationClassContext/*.png,
ImageSets/SegmentationContext/{train,val}.txt}``. Stored labels are 0 = background and
1..59 = the classes. The 59-class set ignores background: stored 0 → ignore and every other
value is shifted down by one. ``data.root`` may point at the directory holding ``VOCdevkit``,
at ``VOCdevkit`` or at ``VOC2010``.
"""
from __future__ import annotations

from ..config import DataConfig
from .base import DATASETS, ImageListDataset
from .classes import CONTEXT59, CONTEXT60
from .paths import resolve_root
from .voc import find_voc


@DATASETS.register("context")
class ContextDataset(ImageListDataset):
    """PASCAL Context, 59 classes (background ignored)."""

    CLASSES = CONTEXT59
    reduce_zero_label = True

    def __init__(self, cfg: DataConfig, split: str, train: bool, strict: bool = True) -> None:
        super().__init__(cfg, split, train)
        base = find_voc(resolve_root(cfg), "2010")
        self.base = base
        self.set_items_from_list(
            base / "ImageSets" / "SegmentationContext" / f"{split}.txt",
            base / "JPEGImages", ".jpg",
            base / "SegmentationClassContext", ".png",
            strict,
        )


@DATASETS.register("context60")
class Context60Dataset(ContextDataset):
    """PASCAL Context, 60 classes with background as class 0."""

    CLASSES = CONTEXT60
    reduce_zero_label = False
