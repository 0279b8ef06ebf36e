"""COCO-Stuff 164k (``cocostuff``): 171 classes as train ids 0..170, 255 ignored.

Layout: ``images/{train2017,val2017}/*.jpg`` and
``annotations/{train2017,val2017}/*_labelTrainIds.png``. ``data.root`` may point at that
directory or at one holding it as ``cocostuff``, ``coco_stuff164k`` or ``coco_stuff``; the
splits ``train``/``val`` are accepted for ``train2017``/``val2017``.
"""
from __future__ import annotations

from ..config import DataConfig
from .base import DATASETS, ImageListDataset
from .classes import COCOSTUFF
from .paths import find_dir, resolve_root, scan_pairs, split_dir

LABEL_HINT = ("; COCO-Stuff 164k train-id labels (*_labelTrainIds.png) are made from the stuffthing"
              " maps by the usual conversion script (e.g. mmsegmentation's coco_stuff164k.py)")


@DATASETS.register("cocostuff")
class COCOStuffDataset(ImageListDataset):
    """COCO-Stuff 164k with ``*_labelTrainIds.png`` label maps."""

    CLASSES = COCOSTUFF

    def __init__(self, cfg: DataConfig, split: str, train: bool, strict: bool = True) -> None:
        super().__init__(cfg, split, train)
        base = find_dir(resolve_root(cfg), [".", "cocostuff", "coco_stuff164k", "coco_stuff"],
                        "annotations", "COCO-Stuff 164k directory (images/, annotations/)")
        self.base = base
        sub = split_dir(base / "images", split, {"train": "train2017", "val": "val2017"})
        self.set_items(*scan_pairs(base / "images" / sub, ".jpg",
                                   base / "annotations" / sub, "_labelTrainIds.png",
                                   hint=LABEL_HINT), strict)
