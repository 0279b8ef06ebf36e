"""Cityscapes (``cityscapes``): 19 classes as train ids, 255 ignored.

Layout: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and
``gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (made by ``emactl data prepare
cityscapes`` or cityscapesScripts' ``createTrainIdLabelImgs``). With ``data.args.label_ids: true`` the raw
``*_gtFine_labelIds.png`` maps are read instead and converted to train ids on the fly.
``data.root`` may point at the Cityscapes directory or at one holding it as ``cityscapes``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import DataConfig
from .base import DATASETS, ImageListDataset
from .classes import CITYSCAPES, CITYSCAPES_COLOURS, CITYSCAPES_ID_TO_TRAINID
from .paths import Item, MissingFile, scan_pairs

TRAINID_HINT = ("; make the train-id maps with `emactl data prepare cityscapes --root PATH`, or "
                "read the raw *_gtFine_labelIds.png with --set data.args.label_ids=true")


def _id_to_trainid_lut(ignore_index: int) -> np.ndarray:
    lut = np.full(256, ignore_index, dtype=np.int64)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAINID.items():
        lut[label_id] = train_id
    return lut


@DATASETS.register("cityscapes")
class CityscapesDataset(ImageListDataset):
    """Cityscapes fine annotations (train ids, or label ids converted on the fly)."""

    CLASSES = CITYSCAPES
    COLOURS = CITYSCAPES_COLOURS
    ROOT_CANDIDATES = (".", "cityscapes")
    ROOT_MARKER = "leftImg8bit"
    ROOT_WHAT = "Cityscapes directory (leftImg8bit/, gtFine/)"

    def __init__(
        self,
        cfg: DataConfig,
        split: str,
        train: bool,
        strict: bool = True,
        *,
        label_ids: bool = False,
    ) -> None:
        self.lut = _id_to_trainid_lut(cfg.ignore_index) if label_ids else None
        super().__init__(cfg, split, train, strict)

    def find_items(self, base: Path, split: str) -> tuple[list[Item], list[MissingFile]]:
        label_ids = self.lut is not None
        suffix = "_gtFine_labelIds.png" if label_ids else "_gtFine_labelTrainIds.png"
        return scan_pairs(base / "leftImg8bit" / split, "_leftImg8bit.png", base / "gtFine" / split, suffix,
                          recursive=True, hint="" if label_ids else TRAINID_HINT)

    def map_label(self, stored: np.ndarray) -> np.ndarray:
        if self.lut is None:
            return super().map_label(stored)
        # Label ids are 0..33 (-1, the licence plate, is stored as 255 or not at all).
        return self.lut[np.clip(stored, 0, 255)]
