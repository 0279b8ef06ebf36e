"""ADE20K SceneParsing (``ade20k``): 150 classes.

Layout: ``ADEChallengeData2016/{images,annotations}/{training,validation}`` with ``*.jpg``
images and ``*.png`` labels. Stored 0 means "other" and is ignored; classes 1..150 are
shifted down by one to 0..149. ``data.root`` may point at ``ADEChallengeData2016`` or at the
directory holding it; the splits ``train``/``val`` are accepted for ``training``/``validation``.
"""
from __future__ import annotations

from ..config import DataConfig
from .base import DATASETS, ImageListDataset
from .classes import ADE20K
from .paths import find_dir, resolve_root, scan_pairs, split_dir


@DATASETS.register("ade20k")
class ADE20KDataset(ImageListDataset):
    """ADE20K with 0 ignored and labels shifted down by one."""

    CLASSES = ADE20K
    reduce_zero_label = True

    def __init__(self, cfg: DataConfig, split: str, train: bool, strict: bool = True) -> None:
        super().__init__(cfg, split, train)
        base = find_dir(resolve_root(cfg), [".", "ADEChallengeData2016"], "annotations",
                        "ADEChallengeData2016 directory")
        self.base = base
        sub = split_dir(base / "images", split, {"train": "training", "val": "validation"})
        self.set_items(*scan_pairs(base / "images" / sub, ".jpg",
                                   base / "annotations" / sub, ".png"), strict)
