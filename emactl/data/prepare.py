"""Converting downloaded datasets into the layouts the loaders read.

``prepare_voc_aug`` builds VOC 2012's ``SegmentationClassAug`` and ``trainaug.txt`` from the
Semantic Boundaries Dataset (SBD, ``benchmark_RELEASE/dataset``). ``prepare_cityscapes``,
``prepare_context`` and ``prepare_cocostuff`` turn the label files each dataset's authors
release into train-id PNGs with :func:`convert_labels`: idempotent (finished files are
skipped unless ``force``), threaded, atomic, and a malformed source file is refused (nothing
is written for it) and reported by name rather than stopping the other conversions.
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..errors import UserError
from ..io import atomic_path, write_text
from .classes import CITYSCAPES_LABELS, CONTEXT459_IDS
from .cocostuff import UNUSED_IDS, USED_IDS
from .palette import save_gray_png, save_palette_png, voc_palette
from .paths import find_dir, read_split_list
from .progress import progress_bar
from .readers import DataFileError, load_mat, read_label
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


# --------------------------------------------------------------------------------------------
# The shared conversion loop.


@dataclass(frozen=True)
class LabelJob:
    """One label file to convert: its source, where its train-id PNG goes, and the converter."""

    src: Path
    dst: Path
    convert: Callable[[Path], np.ndarray]


@dataclass
class ConvertResult:
    """What :func:`convert_labels` did: files written, kept as they were, and refused."""

    written: int = 0
    skipped: int = 0
    refused: list[DataFileError] = field(default_factory=list)

    def summary(self, what: str) -> str:
        return (f"{what}: {self.written} written, {self.skipped} already present, "
                f"{len(self.refused)} refused")

    def raise_refused(self) -> None:
        """One line naming the first refused file (and how many more), for exit code 2."""
        if not self.refused:
            return
        more = f" ({len(self.refused) - 1} more files refused)" if len(self.refused) > 1 else ""
        raise UserError(f"{self.refused[0]}{more}; fix or re-extract the file(s) and run again "
                        "(finished labels are kept)")


def _run_job(job: LabelJob, force: bool) -> str | DataFileError:
    if job.dst.exists() and not force:
        return "skipped"
    try:
        label = job.convert(job.src)
    except DataFileError as e:
        return e
    try:
        save_gray_png(job.dst, label)
    except OSError as e:  # permissions, a full disk: nothing is left half-written either way
        raise UserError(f"{job.dst}: cannot write the label ({e.strerror or e})") from None
    return "written"


def convert_labels(jobs: Sequence[LabelJob], what: str, workers: int = 4, force: bool = False,
                   progress: bool = True) -> ConvertResult:
    """Run every job on ``workers`` threads (PNG decoding and encoding release the GIL).

    Existing outputs are skipped unless ``force``; each output is written atomically, so an
    interrupted run leaves only finished labels and can simply be run again.
    """
    result = ConvertResult()
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task(what, total=len(jobs))
            for outcome in pool.map(lambda job: _run_job(job, force), jobs):
                if isinstance(outcome, DataFileError):
                    result.refused.append(outcome)
                elif outcome == "written":
                    result.written += 1
                else:
                    result.skipped += 1
                bar.advance(task)
    finally:
        # On Ctrl-C or an unwritable output, drop the queued files instead of converting
        # them all first; the ones running finish (their writes are atomic either way).
        pool.shutdown(wait=True, cancel_futures=True)
    result.refused.sort(key=lambda e: str(e.path))
    return result


def _values(values: np.ndarray) -> str:
    return ", ".join(str(v) for v in values[:8]) + (", ..." if values.size > 8 else "")


def _lookup(lut: np.ndarray, ids: np.ndarray, path: Path, expected: str) -> np.ndarray:
    """``lut[ids]`` where -1 in ``lut`` (or an id outside it) refuses the file."""
    ids = ids.astype(np.int64)
    inside = (ids >= 0) & (ids < len(lut))
    out = lut[np.where(inside, ids, 0)]
    bad = ~inside | (out < 0)
    if bad.any():
        raise DataFileError(f"{path}: holds {_values(np.unique(ids[bad]))}, not {expected}",
                            path, "bad value")
    return out.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Cityscapes: gtFine polygons or label ids → *_gtFine_labelTrainIds.png


CITYSCAPES_NAME_TO_IDS = {name: (label_id, train_id) for name, label_id, train_id in CITYSCAPES_LABELS}
POLYGONS = "_gtFine_polygons.json"
LABEL_IDS = "_gtFine_labelIds.png"
TRAIN_IDS = "_gtFine_labelTrainIds.png"


def cityscapes_id_lut() -> np.ndarray:
    """Label id (0..33) → train id; -1 for values no Cityscapes labelIds map holds."""
    lut = np.full(256, -1, dtype=np.int64)
    for _, label_id, train_id in CITYSCAPES_LABELS:
        if label_id >= 0:
            lut[label_id] = train_id
    return lut


def _malformed(path: Path, what: str) -> DataFileError:
    return DataFileError(f"{path}: {what}; expected a Cityscapes gtFine polygons file "
                         "(imgWidth, imgHeight, objects with label and polygon)", path)


def cityscapes_polygons_to_train_ids(path: Path) -> np.ndarray:
    """Rasterise a ``*_gtFine_polygons.json`` into train ids, as cityscapesScripts does.

    The map starts as ``unlabeled`` (255); objects are filled in file order with PIL's polygon
    fill (later ones on top); deleted objects and the licence plate (id -1) are not drawn; an
    unknown ``<name>group`` label falls back to ``<name>``. An unknown label refuses the file.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _malformed(path, f"cannot read JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise _malformed(path, "not a JSON object")
    width, height, objects = data.get("imgWidth"), data.get("imgHeight"), data.get("objects")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise _malformed(path, f"imgWidth/imgHeight are {width!r}/{height!r}")
    if not isinstance(objects, list):
        raise _malformed(path, "no objects list")
    image = Image.new("L", (width, height), CITYSCAPES_NAME_TO_IDS["unlabeled"][1])
    draw = ImageDraw.Draw(image)
    for k, obj in enumerate(objects):
        if not isinstance(obj, dict) or not isinstance(obj.get("label"), str):
            raise _malformed(path, f"object {k} has no label")
        if obj.get("deleted"):
            continue
        name = obj["label"]
        if name not in CITYSCAPES_NAME_TO_IDS and name.endswith("group"):
            name = name[: -len("group")]
        if name not in CITYSCAPES_NAME_TO_IDS:
            raise DataFileError(f"{path}: object {k} has label {obj['label']!r}, which is not a "
                                "Cityscapes label (cityscapesScripts labels.py)", path, "bad value")
        label_id, train_id = CITYSCAPES_NAME_TO_IDS[name]
        if label_id < 0:
            continue
        polygon = obj.get("polygon")
        try:
            points = [(float(x), float(y)) for x, y in polygon]  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise _malformed(path, f"object {k} ({name}) has no list of [x, y] points") from None
        if len(points) >= 2:
            draw.polygon(points, fill=train_id)
        elif points:
            draw.point(points, fill=train_id)
    return np.array(image)


def cityscapes_label_ids_to_train_ids(path: Path) -> np.ndarray:
    """Map a ``*_gtFine_labelIds.png`` (ids 0..33) to train ids."""
    return _lookup(cityscapes_id_lut(), read_label(path), path,
                   "Cityscapes label ids (0..33); is this a *_gtFine_labelIds.png?")


def cityscapes_jobs(gt_dir: Path, source: str) -> list[LabelJob]:
    """One job per image under ``gt_dir``: its polygons (``source`` polygons or auto, when the
    JSON exists) or its label-id map."""
    polygons = {str(p)[: -len(POLYGONS)]: p for p in gt_dir.rglob(f"*{POLYGONS}")}
    label_ids = {str(p)[: -len(LABEL_IDS)]: p for p in gt_dir.rglob(f"*{LABEL_IDS}")}
    jobs = []
    for stem in sorted(set(polygons) | set(label_ids)):
        dst = Path(stem + TRAIN_IDS)
        if stem in polygons and source != "label-ids":
            jobs.append(LabelJob(polygons[stem], dst, cityscapes_polygons_to_train_ids))
        elif stem in label_ids and source != "polygons":
            jobs.append(LabelJob(label_ids[stem], dst, cityscapes_label_ids_to_train_ids))
    return jobs


CITYSCAPES_SOURCES = ("auto", "polygons", "label-ids")


def prepare_cityscapes(root: Path, source: str = "auto", workers: int = 4, force: bool = False,
                       progress: bool = True) -> tuple[Path, ConvertResult]:
    """Write ``gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` beside each annotation.

    ``source``: ``polygons`` (what cityscapesScripts' createTrainIdLabelImgs reads),
    ``label-ids`` (the released ``*_labelIds.png``, the same labels through the id table) or
    ``auto`` (polygons where present, else label ids).
    """
    if source not in CITYSCAPES_SOURCES:
        raise UserError(f"--source {source!r}: choose one of {', '.join(CITYSCAPES_SOURCES)}")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--root {root}: not a directory")
    base = find_dir(root, [".", "cityscapes"], "gtFine", "Cityscapes gtFine/ directory",
                    "point --root at the directory holding gtFine/ and leftImg8bit/ "
                    "(unzip gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip there)")
    jobs = cityscapes_jobs(base / "gtFine", source)
    if not jobs:
        wanted = {"auto": f"*{POLYGONS} or *{LABEL_IDS}", "polygons": f"*{POLYGONS}",
                  "label-ids": f"*{LABEL_IDS}"}[source]
        raise UserError(f"no {wanted} files under {base / 'gtFine'}; is gtFine_trainvaltest.zip "
                        "extracted there?")
    return base, convert_labels(jobs, "labelTrainIds", workers, force, progress)


# --------------------------------------------------------------------------------------------
# PASCAL Context: the release's 459-class .mat files → 60-class PNGs + split lists


def context_lut() -> np.ndarray:
    """459-class id (0 = unlabelled, 1..459) → 60-class label: the 59 classes as 1..59, the
    rest as background 0."""
    lut = np.zeros(460, dtype=np.int64)
    lut[list(CONTEXT459_IDS)] = np.arange(1, len(CONTEXT459_IDS) + 1)
    return lut


def read_context_mat(path: Path) -> np.ndarray:
    """The ``LabelMap`` (H, W, 459-class ids) of a PASCAL Context ``trainval/<name>.mat``."""
    mat = load_mat(path, "LabelMap", "PASCAL Context", ", or pip install 'emactl[mat]'")
    if "LabelMap" not in mat:
        raise DataFileError(f"{path}: no LabelMap field; expected a PASCAL Context annotation "
                            "(trainval/<name>.mat from trainval.tar.gz)", path)
    ids = np.asarray(mat["LabelMap"])
    if ids.ndim != 2 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise DataFileError(f"{path}: LabelMap has shape {ids.shape} ({ids.dtype}); expected a "
                            "2-D map of integer class ids", path)
    return ids


def context_mat_to_labels(path: Path) -> np.ndarray:
    """A PASCAL Context .mat → the 60-class map (0 = background, 1..59 = CONTEXT59)."""
    return _lookup(context_lut(), read_context_mat(path), path,
                   "PASCAL Context 459-class ids (0..459)")


@dataclass
class ContextResult:
    """What :func:`prepare_context` did."""

    voc_dir: Path
    splits: dict[str, int]
    labels: ConvertResult


def find_context_mats(path: Path) -> Path:
    """The directory holding the release's ``<name>.mat`` files (``trainval/`` or ``path``)."""
    if not path.is_dir():
        raise UserError(f"--context {path}: not a directory")
    for candidate in (path / "trainval", path):
        if candidate.is_dir() and next(candidate.glob("*.mat"), None) is not None:
            return candidate
    raise UserError(f"no .mat files in {path / 'trainval'} or {path}; point --context at the "
                    "directory trainval.tar.gz was extracted into")


def rle_counts(counts: str) -> list[int]:
    """The run lengths of a COCO compressed RLE string (pycocotools' ``rleFrString``).

    Each count is written 5 bits per character (offset 48, bit 0x20 = more characters follow,
    bit 0x10 of the last = negative); from the third count on, a count is stored as its
    difference from the count two places before.
    """
    runs: list[int] = []
    p = 0
    while p < len(counts):
        value = shift = 0
        more = True
        while more:
            if p >= len(counts):
                raise ValueError("truncated counts string")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {counts[p]!r} is not RLE")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def decode_rle(segmentation: object, height: int, width: int) -> np.ndarray:
    """A COCO RLE mask (``{"size": [h, w], "counts": str or list}``) as an (h, w) bool array.

    Runs alternate 0s and 1s, starting with 0s, over the pixels in column-major order.
    """
    if not isinstance(segmentation, dict) or "counts" not in segmentation:
        raise ValueError("segmentation is not an RLE object with counts")
    size = segmentation.get("size")
    if list(size or []) != [height, width]:
        raise ValueError(f"RLE size {size} is not the image's [{height}, {width}]")
    counts = segmentation["counts"]
    runs = rle_counts(counts) if isinstance(counts, str) else list(counts)
    if any(not isinstance(r, int) or r < 0 for r in runs) or sum(runs) != height * width:
        raise ValueError(f"RLE runs do not cover the {height}x{width} image")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape((width, height)).T


@dataclass(frozen=True)
class DetailLabel:
    """One image of the Detail API's ``trainval_merged.json``, converted as its ``getMask``
    draws the class mask: zeros, then each segmentation in file order painted with its
    category id (459-class ids); then the 60-class table."""

    name: str
    height: int
    width: int
    annotations: tuple[tuple[object, object], ...]  # (category_id, segmentation)

    def __call__(self, path: Path) -> np.ndarray:
        ids = np.zeros((self.height, self.width), dtype=np.int64)
        for k, (category, segmentation) in enumerate(self.annotations):
            if not isinstance(category, int):
                raise DataFileError(f"{path}: image {self.name}: segmentation {k} has category "
                                    f"{category!r}", path)
            try:
                ids[decode_rle(segmentation, self.height, self.width)] = category
            except ValueError as e:
                raise DataFileError(f"{path}: image {self.name}: segmentation {k}: {e}", path) from None
        return _lookup(context_lut(), ids, path,
                       f"PASCAL Context 459-class ids (0..459) (image {self.name})")


def read_detail(path: Path) -> tuple[dict[str, list[str]], list[DetailLabel]]:
    """The train/val names (by each image's ``phase``) and the images of ``trainval_merged.json``."""
    if not path.is_file():
        raise UserError(f"--detail {path}: no such file; give the Detail API's trainval_merged.json")
    try:
        data = json.loads(path.read_text())
        images, annotations = data["images"], data["annos_segmentation"]
        by_image: dict[object, list[tuple[object, object]]] = {}
        for ann in annotations:
            by_image.setdefault(ann["image_id"], []).append((ann["category_id"], ann["segmentation"]))
        splits: dict[str, list[str]] = {"train": [], "val": []}
        labels = []
        for image in images:
            name = Path(image["file_name"]).stem
            if image["phase"] in splits:
                splits[image["phase"]].append(name)
                labels.append(DetailLabel(name, int(image["height"]), int(image["width"]),
                                          tuple(by_image.get(image["image_id"], ()))))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        what = f"no {e}" if isinstance(e, KeyError) else (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: not a Detail API annotation file ({what}); expected "
                        "trainval_merged.json with images and annos_segmentation") from None
    if not labels:
        raise UserError(f"{path}: no train or val images")
    return splits, labels


def prepare_context(context: Path | None, voc: Path, workers: int = 4, force: bool = False,
                    progress: bool = True, detail: Path | None = None) -> ContextResult:
    """Write ``VOC2010/SegmentationClassContext/<name>.png`` and
    ``ImageSets/SegmentationContext/{train,val}.txt``, from the release's ``.mat`` files
    (``context``) or from the Detail API's ``trainval_merged.json`` (``detail``).

    With the ``.mat`` files the split is VOC 2010's ``ImageSets/Main`` train/val (4,998 / 5,105
    images; PASCAL Context annotates exactly those 10,103); with the JSON it is each image's
    ``phase``. The PNGs hold 0 = background and 1..59 = the standard 59 classes; dataset
    ``context60`` reads them as they are and ``context`` ignores 0 and shifts the rest down,
    so one set of files serves both recipes.
    """
    if (context is None) == (detail is None):
        raise UserError("give exactly one of --context (the trainval/ .mat files) and --detail "
                        "(trainval_merged.json)")
    mat_dir = find_context_mats(Path(context)) if context is not None else None
    if not Path(voc).is_dir():
        raise UserError(f"--voc {voc}: not a directory")
    voc_dir = find_voc(Path(voc), "2010", how="point --voc at VOCdevkit, at VOC2010 or at the "
                                             "directory holding VOCdevkit")
    out_dir = voc_dir / "SegmentationClassContext"
    jobs = []
    if detail is not None:
        splits, labels = read_detail(Path(detail))
        jobs = [LabelJob(Path(detail), out_dir / f"{label.name}.png", label) for label in labels]
    else:
        assert mat_dir is not None
        main = voc_dir / "ImageSets" / "Main"
        splits = {split: read_split_list(main / f"{split}.txt") for split in ("train", "val")}
        for name in sorted(set(splits["train"]) | set(splits["val"])):
            mat = mat_dir / f"{name}.mat"
            if not mat.is_file():
                raise UserError(f"no PASCAL Context label for {name!r} (listed in {main}): {mat} "
                                "does not exist; is trainval.tar.gz fully extracted?")
            jobs.append(LabelJob(mat, out_dir / f"{name}.png", context_mat_to_labels))
    labels_result = convert_labels(jobs, "SegmentationClassContext", workers, force, progress)
    lists = voc_dir / "ImageSets" / "SegmentationContext"
    for split, names in splits.items():
        write_text(lists / f"{split}.txt", "".join(f"{n}\n" for n in sorted(names)))
    return ContextResult(voc_dir, {k: len(v) for k, v in splits.items()}, labels_result)


# --------------------------------------------------------------------------------------------
# COCO-Stuff 164k: stuffthingmaps PNGs → *_labelTrainIds.png


def cocostuff_lut() -> np.ndarray:
    """stuffthingmaps value → train id. The PNGs store COCO id − 1 (0..181) and 255 for
    unlabelled; the 171 used ids map in order to 0..170. The 11 unused thing ids, and
    182..254, are -1 (refused)."""
    lut = np.full(256, -1, dtype=np.int64)
    lut[np.asarray(USED_IDS) - 1] = np.arange(len(USED_IDS))
    lut[255] = 255
    return lut


def cocostuff_to_train_ids(path: Path) -> np.ndarray:
    """A ``stuffthingmaps_trainval2017`` PNG → train ids 0..170, 255 = ignore."""
    unused = ", ".join(str(i - 1) for i in UNUSED_IDS)
    return _lookup(cocostuff_lut(), read_label(path), path,
                   f"a COCO-Stuff stuffthingmap (0..181 without {unused}, and 255)")


COCO_SPLITS = ("train2017", "val2017")
COCO_TRAIN_IDS = "_labelTrainIds.png"


def prepare_cocostuff(root: Path, workers: int = 4, force: bool = False,
                      progress: bool = True) -> tuple[Path, ConvertResult]:
    """Write ``annotations/<split>/<name>_labelTrainIds.png`` beside each stuffthingmap."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--root {root}: not a directory")
    how = ("point --root at the directory holding images/ and annotations/ (unzip "
           "stuffthingmaps_trainval2017.zip into annotations/)")
    base = find_dir(root, [".", "cocostuff", "coco_stuff164k", "coco_stuff", "dataset"],
                    "annotations", "COCO-Stuff 164k directory (images/, annotations/)", how)
    jobs = []
    for split in COCO_SPLITS:
        folder = base / "annotations" / split
        if not folder.is_dir():
            continue
        for src in sorted(folder.glob("*.png")):
            if not src.name.endswith(COCO_TRAIN_IDS):
                dst = src.with_name(src.stem + COCO_TRAIN_IDS)
                jobs.append(LabelJob(src, dst, cocostuff_to_train_ids))
    if not jobs:
        raise UserError(f"no stuffthingmap PNGs in {base / 'annotations'}/{{train2017,val2017}}; "
                        f"{how}")
    return base, convert_labels(jobs, "labelTrainIds", workers, force, progress)
