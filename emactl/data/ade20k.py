"""ADE20K SceneParsing (``ade20k``): 150 classes.

Layout: ``ADEChallengeData2016/{images,annotations}/{training,validation}`` with ``*.jpg``
images and ``*.png`` labels. Stored 0 means "other" and is ignored; classes 1..150 are
shifted down by one to 0..149. ``data.root`` may point at ``ADEChallengeData2016`` or at the
directory holding it; the splits ``train``/``val`` are accepted for ``training``/``validation``.
"""
from __future__ import annotations

from pathlib import Path

from .base import DATASETS, ImageListDataset
from .classes import ADE20K
from .paths import Item, MissingFile, scan_pairs, split_dir


@DATASETS.register("ade20k")
class ADE20KDataset(ImageListDataset):
    """ADE20K with 0 ignored and labels shifted down by one."""

    CLASSES = ADE20K
    reduce_zero_label = True

    ROOT_CANDIDATES = (".", "ADEChallengeData2016")
    ROOT_MARKER = "annotations"
    ROOT_WHAT = "ADEChallengeData2016 directory"

    def find_items(self, base: Path, split: str) -> tuple[list[Item], list[MissingFile]]:
        sub = split_dir(base / "images", split, {"train": "training", "val": "validation"})
        return scan_pairs(base / "images" / sub, ".jpg", base / "annotations" / sub, ".png")
