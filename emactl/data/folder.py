"""A generic dataset (``folder``) for user data: images, masks and split lists in one directory.

Default layout under ``data.root``::

    images/<name>.jpg
    masks/<name>.png            class indices (palette or grayscale PNG), 255 = ignore
    splits/<split>.txt          one name per line

Without ``splits/<split>.txt``, ``images/<split>/`` and ``masks/<split>/`` are paired by file
name instead. Class names come from ``data.class_names`` and the class count from
``data.num_classes``. Every directory name and suffix is a ``data.args`` option.
"""
from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from ..errors import UserError
from .base import DATASETS, ImageListDataset
from .paths import Item, MissingFile, scan_pairs


@DATASETS.register("folder")
class FolderDataset(ImageListDataset):
    """Images and masks from user-chosen directories.

    Options: ``image_dir``, ``mask_dir``, ``list_dir``, ``image_suffix``, ``mask_suffix``;
    ``ignore_value`` is the stored value meaning "ignore"; ``reduce_zero_label`` ignores
    stored 0 and shifts the other values down by one (for masks where 0 means unlabelled).
    """

    def __init__(
        self,
        cfg: DataConfig,
        split: str,
        train: bool,
        strict: bool = True,
        *,
        image_dir: str = "images",
        mask_dir: str = "masks",
        list_dir: str = "splits",
        image_suffix: str = ".jpg",
        mask_suffix: str = ".png",
        ignore_value: int = 255,
        reduce_zero_label: bool = False,
    ) -> None:
        self.stored_ignore = ignore_value
        self.reduce_zero_label = reduce_zero_label
        self.dirs = (image_dir, mask_dir, list_dir)
        self.suffixes = (image_suffix, mask_suffix)
        super().__init__(cfg, split, train, strict)

    def find_items(self, base: Path, split: str) -> tuple[list[Item], list[MissingFile]]:
        image_dir, mask_dir, list_dir = self.dirs
        image_suffix, mask_suffix = self.suffixes
        images, masks = base / image_dir, base / mask_dir
        list_file = base / list_dir / f"{split}.txt"
        if list_file.is_file():
            return self.items_from_list(list_file, images, image_suffix, masks, mask_suffix)
        if (images / split).is_dir():
            return scan_pairs(images / split, image_suffix, masks / split, mask_suffix)
        raise UserError(
            f"split {split!r}: neither the split list {list_file} nor the directory "
            f"{images / split} exists (set data.args.list_dir or data.args.image_dir to "
            "match your layout)"
        )
