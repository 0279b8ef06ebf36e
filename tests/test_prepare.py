"""``emactl data prepare {cityscapes,context,cocostuff}`` on tiny trees in each release's format.

Every expected label below is computed by hand from the official tables (cityscapesScripts
``labels.py``, PASCAL Context's ``labels.txt`` and the standard 59-class selection, COCO-Stuff's
``labels.txt``), not by the code under test.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from emactl.cli import main
from emactl.data import read_label
from emactl.data.classes import CITYSCAPES, COCOSTUFF, CONTEXT60
from emactl.data.prepare import (
    cityscapes_polygons_to_train_ids,
    cocostuff_to_train_ids,
    context_mat_to_labels,
    decode_rle,
    rle_counts,
)


def run(*argv: str) -> int:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code


def write_image(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_png(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(values, dtype=np.uint8)).save(path)


def write_recipe(path: Path, name: str, root: Path, num_classes: int, train: str = "train",
                 val: str = "val") -> Path:
    path.write_text(f"data:\n  name: {name}\n  root: {root}\n  num_classes: {num_classes}\n"
                    f"  train_split: {train}\n  val_split: {val}\n  workers: 1\n")
    return path


# --------------------------------------------------------------------------------------------
# Cityscapes

H, W = 6, 8


def polygons_file(objects: list[dict]) -> str:
    return json.dumps({"imgHeight": H, "imgWidth": W, "objects": objects})


def rect(x0: int, y0: int, x1: int, y1: int) -> list[list[int]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def cityscapes_objects() -> list[dict]:
    return [
        {"label": "road", "polygon": rect(0, 3, 7, 5)},            # id 7 → 0 (rows 3-5)
        {"label": "sky", "polygon": rect(0, 0, 7, 1)},             # id 23 → 10 (rows 0-1)
        {"label": "cargroup", "polygon": rect(1, 2, 4, 4)},        # group → car, 13, over road
        {"label": "license plate", "polygon": rect(2, 3, 3, 3)},   # id -1: not drawn
        {"label": "person", "polygon": rect(6, 0, 7, 5), "deleted": 1},  # deleted: not drawn
        {"label": "guard rail", "polygon": rect(6, 4, 7, 5)},      # id 14 → ignored (255)
    ]


def expected_cityscapes() -> np.ndarray:
    """PIL fills a polygon's interior and its outline, so rect(x0, y0, x1, y1) covers both ends."""
    out = np.full((H, W), 255, dtype=np.uint8)          # unlabeled
    out[0:2, :] = 10                                     # sky
    out[3:6, :] = 0                                      # road
    out[2:5, 1:5] = 13                                   # car on top (its plate is not drawn)
    out[4:6, 6:8] = 255                                  # guard rail (ignored in training)
    return out


def make_cityscapes(root: Path) -> tuple[Path, Path]:
    """train: one city with polygons (and label ids); val: label ids only."""
    gt = root / "gtFine"
    train = gt / "train" / "aachen" / "aachen_000000_000019"
    train.parent.mkdir(parents=True)
    Path(f"{train}_gtFine_polygons.json").write_text(polygons_file(cityscapes_objects()))
    write_png(Path(f"{train}_gtFine_labelIds.png"), np.zeros((H, W)))  # polygons win under auto
    val = gt / "val" / "lindau" / "lindau_000000_000019"
    ids = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15],
                    [16, 17, 18, 19, 20, 21, 22, 23], [24, 25, 26, 27, 28, 29, 30, 31],
                    [32, 33, 7, 7, 7, 7, 7, 7], [26, 26, 26, 26, 26, 26, 26, 26]])
    write_png(Path(f"{val}_gtFine_labelIds.png"), ids)
    for stem, split in ((train, "train"), (val, "val")):
        image = root / "leftImg8bit" / split / stem.parent.name / f"{stem.name}_leftImg8bit.png"
        write_image(image, H, W)
    return Path(f"{train}_gtFine_labelTrainIds.png"), Path(f"{val}_gtFine_labelTrainIds.png")


