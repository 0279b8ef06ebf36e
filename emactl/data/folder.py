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

from ..config import DataConfig
from ..errors import UserError
from .base import DATASETS, ImageListDataset
from .paths import resolve_root, scan_pairs


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
        super().__init__(cfg, split, train)
        self.stored_ignore = ignore_value
        self.reduce_zero_label = reduce_zero_label
        root = resolve_root(cfg)
        self.base = root
        images, masks = root / image_dir, root / mask_dir
        list_file = root / list_dir / f"{split}.txt"
        if list_file.is_file():
            self.set_items_from_list(list_file, images, image_suffix, masks, mask_suffix, strict)
        elif (images / split).is_dir():
            self.set_items(*scan_pairs(images / split, image_suffix, masks / split, mask_suffix),
                           strict)
        else:
            raise UserError(
                f"split {split!r}: neither the split list {list_file} nor the directory "
                f"{images / split} exists (set data.args.list_dir or data.args.image_dir to "
                "match your layout)"
            )
