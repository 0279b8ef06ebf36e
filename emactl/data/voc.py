"""PASCAL VOC 2012 (``voc``) and its SBD-augmented training set (``voc_aug``).

Layout: ``VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, SegmentationClassAug,
ImageSets/Segmentation/<split>.txt}``. Labels are palette PNGs whose index is the class;
255 marks object borders and is ignored. ``data.root`` may point at the directory holding
``VOCdevkit``, at ``VOCdevkit`` or at ``VOC2012``.
"""
from __future__ import annotations

from pathlib import Path

from .base import DATASETS, ImageListDataset
from .classes import VOC
from .paths import HOW_TO_SET, Item, MissingFile, find_dir


def find_voc(root: Path, year: str = "2012", how: str = HOW_TO_SET) -> Path:
    """The ``VOC<year>`` directory under ``root`` (any of the three accepted levels)."""
    return find_dir(root, [f"VOCdevkit/VOC{year}", f"VOC{year}", "."], "JPEGImages",
                    f"VOC{year} directory", how)


@DATASETS.register("voc")
class VOCDataset(ImageListDataset):
    """PASCAL VOC 2012 segmentation: 21 classes, labels from ``SegmentationClass``."""

    CLASSES = VOC
    label_dir = "SegmentationClass"
    hint = ""

    def find_base(self, root: Path) -> Path:
        return find_voc(root)

    def find_items(self, base: Path, split: str) -> tuple[list[Item], list[MissingFile]]:
        return self.items_from_list(base / "ImageSets" / "Segmentation" / f"{split}.txt",
                                    base / "JPEGImages", ".jpg", base / self.label_dir, ".png", self.hint)


@DATASETS.register("voc_aug")
class VOCAugDataset(VOCDataset):
    """VOC 2012 with the SBD-augmented labels ``SegmentationClassAug`` (split ``trainaug``).

    ``emactl data prepare voc-aug`` builds ``SegmentationClassAug`` and ``trainaug.txt`` from
    SBD; the converted folder holds the VOC val labels too, so ``val`` works unchanged.
    """

    label_dir = "SegmentationClassAug"
    hint = "; build it with `emactl data prepare voc-aug --sbd PATH --voc PATH`"
