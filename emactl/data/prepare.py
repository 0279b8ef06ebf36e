"""Converting downloaded datasets into the layouts the loaders read.

``prepare_voc_aug`` builds VOC 2012's ``SegmentationClassAug`` and ``trainaug.txt`` from the
Semantic Boundaries Dataset (SBD, ``benchmark_RELEASE/dataset``).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io import atomic_path, write_text
from .palette import save_palette_png, voc_palette
from .paths import find_dir, read_split_list
from .progress import progress_bar
from .readers import DataFileError, load_mat
from .voc import find_voc


@dataclass
class VOCAugResult:
    """What :func:`prepare_voc_aug` did."""

    voc_dir: Path
    trainaug: int
    from_voc: int
    from_sbd: int
    skipped: int


def read_sbd_mat(path: Path) -> np.ndarray:
    """The ``GTcls.Segmentation`` label map (H, W uint8) of an SBD ``dataset/cls/*.mat`` file.

    SBD stores a MATLAB struct ``GTcls`` with fields ``Boundaries``, ``Segmentation`` and
    ``CategoriesPresent``; scipy returns it as an object whose fields are attributes when
    loaded with ``struct_as_record=False``.
    """
    mat = load_mat(path, "GTcls", "SBD", squeeze_me=True, struct_as_record=False)
    seg = getattr(mat.get("GTcls"), "Segmentation", None)
    if seg is None:
        raise DataFileError(f"{path}: no GTcls.Segmentation field; is this an SBD dataset/cls "
                            "file?", path, "unreadable")
    seg = np.asarray(seg)
    if seg.ndim != 2 or seg.size == 0 or seg.min() < 0 or seg.max() > 255:
        raise DataFileError(f"{path}: GTcls.Segmentation is not a 2-D map of class indices",
                            path, "unreadable")
    return seg.astype(np.uint8)


def find_sbd(path: Path) -> Path:
    """SBD's ``dataset`` directory (holding ``cls/``, ``train.txt``, ``val.txt``)."""
    if not path.is_dir():
        raise UserError(f"--sbd {path}: not a directory")
    return find_dir(path, ["dataset", "benchmark_RELEASE/dataset", "."], "cls",
                    "SBD dataset directory (cls/, train.txt, val.txt)",
                    "point --sbd at benchmark_RELEASE or its dataset/ directory")


def prepare_voc_aug(sbd: Path, voc: Path, force: bool = False,
                    progress: bool = True) -> VOCAugResult:
    """Write ``SegmentationClassAug/*.png`` and ``ImageSets/Segmentation/trainaug.txt``.

    ``trainaug`` = (SBD train ∪ SBD val ∪ VOC train) − VOC val, sorted: 10,582 images for the
    real data. Label maps are written for every image of SBD and of VOC train/val, so the VOC
    ``val`` split also reads from ``SegmentationClassAug``. Where VOC has its own
    ``SegmentationClass`` PNG for an image, that label is copied rather than SBD's: VOC's maps
    carry the 255 "ignore" band around object borders that SBD's lack, which is what the
    standard ``SegmentationClassAug`` does. The other labels are converted from SBD's
    ``GTcls.Segmentation`` into palette PNGs. Every write is atomic, and existing outputs are
    kept unless ``force``, so an interrupted run can be resumed.
    """
    if not Path(voc).is_dir():
        raise UserError(f"--voc {voc}: not a directory")
    sbd_dir = find_sbd(Path(sbd))
    voc_dir = find_voc(Path(voc), how="point --voc at VOCdevkit, at VOC2012 or at the directory "
                                      "holding VOCdevkit")
    lists = voc_dir / "ImageSets" / "Segmentation"
    sbd_train = read_split_list(sbd_dir / "train.txt")
    sbd_val = read_split_list(sbd_dir / "val.txt")
    voc_train = read_split_list(lists / "train.txt")
    voc_val = read_split_list(lists / "val.txt")
    trainaug = sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))

    # Decide every label's source before writing anything.
    sources: list[tuple[str, Path, bool]] = []
    for name in sorted(set(sbd_train) | set(sbd_val) | set(voc_train) | set(voc_val)):
        voc_png = voc_dir / "SegmentationClass" / f"{name}.png"
        mat = sbd_dir / "cls" / f"{name}.mat"
        if voc_png.is_file():
            sources.append((name, voc_png, True))
        elif mat.is_file():
            sources.append((name, mat, False))
        else:
            raise UserError(f"no label for {name!r}: neither {voc_png} nor {mat} exists")

    out_dir = voc_dir / "SegmentationClassAug"
    palette = voc_palette()
    counts = {"voc": 0, "sbd": 0, "skipped": 0}
    with progress_bar(progress) as bar:
        task = bar.add_task("SegmentationClassAug", total=len(sources))
        for name, src, from_voc in sources:
            dst = out_dir / f"{name}.png"
            if dst.exists() and not force:
                counts["skipped"] += 1
            elif from_voc:
                with atomic_path(dst) as tmp:
                    shutil.copyfile(src, tmp)
                counts["voc"] += 1
            else:
                save_palette_png(dst, read_sbd_mat(src), palette)
                counts["sbd"] += 1
            bar.advance(task)
    write_text(lists / "trainaug.txt", "".join(f"{n}\n" for n in trainaug))
    return VOCAugResult(voc_dir, len(trainaug), counts["voc"], counts["sbd"], counts["skipped"])