def test_cityscapes_polygons_follow_cityscapes_scripts(tmp_path):
    path = tmp_path / "x_gtFine_polygons.json"
    path.write_text(polygons_file(cityscapes_objects()))
    assert np.array_equal(cityscapes_polygons_to_train_ids(path), expected_cityscapes())


def test_prepare_cityscapes_writes_train_ids_and_data_check_passes(tmp_path, capsys):
    train_out, val_out = make_cityscapes(tmp_path / "cityscapes")
    assert run("data", "prepare", "cityscapes", "--root", str(tmp_path), "--workers", "2") == 0
    assert "2 written, 0 already present, 0 refused" in capsys.readouterr().out
    assert np.array_equal(read_label(train_out), expected_cityscapes())
    # label id → train id, by hand from labels.py
    expected_val = np.array([
        [255, 255, 255, 255, 255, 255, 255, 0], [1, 255, 255, 2, 3, 4, 255, 255],
        [255, 5, 255, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 255, 255, 16],
        [17, 18, 0, 0, 0, 0, 0, 0], [13] * 8])
    assert np.array_equal(read_label(val_out), expected_val)
    with Image.open(val_out) as im:
        assert im.mode == "L"  # grayscale, as createTrainIdLabelImgs writes them
    assert CITYSCAPES[13] == "car" and CITYSCAPES[10] == "sky" and CITYSCAPES[18] == "bicycle"
    recipe = write_recipe(tmp_path / "r.yaml", "cityscapes", tmp_path, 19)
    assert run("data", "check", str(recipe)) == 0

    # idempotent; --force rewrites; --source label-ids reads the (all-unlabeled) PNG instead
    assert run("data", "prepare", "cityscapes", "--root", str(tmp_path / "cityscapes")) == 0
    assert "0 written, 2 already present" in capsys.readouterr().out
    assert run("data", "prepare", "cityscapes", "--root", str(tmp_path), "--source",
               "label-ids", "--force") == 0
    assert "2 written, 0 already present" in capsys.readouterr().out
    assert (read_label(train_out) == 255).all()


