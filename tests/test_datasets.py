"""Dataset loaders on tiny trees written in each dataset's real on-disk layout."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from emactl.config import DataConfig
from emactl.data import (
    DATASETS,
    build_dataset,
    read_image,
    read_label,
    resolve_root,
    save_palette_png,
    voc_palette,
)
from emactl.errors import UserError

H, W = 12, 16


def write_jpeg(path: Path, seed: int = 0, size: tuple[int, int] = (H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")


def label_map(values: list[int], border: int = 255, size: tuple[int, int] = (H, W)) -> np.ndarray:
    """Vertical stripes of ``values`` separated by one-pixel ``border`` columns (VOC style)."""
    label = np.zeros(size, dtype=np.uint8)
    for k, column in enumerate(np.array_split(np.arange(size[1]), len(values))):
        label[:, column] = values[k]
        if k:
            label[:, column[0]] = border
    return label


def write_label(path: Path, label: np.ndarray) -> None:
    save_palette_png(path, label, voc_palette())


def write_list(path: Path, names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n}\n" for n in names))


def cfg(name: str, root: Path | str, num_classes: int, **kw) -> DataConfig:
    return DataConfig(name=name, root=str(root), num_classes=num_classes, crop_size=8, **kw)


@pytest.fixture(autouse=True)
def no_env_root(monkeypatch):
    monkeypatch.delenv("EMACTL_DATA", raising=False)


def make_voc(root: Path, labels: dict[str, np.ndarray], year: str = "2012",
             label_dir: str = "SegmentationClass", list_dir: str = "Segmentation",
             splits: dict[str, list[str]] | None = None) -> Path:
    base = root / "VOCdevkit" / f"VOC{year}"
    for i, (name, label) in enumerate(labels.items()):
        write_jpeg(base / "JPEGImages" / f"{name}.jpg", seed=i)
        write_label(base / label_dir / f"{name}.png", label)
    for split, names in (splits or {"train": list(labels)[:1], "val": list(labels)[1:]}).items():
        write_list(base / "ImageSets" / list_dir / f"{split}.txt", names)
    return base


# --------------------------------------------------------------------------------------------
# VOC and VOC aug


@pytest.fixture
def voc_root(tmp_path):
    make_voc(tmp_path, {"2007_000032": label_map([0, 1, 15]), "2007_000033": label_map([0, 20])})
    return tmp_path


def test_registered_names():
    assert set(DATASETS.names()) >= {"voc", "voc_aug", "context", "context60", "cocostuff",
                                      "cocostuff10k", "cityscapes", "ade20k", "folder", "shapes"}


@pytest.mark.parametrize("level", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_voc_accepts_three_root_levels(voc_root, level):
    ds = build_dataset(cfg("voc", voc_root / level, 21), "train", train=False)
    assert len(ds) == 1
    sample = ds.load(0)
    assert sample.name == "2007_000032"
    assert sample.image.shape == (H, W, 3) and sample.image.dtype == np.uint8
    assert sample.label.dtype == np.int64
    assert set(np.unique(sample.label)) == {0, 1, 15, 255}
    assert ds.class_names[15] == "person" and len(ds.class_names) == 21
    assert ds.palette.shape == (256, 3) and ds.palette.dtype == np.uint8


def test_voc_getitem_gives_normalised_tensors(voc_root):
    ds = build_dataset(cfg("voc", voc_root, 21), "val", train=False)
    image, label = ds[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert label.shape == (H, W) and label.dtype == torch.int64
    assert image.min() < 0 < image.max()
    assert set(label.unique().tolist()) == {0, 20, 255}
    train = build_dataset(cfg("voc", voc_root, 21), "val", train=True)
    image, label = train[0]
    assert image.shape == (3, 8, 8) and label.shape == (8, 8)


def test_voc_custom_ignore_index_is_applied(voc_root):
    ds = build_dataset(cfg("voc", voc_root, 21, ignore_index=-1), "train", train=False)
    assert set(np.unique(ds.load(0).label)) == {-1, 0, 1, 15}


def test_voc_aug_reads_segmentation_class_aug(tmp_path):
    labels = {"a": label_map([0, 3]), "b": label_map([0, 4])}
    make_voc(tmp_path, labels, label_dir="SegmentationClassAug",
             splits={"trainaug": ["a", "b"], "val": ["b"]})
    ds = build_dataset(cfg("voc_aug", tmp_path, 21, train_split="trainaug"), "trainaug", False)
    assert [ds.load(i).name for i in range(len(ds))] == ["a", "b"]
    assert set(np.unique(ds.load(1).label)) == {0, 4, 255}


def test_voc_aug_missing_list_says_how_to_build_it(tmp_path):
    make_voc(tmp_path, {"a": label_map([0, 3])})
    with pytest.raises(UserError, match="trainaug.txt not found.*emactl data prepare voc-aug"):
        build_dataset(cfg("voc_aug", tmp_path, 21), "trainaug", False)


def test_split_list_in_image_path_form(voc_root):
    lists = voc_root / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    (lists / "pairs.txt").write_text("/JPEGImages/2007_000033.jpg /SegmentationClass/2007_000033.png\n")
    ds = build_dataset(cfg("voc", voc_root, 21), "pairs", False)
    assert ds.load(0).name == "2007_000033"


# --------------------------------------------------------------------------------------------
# The label shifts of PASCAL Context and ADE20K, value by value


def stored_values(values: list[int]) -> np.ndarray:
    return np.tile(np.array(values, dtype=np.uint8), (H, W // len(values) + 1))[:, :W]


def make_context(root: Path, stored: np.ndarray) -> None:
    make_voc(root, {"2008_000002": stored}, year="2010", label_dir="SegmentationClassContext",
             list_dir="SegmentationContext", splits={"train": ["2008_000002"]})


def test_context59_shifts_down_and_ignores_background(tmp_path):
    make_context(tmp_path, stored_values([0, 1, 2, 30, 59, 255]))
    ds = build_dataset(cfg("context", tmp_path, 59), "train", False)
    label = ds.load(0).label
    expected = {0: 255, 1: 0, 2: 1, 30: 29, 59: 58, 255: 255}
    stored = stored_values([0, 1, 2, 30, 59, 255])
    for raw, mapped in expected.items():
        assert (label[stored == raw] == mapped).all(), raw
    assert ds.class_names[0] == "aeroplane" and len(ds.class_names) == 59


def test_context60_keeps_background(tmp_path):
    stored = stored_values([0, 1, 59, 255])
    make_context(tmp_path, stored)
    ds = build_dataset(cfg("context60", tmp_path, 60), "train", False)
    label = ds.load(0).label
    assert (label == stored.astype(np.int64)).all()
    assert ds.class_names[:2] == ["background", "aeroplane"]


def test_context59_out_of_range_names_stored_value(tmp_path):
    make_context(tmp_path, stored_values([0, 61]))
    ds = build_dataset(cfg("context", tmp_path, 59), "train", False)
    with pytest.raises(UserError, match=r"label value 60 in .*2008_000002.png \(stored as 61"):
        ds.load(0)


def make_ade(root: Path, stored: np.ndarray) -> Path:
    base = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        write_jpeg(base / "images" / split / f"ADE_{split}_00000001.jpg")
        write_label(base / "annotations" / split / f"ADE_{split}_00000001.png", stored)
    return base


def test_ade20k_shift_value_by_value(tmp_path):
    stored = stored_values([0, 1, 2, 75, 150])
    make_ade(tmp_path, stored)
    ds = build_dataset(cfg("ade20k", tmp_path, 150), "train", False)  # alias of training
    label = ds.load(0).label
    for raw, mapped in {0: 255, 1: 0, 2: 1, 75: 74, 150: 149}.items():
        assert (label[stored == raw] == mapped).all(), raw
    assert ds.class_names[0] == "wall" and ds.class_names[149] == "flag"
    assert len(build_dataset(cfg("ade20k", tmp_path / "ADEChallengeData2016", 150),
                             "validation", False)) == 1


def test_ade20k_value_151_is_out_of_range(tmp_path):
    make_ade(tmp_path, stored_values([1, 151]))
    ds = build_dataset(cfg("ade20k", tmp_path, 150), "val", False)
    with pytest.raises(UserError, match=r"label value 150 .*stored as 151.*outside \[0, 150\)"):
        ds.load(0)


# --------------------------------------------------------------------------------------------
# COCO-Stuff, Cityscapes


def test_cocostuff_pairs_label_train_ids(tmp_path):
    base = tmp_path / "coco_stuff164k"
    for split in ("train2017", "val2017"):
        write_jpeg(base / "images" / split / "000000000009.jpg")
        write_label(base / "annotations" / split / "000000000009_labelTrainIds.png",
                    label_map([0, 170]))
        # the raw stuffthing maps sit beside the train-id maps and must not be picked up
        write_label(base / "annotations" / split / "000000000009.png", label_map([182]))
    ds = build_dataset(cfg("cocostuff", tmp_path, 171), "train", False)
    assert len(ds) == 1 and ds.load(0).name == "000000000009"
    assert set(np.unique(ds.load(0).label)) == {0, 170, 255}
    assert len(ds.class_names) == 171 and ds.class_names[170] == "wood"


def test_cocostuff_missing_label_names_file(tmp_path):
    write_jpeg(tmp_path / "images/val2017/000000000139.jpg")
    (tmp_path / "annotations/val2017").mkdir(parents=True)
    write_jpeg(tmp_path / "images/val2017/000000000285.jpg")
    write_label(tmp_path / "annotations/val2017/000000000285_labelTrainIds.png", label_map([1]))
    with pytest.raises(UserError, match="000000000139_labelTrainIds.png for image .* does not exist"):
        build_dataset(cfg("cocostuff", tmp_path, 171), "val2017", False)


# COCO-Stuff 10k: raw COCO ids in annotations/<name>.mat (field S), or a train-id PNG.
COCO10K_IDS = [0, 1, 11, 13, 92, 182]
# Written out by hand: 12 is unused, so 13 (stop sign) is train id 11; 91 is unused, so the
# first stuff id 92 (banner) follows the 80 things; 0 (unlabeled) is ignored.
COCO10K_TRAIN_IDS = {0: 255, 1: 0, 11: 10, 13: 11, 92: 80, 182: 170}


def write_mat(path: Path, ids: np.ndarray, key: str = "S") -> None:
    import scipy.io

    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {key: ids})


def make_cocostuff10k(root: Path) -> Path:
    """train: a (uint16 .mat), b (double .mat), c (.mat and a train-id PNG); test: d (.png)."""
    base = root / "cocostuff-10k-v1.1"
    names = ["COCO_train2014_000000000077", "COCO_train2014_000000000078",
             "COCO_train2014_000000000079", "COCO_train2014_000000000080"]
    for i, name in enumerate(names):
        write_jpeg(base / "images" / f"{name}.jpg", seed=i)
    ids = stored_values(COCO10K_IDS)
    write_mat(base / "annotations" / f"{names[0]}.mat", ids.astype(np.uint16))
    write_mat(base / "annotations" / f"{names[1]}.mat", ids.astype(np.float64))
    write_mat(base / "annotations" / f"{names[2]}.mat", stored_values([12]).astype(np.uint16))
    write_label(base / "annotations" / f"{names[2]}_labelTrainIds.png", label_map([0, 170]))
    write_label(base / "annotations" / f"{names[3]}.png", label_map([5, 11]))
    write_list(base / "imageLists" / "train.txt", names[:3])
    write_list(base / "imageLists" / "test.txt", names[3:])
    return base


def test_cocostuff10k_maps_coco_ids_to_train_ids(tmp_path):
    make_cocostuff10k(tmp_path)
    ds = build_dataset(cfg("cocostuff10k", tmp_path, 171), "train", False)
    ids = stored_values(COCO10K_IDS)
    for i in (0, 1):  # the uint16 and the double .mat
        label = ds.load(i).label
        assert label.dtype == np.int64
        for raw, mapped in COCO10K_TRAIN_IDS.items():
            assert (label[ids == raw] == mapped).all(), (i, raw)
    assert ds.class_names[11] == "stop sign" and ds.class_names[80] == "banner"
    assert ds.class_names[170] == "wood" and len(ds.class_names) == 171
    x, y = ds[0]
    assert x.shape == (3, H, W) and (y.numpy() == ds.load(0).label).all()


@pytest.mark.parametrize("level", ["", "cocostuff-10k-v1.1"])
def test_cocostuff10k_lists_select_images(tmp_path, level):
    make_cocostuff10k(tmp_path)
    names = {split: [item.name for item in
                     build_dataset(cfg("cocostuff10k", tmp_path / level, 171), split, False).items]
             for split in ("train", "test", "val")}
    assert names["train"] == [f"COCO_train2014_0000000000{n}" for n in (77, 78, 79)]
    assert names["test"] == names["val"] == ["COCO_train2014_000000000080"]


def test_cocostuff10k_prefers_png_labels(tmp_path):
    make_cocostuff10k(tmp_path)
    train = build_dataset(cfg("cocostuff10k", tmp_path, 171), "train", False)
    assert train.source(2).endswith("_labelTrainIds.png")  # its .mat (id 12) is not read
    assert (train.load(2).label == label_map([0, 170])).all()
    test = build_dataset(cfg("cocostuff10k", tmp_path, 171), "test", False)
    assert test.source(0).endswith("000000000080.png")
    assert set(np.unique(test.load(0).label)) == {5, 11, 255}


def test_cocostuff10k_missing_root_and_label_are_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        build_dataset(cfg("cocostuff10k", tmp_path / "nowhere", 171), "train", False)
    assert "\n" not in str(e.value) and "nowhere" in str(e.value) and "data.root" in str(e.value)
    with pytest.raises(UserError, match=r"no COCO-Stuff 10k directory .*imageLists"):
        build_dataset(cfg("cocostuff10k", tmp_path, 171), "train", False)
    base = make_cocostuff10k(tmp_path)
    write_jpeg(base / "images" / "COCO_train2014_000000000081.jpg")
    write_list(base / "imageLists" / "train.txt", ["COCO_train2014_000000000081"])
    with pytest.raises(UserError) as e:
        build_dataset(cfg("cocostuff10k", tmp_path, 171), "train", False)
    assert "\n" not in str(e.value)
    assert re.search(r"label .*000000000081.mat for 'COCO_train2014_000000000081' \(listed in "
                     r".*train.txt\) does not exist", str(e.value))
    ds = build_dataset(cfg("cocostuff10k", tmp_path, 171), "train", False, strict=False)
    assert len(ds) == 0 and ds.missing[0].kind == "label"


def test_cocostuff10k_bad_mat_files(tmp_path, monkeypatch):
    base = make_cocostuff10k(tmp_path)
    (base / "annotations" / "COCO_train2014_000000000079_labelTrainIds.png").unlink()
    ds = build_dataset(cfg("cocostuff10k", tmp_path, 171), "train", False)
    with pytest.raises(UserError, match=r"000000000079.mat: S holds 12, not COCO-Stuff category"):
        ds.load(2)
    write_mat(base / "annotations" / "COCO_train2014_000000000079.mat", stored_values([1]), "L")
    with pytest.raises(UserError, match=r"000000000079.mat: no field S"):
        ds.load(2)
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # as if scipy were not installed
    with pytest.raises(UserError) as e:
        build_dataset(cfg("cocostuff10k", tmp_path, 171), "train", False)
    assert "\n" not in str(e.value) and "000000000077.mat" in str(e.value)
    assert "needs scipy" in str(e.value) and "_labelTrainIds.png" in str(e.value)


def make_cityscapes(root: Path) -> Path:
    base = root / "cityscapes"
    for split, city in (("train", "aachen"), ("train", "bochum"), ("val", "frankfurt")):
        stem = f"{city}_000000_000019"
        write_jpeg(base / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        gt = base / "gtFine" / split / city
        write_label(gt / f"{stem}_gtFine_labelTrainIds.png", label_map([0, 13, 18]))
        write_label(gt / f"{stem}_gtFine_labelIds.png", label_map([7, 26, 33], border=0))
    return base


def test_cityscapes_train_ids(tmp_path):
    make_cityscapes(tmp_path)
    ds = build_dataset(cfg("cityscapes", tmp_path, 19), "train", False)
    assert [ds.load(i).name for i in range(len(ds))] == ["aachen/aachen_000000_000019",
                                                        "bochum/bochum_000000_000019"]
    assert set(np.unique(ds.load(0).label)) == {0, 13, 18, 255}
    assert tuple(ds.palette[0]) == (128, 64, 128)


def test_cityscapes_label_ids_converted(tmp_path):
    make_cityscapes(tmp_path)
    c = cfg("cityscapes", tmp_path / "cityscapes", 19, args={"label_ids": True})
    label = build_dataset(c, "val", False).load(0).label
    stored = label_map([7, 26, 33], border=0)
    for raw, mapped in {7: 0, 26: 13, 33: 18, 0: 255}.items():
        assert (label[stored == raw] == mapped).all(), raw


# --------------------------------------------------------------------------------------------
# folder


def make_folder(root: Path, names: list[str], values: list[int]) -> None:
    for i, name in enumerate(names):
        write_jpeg(root / "images" / f"{name}.jpg", seed=i)
        write_label(root / "masks" / f"{name}.png", label_map(values))
    write_list(root / "splits" / "train.txt", names)


def test_folder_with_split_lists_and_class_names(tmp_path):
    make_folder(tmp_path, ["x1", "x2"], [0, 1, 2])
    c = cfg("folder", tmp_path, 3, class_names=["sea", "sand", "rock"])
    ds = build_dataset(c, "train", False)
    assert len(ds) == 2 and ds.class_names == ["sea", "sand", "rock"]
    assert set(np.unique(ds.load(1).label)) == {0, 1, 2, 255}


def test_folder_options_and_directory_splits(tmp_path):
    for split in ("train", "val"):
        write_jpeg(tmp_path / "img" / split / "a.png")
        write_label(tmp_path / "gt" / split / "a_mask.png", label_map([1, 2], border=0))
    c = cfg("folder", tmp_path, 2, args={"image_dir": "img", "mask_dir": "gt",
                                          "image_suffix": ".png", "mask_suffix": "_mask.png",
                                          "reduce_zero_label": True})
    ds = build_dataset(c, "val", False)
    assert set(np.unique(ds.load(0).label)) == {0, 1, 255}  # the 0 border becomes ignore
    assert ds.class_names == ["class_0", "class_1"]


def test_folder_missing_split(tmp_path):
    make_folder(tmp_path, ["x1"], [0, 1])
    with pytest.raises(UserError, match=r"split 'val': neither the split list .*splits/val.txt"):
        build_dataset(cfg("folder", tmp_path, 2), "val", False)


# --------------------------------------------------------------------------------------------
# Bad input


def test_missing_root_is_one_line_naming_how_to_set_it():
    with pytest.raises(UserError) as e:
        build_dataset(cfg("voc", "", 21), "train", False)
    message = str(e.value)
    assert "\n" not in message and "data.root" in message and "EMACTL_DATA" in message


def test_nonexistent_root_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as e:
        build_dataset(cfg("voc", missing, 21), "train", False)
    message = str(e.value)
    assert "\n" not in message and str(missing) in message and "data.root" in message
    assert "EMACTL_DATA" in message


def test_root_from_environment(voc_root, monkeypatch):
    monkeypatch.setenv("EMACTL_DATA", str(voc_root))
    assert resolve_root(cfg("voc", "", 21)) == voc_root
    assert len(build_dataset(cfg("voc", "", 21), "train", False)) == 1


def test_root_without_voc_says_where_it_looked(tmp_path):
    with pytest.raises(UserError, match=r"no VOC2012 directory under .*VOCdevkit/VOC2012/JPEGImages"):
        build_dataset(cfg("voc", tmp_path, 21), "train", False)


def test_missing_split_list_names_file(voc_root):
    with pytest.raises(UserError, match=r"split list .*Segmentation/trainval.txt not found; "
                                        r"available splits: train, val"):
        build_dataset(cfg("voc", voc_root, 21), "trainval", False)


def test_missing_pair_names_file(voc_root):
    (voc_root / "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png").unlink()
    with pytest.raises(UserError, match=r"label .*2007_000033.png for '2007_000033' \(listed in "):
        build_dataset(cfg("voc", voc_root, 21), "val", False)
    ds = build_dataset(cfg("voc", voc_root, 21), "val", False, strict=False)
    assert len(ds) == 0 and ds.missing[0].kind == "label"


def test_corrupt_image_names_file(voc_root):
    bad = voc_root / "VOCdevkit/VOC2012/JPEGImages/2007_000032.jpg"
    bad.write_bytes(bad.read_bytes()[:40])
    ds = build_dataset(cfg("voc", voc_root, 21), "train", False)
    with pytest.raises(UserError, match=f"{bad}: cannot read image"):
        ds.load(0)
    bad.write_bytes(b"not an image at all")
    with pytest.raises(UserError, match=f"{bad}: cannot read image"):
        read_image(bad)


def test_rgb_label_is_refused(tmp_path):
    path = tmp_path / "rgb.png"
    write_jpeg(path)
    with pytest.raises(UserError, match="RGB colour image"):
        read_label(path)


def test_label_value_37_in_21_class_set(tmp_path):
    make_voc(tmp_path, {"a": label_map([0, 37]), "b": label_map([0])})
    ds = build_dataset(cfg("voc", tmp_path, 21), "train", False)
    path = tmp_path / "VOCdevkit/VOC2012/SegmentationClass/a.png"
    with pytest.raises(UserError) as e:
        ds[0]
    assert str(e.value).startswith(f"label value 37 in {path} is outside [0, 21) and is not the "
                                   "ignore index 255; fix the label map")
    assert "data.num_classes" in str(e.value)


def test_bad_label_in_dataloader_worker_stays_a_user_error(tmp_path):
    make_voc(tmp_path, {"a": label_map([0, 37]), "b": label_map([0])})
    ds = build_dataset(cfg("voc", tmp_path, 21), "train", False)
    batches = iter(torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1))
    try:
        with pytest.raises(UserError, match="label value 37 in"):
            next(batches)
    finally:
        # Stop the worker now: left to the garbage collector, its shutdown waits 5 s.
        batches._shutdown_workers()


def test_folder_out_of_range_suggests_num_classes(tmp_path):
    make_folder(tmp_path, ["x1"], [0, 4, 5])
    ds = build_dataset(cfg("folder", tmp_path, 5), "train", False)
    with pytest.raises(UserError, match=r"label value 5 .*fix the label map or set data.num_classes"):
        ds.load(0)
    ds = build_dataset(cfg("folder", tmp_path, 3), "train", False)
    with pytest.raises(UserError, match=r"label values 4, 5 in .* are outside \[0, 3\)"):
        ds.load(0)


def test_size_mismatch_names_both_files(voc_root):
    path = voc_root / "VOCdevkit/VOC2012/SegmentationClass/2007_000032.png"
    write_label(path, label_map([0], size=(H + 1, W)))
    with pytest.raises(UserError, match=r"2007_000032.png: label map is 16x13 but its image .*is 16x12"):
        build_dataset(cfg("voc", voc_root, 21), "train", False).load(0)


def test_unknown_args_key(voc_root):
    with pytest.raises(UserError) as e:
        build_dataset(cfg("voc", voc_root, 21, args={"year": 2007}), "train", False)
    assert str(e.value) == "data.args.year: unknown option for dataset voc; allowed: (none)"
    with pytest.raises(UserError, match=r"data.args.size: unknown option for dataset folder; "
                                        r"allowed: image_dir, mask_dir"):
        build_dataset(cfg("folder", voc_root, 21, args={"size": 3}), "train", False)


def test_wrong_args_type(tmp_path):
    with pytest.raises(UserError, match=r"data.args.label_ids: got 'yes'; expected true or false"):
        build_dataset(cfg("cityscapes", tmp_path, 19, args={"label_ids": "yes"}), "train", False)


def test_unknown_dataset_name():
    with pytest.raises(UserError, match=r"data.name: unknown dataset 'pascal'; choose one of: ade20k"):
        build_dataset(cfg("pascal", "", 21), "train", False)


def test_wrong_num_classes_for_standard_dataset(voc_root):
    with pytest.raises(UserError, match=r"data.num_classes=19 but dataset voc has 21 classes; "
                                        r"set data.num_classes=21"):
        build_dataset(cfg("voc", voc_root, 19), "train", False)


def test_save_palette_png_round_trip(tmp_path):
    label = label_map([0, 7, 20])
    path = tmp_path / "out" / "x.png"
    save_palette_png(path, label, voc_palette())
    with Image.open(path) as im:
        assert im.mode == "P"
        assert tuple(im.getpalette()[3 * 15 : 3 * 15 + 3]) == tuple(voc_palette()[15])
    assert (read_label(path) == label).all()
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temporary left behind
    assert tuple(voc_palette()[1]) == (128, 0, 0) and tuple(voc_palette()[255]) == (224, 224, 192)


@pytest.mark.parametrize("name", ["voc_aug", "context", "context60", "cocostuff", "cocostuff10k",
                                  "cityscapes", "ade20k"])
def test_dataset_recipes_match_their_datasets(name):
    from emactl.config import load_recipe

    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / f"{name}.yaml")
    assert recipe.data.name == name
    assert recipe.data.num_classes == len(DATASETS.get(name).CLASSES)


def test_folder_names_may_be_relative_paths(tmp_path):
    write_jpeg(tmp_path / "images" / "site1" / "a.jpg")
    write_label(tmp_path / "masks" / "site1" / "a.png", label_map([0, 1]))
    write_list(tmp_path / "splits" / "train.txt", ["site1/a.jpg"])
    ds = build_dataset(cfg("folder", tmp_path, 2), "train", False)
    assert ds.load(0).name == "site1/a"


def test_16_bit_image_is_scaled_not_clipped_to_white(tmp_path):
    values = np.arange(H * W, dtype=np.uint16).reshape(H, W) * 341  # 0 .. 65,131
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = read_image(tmp_path / "deep.png")
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(image[..., 0], expected) and np.array_equal(image[..., 2], expected)


def test_float_image_is_refused_in_one_line(tmp_path):
    Image.fromarray(np.ones((H, W), dtype=np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(UserError, match=r"f.tiff: image mode F cannot be read as 8-bit RGB") as info:
        read_image(tmp_path / "f.tiff")
    assert "\n" not in str(info.value)


def test_split_list_line_with_a_space_is_one_name(tmp_path):
    make_folder(tmp_path, ["my photo"], [0, 1])
    ds = build_dataset(cfg("folder", tmp_path, 2), "train", False)
    assert [item.name for item in ds.items] == ["my photo"]
    write_list(tmp_path / "splits" / "val.txt", ["other shot"])
    with pytest.raises(UserError, match=r"images/other shot.jpg for 'other shot'"):
        build_dataset(cfg("folder", tmp_path, 2), "val", False)
