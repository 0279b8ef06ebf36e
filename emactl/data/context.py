"""PASCAL Context: 59 classes (``context``) or 60 with background (``context60``).

Layout: ``VOC2010/{JPEGImages, SegmentationClassContext/*.png,
ImageSets/SegmentationContext/{train,val}.txt}``. Stored labels are 0 = background and
1..59 = the classes. The 59-class set ignores background: stored 0 → ignore and every other
value is shifted down by one. ``data.root`` may point at the directory holding ``VOCdevkit``,
at ``VOCdevkit`` or at ``VOC2010``.
"""
from __future__ import annotations

from pathlib import Path

from .base import DATASETS, ImageListDataset
from .classes import CONTEXT59, CONTEXT60
from .paths import Item, MissingFile
from .voc import find_voc


@DATASETS.register("context")
class ContextDataset(ImageListDataset):
    """PASCAL Context, 59 classes (background ignored)."""

    CLASSES = CONTEXT59
    reduce_zero_label = True

    def find_base(self, root: Path) -> Path:
        return find_voc(root, "2010")

    def find_items(self, base: Path, split: str) -> tuple[list[Item], list[MissingFile]]:
        return self.items_from_list(base / "ImageSets" / "SegmentationContext" / f"{split}.txt",
                                    base / "JPEGImages", ".jpg", base / "SegmentationClassContext", ".png")


@DATASETS.register("context60")
class Context60Dataset(ContextDataset):
    """PASCAL Context, 60 classes with background as class 0."""

    CLASSES = CONTEXT60
    reduce_zero_label = False
