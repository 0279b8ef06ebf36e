"""COCO-Stuff: 171 classes as train ids 0..170, 255 ignored.

``cocostuff`` is COCO-Stuff 164k: ``images/{train2017,val2017}/*.jpg`` and
``annotations/{train2017,val2017}/*_labelTrainIds.png``. ``data.root`` may point at that
directory or at one holding it as ``cocostuff``, ``coco_stuff164k`` or ``coco_stuff``; the
splits ``train``/``val`` are accepted for ``train2017``/``val2017``.

``cocostuff10k`` is the COCO-Stuff 10k v1.1 release (see :class:`COCOStuff10kDataset`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import UserError
from .base import DATASETS, ImageListDataset
from .classes import COCOSTUFF
from .paths import Item, MissingFile, read_split_list, scan_pairs, split_dir
from .readers import DataFileError, load_mat, require_scipy

LABEL_HINT = ("; make the COCO-Stuff 164k train-id labels (*_labelTrainIds.png) from the "
              "stuffthingmaps with `emactl data prepare cocostuff --root PATH`")


@DATASETS.register("cocostuff")
class COCOStuffDataset(ImageListDataset):
    """COCO-Stuff 164k with ``*_labelTrainIds.png`` label maps."""

    CLASSES = COCOSTUFF
    ROOT_CANDIDATES = (".", "cocostuff", "coco_stuff164k", "coco_stuff")
    ROOT_MARKER = "annotations"
    ROOT_WHAT = "COCO-Stuff 164k directory (images/, annotations/)"

    def find_items(self, base: Path, split: str) -> tuple[list[Item], list[MissingFile]]:
        sub = split_dir(base / "images", split, {"train": "train2017", "val": "val2017"})
        return scan_pairs(base / "images" / sub, ".jpg", base / "annotations" / sub, "_labelTrainIds.png",
                          hint=LABEL_HINT)


# --------------------------------------------------------------------------------------------
# COCO-Stuff 10k

# COCO category ids 1..182 that no class uses; the other 171 are the train ids in order.
UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
USED_IDS = tuple(i for i in range(1, 183) if i not in UNUSED_IDS)
# Label files tried for each name, in order of preference.
LABEL_SUFFIXES_10K = ("_labelTrainIds.png", ".png", ".mat")
MAT_FIX = ", or convert the labels to <name>_labelTrainIds.png"


def read_stuff_mat(path: Path) -> np.ndarray:
    """The ``S`` map (H, W int64 COCO category ids, 0 = unlabeled) of a COCO-Stuff 10k .mat."""
    mat = load_mat(path, "S", "COCO-Stuff 10k", MAT_FIX)
    if "S" not in mat:
        raise DataFileError(f"{path}: no field S; expected a COCO-Stuff 10k annotation "
                            "(annotations/<name>.mat holding the label map S)", path)
    ids = np.asarray(mat["S"])
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.number):
        raise DataFileError(f"{path}: field S has shape {ids.shape} ({ids.dtype}); expected a "
                            "2-D map of COCO category ids", path)
    return ids.astype(np.int64)


@DATASETS.register("cocostuff10k")
class COCOStuff10kDataset(ImageListDataset):
    """COCO-Stuff 10k v1.1: 9,000 train / 1,000 test images, 171 classes.

    Layout: ``images/<name>.jpg``, ``annotations/<name>.mat`` and ``imageLists/{train,
    test}.txt`` (one name per line, without extension); ``val`` is accepted for ``test``.
    ``data.root`` may point at that directory or at one holding it as ``cocostuff10k``,
    ``coco_stuff10k`` or ``cocostuff-10k-v1.1``.

    Labels: the .mat field ``S`` holds COCO category ids, 0 = unlabeled (→ ignored) and
    1..182 of which 171 are used; those map in increasing order to train ids 0..170
    (1 → 0, 11 → 10, 13 → 11, ..., 182 → 170). The 11 unused ids (:data:`UNUSED_IDS`) and
    values above 182 are reported as bad values. A pre-converted PNG beside the .mat,
    ``<name>_labelTrainIds.png`` or ``<name>.png``, is preferred (no scipy needed); it must
    already hold train ids 0..170 and 255 = ignored. (mmsegmentation's coco_stuff10k.py writes
    0 = unlabeled and 1..171 instead, for its reduce_zero_label: those PNGs would be off by
    one here.)
    """

    CLASSES = COCOSTUFF
    ROOT_CANDIDATES = (".", "cocostuff10k", "coco_stuff10k", "cocostuff-10k-v1.1")
    ROOT_MARKER = "imageLists"
    ROOT_WHAT = "COCO-Stuff 10k directory (images/, annotations/, imageLists/)"

    def __init__(self, cfg: DataConfig, split: str, train: bool, strict: bool = True) -> None:
        super().__init__(cfg, split, train, strict)
        self.ids_to_train = np.full(183, -1, dtype=np.int64)
        self.ids_to_train[0] = self.ignore_index
        self.ids_to_train[list(USED_IDS)] = np.arange(len(USED_IDS))
        mats = [item.label for item in self.items if item.label.suffix == ".mat"]
        if mats:  # fail now rather than in the first batch
            require_scipy(mats[0], "COCO-Stuff 10k", MAT_FIX)

    def find_items(self, base: Path, split: str) -> tuple[list[Item], list[MissingFile]]:
        list_file = base / "imageLists" / f"{split}.txt"
        if split == "val" and not list_file.is_file():
            list_file = list_file.with_name("test.txt")
        names = read_split_list(list_file, ".jpg")
        for directory in (base / "images", base / "annotations"):
            if not directory.is_dir():
                raise UserError(f"directory {directory} not found; COCO-Stuff 10k needs images/ "
                                "and annotations/ beside imageLists/")
        return self.pair(names, base, list_file)

    @staticmethod
    def pair(names: list[str], base: Path, list_file: Path) -> tuple[list[Item],
                                                                     list[MissingFile]]:
        """Each listed name with its image and its preferred label file."""
        items, missing = [], []
        fix = "restore it or remove the name from the list"
        for name in names:
            image = base / "images" / f"{name}.jpg"
            labels = [base / "annotations" / f"{name}{s}" for s in LABEL_SUFFIXES_10K]
            label = next((p for p in labels if p.is_file()), None)
            if not image.is_file():
                missing.append(MissingFile(image, "image", f"image {image} for {name!r} (listed "
                                           f"in {list_file}) does not exist; {fix}"))
            if label is None:
                missing.append(MissingFile(labels[-1], "label", (
                    f"label {labels[-1]} for {name!r} (listed in {list_file}) does not exist "
                    f"(nor {name}_labelTrainIds.png or {name}.png); {fix}")))
            if image.is_file() and label is not None:
                items.append(Item(name, image, label))
        return items, missing

    def map_ids(self, ids: np.ndarray, path: Path) -> np.ndarray:
        """COCO category ids → train ids (0 → ``ignore_index``); unused ids raise."""
        known = (ids >= 0) & (ids < len(self.ids_to_train))
        label = self.ids_to_train[np.where(known, ids, 0)]
        bad = np.unique(ids[~known | (label < 0)])
        if bad.size:
            shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
            raise DataFileError(f"{path}: S holds {shown}, not COCO-Stuff category ids (0..182 "
                                f"without {', '.join(map(str, UNUSED_IDS))}); fix or re-export "
                                "the annotation", path, "bad value")
        return label

    def read_stored_label(self, path: Path) -> np.ndarray:
        """PNG labels as stored (train ids); .mat category ids mapped to train ids."""
        if path.suffix != ".mat":
            return super().read_stored_label(path)
        return self.map_ids(read_stuff_mat(path), path)