def test_prepare_cityscapes_refuses_malformed_files_and_bad_roots(tmp_path, capsys):
    train_out, val_out = make_cityscapes(tmp_path)
    bad = Path(str(train_out).replace("labelTrainIds.png", "polygons.json"))
    bad.write_text(polygons_file([{"label": "unicorn", "polygon": rect(0, 0, 1, 1)}]))
    assert run("data", "prepare", "cityscapes", "--root", str(tmp_path)) == 2
    captured = capsys.readouterr()
    assert "1 written, 0 already present, 1 refused" in captured.out
    assert captured.err.count("\n") == 1 and str(bad) in captured.err and "'unicorn'" in captured.err
    assert val_out.is_file() and not train_out.exists()  # nothing half-written for the bad file
    assert not list(train_out.parent.glob(".*.tmp"))

    bad.write_text('{"imgHeight": 6, "imgWidth": 8, "objects": [')
    assert run("data", "prepare", "cityscapes", "--root", str(tmp_path)) == 2
    assert f"{bad}: cannot read JSON" in capsys.readouterr().err
    bad.unlink()
    ids = Path(str(val_out).replace("labelTrainIds", "labelIds"))
    write_png(ids, np.full((H, W), 40))
    assert run("data", "prepare", "cityscapes", "--root", str(tmp_path), "--force") == 2
    assert f"{ids}: holds 40, not Cityscapes label ids" in capsys.readouterr().err

    assert run("data", "prepare", "cityscapes", "--root", str(tmp_path / "nope")) == 2
    assert "not a directory" in capsys.readouterr().err
    assert run("data", "prepare", "cityscapes", "--root", str(tmp_path / "gtFine")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no Cityscapes gtFine/ directory") and err.count("\n") == 1
    assert run("data", "prepare", "cityscapes", "--root", str(tmp_path), "--source", "x") == 2


# --------------------------------------------------------------------------------------------
# PASCAL Context


def write_context_mat(path: Path, label_map: np.ndarray) -> None:
    """A release file: trainval/<name>.mat holding the uint16 459-class ``LabelMap``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"LabelMap": np.asarray(label_map, dtype=np.uint16)})


def make_context(tmp_path: Path) -> tuple[Path, Path]:
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    main_lists = voc / "ImageSets" / "Main"
    main_lists.mkdir(parents=True)
    (main_lists / "train.txt").write_text("2008_000002\n2008_000003\n")
    (main_lists / "val.txt").write_text("2008_000008\n")
    context = tmp_path / "context"
    for k, name in enumerate(["2008_000002", "2008_000003", "2008_000008", "2009_999999"]):
        write_image(voc / "JPEGImages" / f"{name}.jpg", 2, 4)
        write_context_mat(context / "trainval" / f"{name}.mat",
                          np.roll([[0, 2, 9, 458], [1, 284, 459, 65]], k, axis=1))
    return context, voc


def test_context_mat_maps_459_ids_to_the_59_classes(tmp_path):
    path = tmp_path / "x.mat"
    # 0 unlabelled, 2 aeroplane, 9 bag, 458 wood; 1 accordion (not one of the 59), 284 person,
    # 459 zebra (not one of the 59), 65 cat
    write_context_mat(path, [[0, 2, 9, 458], [1, 284, 459, 65]])
    assert scipy.io.loadmat(path)["LabelMap"].dtype == np.uint16
    labels = context_mat_to_labels(path)
    assert np.array_equal(labels, [[0, 1, 2, 59], [0, 37, 0, 15]])
    assert [CONTEXT60[i] for i in (1, 2, 59, 37, 15)] == ["aeroplane", "bag", "wood", "person", "cat"]


def test_prepare_context_writes_labels_and_lists(tmp_path, capsys):
    context, voc = make_context(tmp_path)
    assert run("data", "prepare", "context", "--context", str(context), "--voc",
               str(tmp_path / "VOCdevkit")) == 0
    out = capsys.readouterr().out
    assert "3 written, 0 already present, 0 refused" in out and "train.txt lists 2 images" in out
    out_dir = voc / "SegmentationClassContext"
    assert sorted(p.name for p in out_dir.iterdir()) == ["2008_000002.png", "2008_000003.png",
                                                          "2008_000008.png"]
    assert np.array_equal(read_label(out_dir / "2008_000003.png"), [[59, 0, 1, 2], [15, 0, 37, 0]])
    lists = voc / "ImageSets" / "SegmentationContext"
    assert (lists / "train.txt").read_text() == "2008_000002\n2008_000003\n"
    assert (lists / "val.txt").read_text() == "2008_000008\n"
    for name, classes in (("context", 59), ("context60", 60)):
        assert run("data", "check", str(write_recipe(tmp_path / "r.yaml", name, tmp_path,
                                                     classes))) == 0
    assert run("data", "prepare", "context", "--context", str(context / "trainval"), "--voc",
               str(voc)) == 0
    assert "0 written, 3 already present" in capsys.readouterr().out


def test_prepare_context_refuses_malformed_mats(tmp_path, capsys):
    context, voc = make_context(tmp_path)
    bad = context / "trainval" / "2008_000003.mat"
    write_context_mat(bad, [[0, 460]])
    scipy.io.savemat(context / "trainval" / "2008_000008.mat", {"S": np.zeros((2, 2))})
    assert run("data", "prepare", "context", "--context", str(context), "--voc", str(voc)) == 2
    captured = capsys.readouterr()
    assert "1 written, 0 already present, 2 refused" in captured.out
    assert captured.err.count("\n") == 1
    assert f"{bad}: holds 460, not PASCAL Context 459-class ids" in captured.err
    assert "(1 more files refused)" in captured.err
    assert not (voc / "SegmentationClassContext" / "2008_000003.png").exists()
    bad.unlink()
    assert run("data", "prepare", "context", "--context", str(context), "--voc", str(voc)) == 2
    assert "no PASCAL Context label for '2008_000003'" in capsys.readouterr().err
    assert run("data", "prepare", "context", "--context", str(voc), "--voc", str(voc)) == 2
    assert "no .mat files in" in capsys.readouterr().err
    assert run("data", "prepare", "context", "--context", str(context), "--voc",
               str(context)) == 2
    assert "no VOC2010 directory" in capsys.readouterr().err


def test_rle_counts_and_decode_follow_coco():
    # runs 0, 4, 2, then 1 and 2 stored as differences from two places before: 1 - 4 = -3
    # (5 bits 11101 with the sign bit: chr(48 + 29) = 'M') and 2 - 2 = 0
    assert rle_counts("042M0") == [0, 4, 2, 1, 2]
    # column-major: 0 zeros, 4 ones (column 0 and the top of column 1), 2 zeros, 1 one, 2 zeros
    mask = decode_rle({"size": [3, 3], "counts": "042M0"}, 3, 3)
    assert np.array_equal(mask, [[1, 1, 1], [1, 0, 0], [1, 0, 0]])
    assert np.array_equal(decode_rle({"size": [2, 2], "counts": [1, 2, 1]}, 2, 2), [[0, 1], [1, 0]])
    for bad in ({"size": [3, 3], "counts": "04"}, {"size": [2, 3], "counts": "042M0"}, [1, 2]):
        with pytest.raises(ValueError):
            decode_rle(bad, 3, 3)


def detail_json(path: Path, images: list[dict], annotations: list[dict]) -> Path:
    """The Detail API's trainval_merged.json, with the keys its loader reads (others omitted)."""
    path.write_text(json.dumps({"info": {}, "images": images, "annos_segmentation": annotations,
                                "categories": [], "parts": [], "annos_occlusion": [],
                                "annos_boundary": [], "annos_joints": []}))
    return path


def test_prepare_context_from_the_detail_api_json(tmp_path, capsys):
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    images = []
    for k, (name, phase) in enumerate([("2008_000002", "train"), ("2008_000008", "val"),
                                       ("2010_000001", "test")]):
        write_image(voc / "JPEGImages" / f"{name}.jpg", 3, 3)
        images.append({"image_id": 2008000002 + k, "file_name": f"{name}.jpg", "height": 3,
                       "width": 3, "phase": phase})
    annotations = [
        # image 0: 'cat' (65) on the left two columns, then 'person' (284) over the left column
        # and the top row
        {"id": 1, "image_id": 2008000002, "category_id": 65, "segmentation": {"size": [3, 3], "counts": [0, 6, 3]}},
        {"id": 2, "image_id": 2008000002, "category_id": 284, "segmentation": {"size": [3, 3], "counts": "042M0"}},
        # image 1: 'wood' (458) everywhere
        {"id": 3, "image_id": 2008000003, "category_id": 458, "segmentation": {"size": [3, 3], "counts": [0, 9]}},
    ]
    ann = detail_json(tmp_path / "trainval_merged.json", images, annotations)
    assert run("data", "prepare", "context", "--detail", str(ann), "--voc", str(voc)) == 0
    assert "2 written, 0 already present, 0 refused; train.txt lists 1 images, val.txt 1" in \
        capsys.readouterr().out
    out = voc / "SegmentationClassContext"
    # person (37) painted after cat (15) wins where they overlap; the rest is background 0
    assert np.array_equal(read_label(out / "2008_000002.png"), [[37, 37, 37], [37, 15, 0], [37, 15, 0]])
    assert (read_label(out / "2008_000008.png") == 59).all()
    assert (voc / "ImageSets" / "SegmentationContext" / "val.txt").read_text() == "2008_000008\n"
    assert run("data", "check", str(write_recipe(tmp_path / "r.yaml", "context60", tmp_path, 60))) == 0

    annotations[2]["segmentation"] = {"size": [3, 3], "counts": [0, 8]}
    detail_json(ann, images, annotations)
    assert run("data", "prepare", "context", "--detail", str(ann), "--voc", str(voc), "--force") == 2
    err = capsys.readouterr().err
    assert f"{ann}: image 2008_000008: segmentation 0: RLE runs do not cover the 3x3 image" in err
    ann.write_text('{"images": []}')
    assert run("data", "prepare", "context", "--detail", str(ann), "--voc", str(voc)) == 2
    assert "no 'annos_segmentation'" in capsys.readouterr().err
    assert run("data", "prepare", "context", "--voc", str(voc)) == 2
    assert "give exactly one of --context" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# COCO-Stuff 164k


def test_cocostuff_maps_stuffthingmaps_to_train_ids(tmp_path):
    path = tmp_path / "000000000009.png"
    # stuffthingmaps store COCO id - 1: 0 person (id 1), 10 fire hydrant (11), 12 stop sign
    # (13, after the unused 12), 181 wood (182), 255 unlabelled, 91 banner (92, the first
    # stuff class), 24 giraffe (25), 180 window-other (181)
    write_png(path, [[0, 10, 12, 181], [255, 91, 24, 180]])
    labels = cocostuff_to_train_ids(path)
    assert np.array_equal(labels, [[0, 10, 11, 170], [255, 80, 23, 169]])
    assert [COCOSTUFF[i] for i in (0, 10, 11, 170, 80, 23, 169)] == [
        "person", "fire hydrant", "stop sign", "wood", "banner", "giraffe", "window-other"]


def test_prepare_cocostuff_writes_train_ids_and_refuses_unused_ids(tmp_path, capsys):
    root = tmp_path / "coco_stuff164k"
    for split, values in (("train2017", [[0, 10], [12, 255]]), ("val2017", [[181, 91], [0, 0]])):
        write_image(root / "images" / split / "000000000009.jpg", 2, 2)
        write_png(root / "annotations" / split / "000000000009.png", values)
    assert run("data", "prepare", "cocostuff", "--root", str(tmp_path), "--workers", "3") == 0
    assert "2 written, 0 already present, 0 refused" in capsys.readouterr().out
    ann = root / "annotations"
    assert np.array_equal(read_label(ann / "train2017" / "000000000009_labelTrainIds.png"),
                          [[0, 10], [11, 255]])
    assert np.array_equal(read_label(ann / "val2017" / "000000000009_labelTrainIds.png"),
                          [[170, 80], [0, 0]])
    recipe = write_recipe(tmp_path / "r.yaml", "cocostuff", root, 171, "train2017", "val2017")
    assert run("data", "check", str(recipe)) == 0
    # converted files are not inputs: a second run skips both
    assert run("data", "prepare", "cocostuff", "--root", str(root)) == 0
    assert "0 written, 2 already present" in capsys.readouterr().out

    bad = ann / "train2017" / "000000000025.png"
    write_png(bad, [[11, 28], [200, 0]])  # street sign (12) and shoe (29) are unused; 200 > 181
    assert run("data", "prepare", "cocostuff", "--root", str(root)) == 2
    captured = capsys.readouterr()
    assert "0 written, 2 already present, 1 refused" in captured.out
    assert f"{bad}: holds 11, 28, 200, not a COCO-Stuff stuffthingmap" in captured.err
    assert not (ann / "train2017" / "000000000025_labelTrainIds.png").exists()
    assert run("data", "prepare", "cocostuff", "--root", str(root / "images")) == 2
    assert "COCO-Stuff 164k directory" in capsys.readouterr().err


def test_prepare_unwritable_output_is_one_line(tmp_path, capsys, monkeypatch):
    import emactl.data.prepare as prepare

    def no_space(path, label):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare, "save_gray_png", no_space)
    root = tmp_path / "coco"
    for k in range(3):
        write_png(root / "annotations" / "val2017" / f"{k:012d}.png", [[0]])
    assert run("data", "prepare", "cocostuff", "--root", str(root), "--workers", "1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "000000000000_labelTrainIds.png: cannot write the label (No space left on device)" in err
