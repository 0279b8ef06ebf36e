"""``emactl data check`` and ``emactl data prepare voc-aug`` through the CLI entry point."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse
from PIL import Image

from emactl.cli import main
from emactl.data import read_label, save_palette_png, voc_palette
from emactl.data.prepare import read_sbd_mat


def run(*argv: str) -> int:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    return e.value.code


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 8, 3), 90, dtype=np.uint8)).save(path)


def write_label(path: Path, values: list[int]) -> None:
    label = np.zeros((6, 8), dtype=np.uint8)
    for k, v in enumerate(values):
        label[:, k * 8 // len(values):] = v
    save_palette_png(path, label, voc_palette())


@pytest.fixture
def folder(tmp_path):
    """A folder dataset with 3 classes: train a, b; val c."""
    root = tmp_path / "data"
    for name, values in {"a": [0, 1], "b": [2, 255], "c": [0, 2]}.items():
        write_image(root / "images" / f"{name}.jpg")
        write_label(root / "masks" / f"{name}.png", values)
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("a\nb\n")
    (root / "splits" / "val.txt").write_text("c\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data:\n  name: folder\n  root: {root}\n  num_classes: 3\n"
                      "  class_names: [sky, sea, sand]\n  workers: 1\n")
    return root, recipe


def test_check_clean_dataset_exits_0_and_writes_tables(folder, tmp_path, capsys):
    root, recipe = folder
    out = tmp_path / "report"
    assert run("data", "check", str(recipe), "--out", str(out)) == 0
    text = capsys.readouterr().out
    assert "no problems found" in text and "sand" in text
    hist = pd.read_csv(out / "class_histogram.csv", index_col="class")
    assert hist.loc[1, "name"] == "sea"
    assert hist.loc[0, "train pixels"] == 24 and hist.loc[2, "train pixels"] == 24
    assert hist.loc[255, "train pixels"] == 24 and hist.loc[2, "train images"] == 1
    assert hist.loc[2, "val pixels"] == 24
    summary = pd.read_csv(out / "summary.csv")
    assert summary["images"].tolist() == [2, 1] and summary["labels"].tolist() == [2, 1]
    assert (out / "class_histogram.md").read_text().startswith("|")
    assert (out / "config.yaml").is_file()


def test_check_prints_frequency_class_weights_of_the_train_split(folder, capsys):
    from emactl.engine.losses import frequency_weights

    _, recipe = folder
    assert run("data", "check", str(recipe)) == 0
    text = capsys.readouterr().out
    # train: a and b, 24 pixels each of classes 0, 1 and 2 (and 24 ignored)
    assert "class weights from the train split" in text
    assert frequency_weights([24, 24, 24]) == [1.0, 1.0, 1.0]
    assert "  class_weights: [1, 1, 1]" in text


def test_check_lists_every_problem_and_exits_1(folder, tmp_path, capsys):
    root, recipe = folder
    write_label(root / "masks" / "a.png", [0, 7])
    write_image(root / "images" / "d.jpg")                # listed, label missing
    write_label(root / "masks" / "e.png", [0])              # listed, image missing
    write_image(root / "images" / "f.jpg")
    (root / "masks" / "f.png").write_bytes(b"garbage")      # unreadable label
    write_image(root / "images" / "g.jpg")
    write_label(root / "masks" / "g.png", [0, 9, 8])
    (root / "splits" / "train.txt").write_text("a\nb\nd\ne\nf\ng\n")
    out = tmp_path / "report"
    assert run("data", "check", str(recipe), "--split", "train", "--out", str(out)) == 1
    text = capsys.readouterr().out
    assert "label value 7 in" in text and "label values 8, 9 in" in text
    problems = pd.read_csv(out / "problems.csv")
    kinds = dict(zip(problems["path"].map(lambda p: Path(p).name), problems["kind"]))
    assert kinds == {"a.png": "bad value", "d.png": "missing label", "e.jpg": "missing image",
                     "f.png": "unreadable", "g.png": "bad value"}
    summary = pd.read_csv(out / "summary.csv")
    assert summary.loc[0, "images"] == 5 and summary.loc[0, "labels"] == 5
    assert summary["split"].tolist() == ["train"]


def test_check_bad_input_exits_2(folder, tmp_path, capsys):
    _, recipe = folder
    assert run("data", "check", str(recipe), "--set", "data.root=/nonexistent/x") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data root /nonexistent/x (from data.root)") and err.count("\n") == 1
    assert run("data", "check", str(tmp_path / "missing.yaml")) == 2
    assert run("data", "check", str(recipe), "--set", "data.args.colour=1") == 2
    assert "data.args.colour: unknown option for dataset folder" in capsys.readouterr().err


def test_check_shapes_needs_no_files(tmp_path):
    recipe = tmp_path / "shapes.yaml"
    recipe.write_text("data:\n  name: shapes\n  num_classes: 7\n  workers: 1\n"
                      "  args: {size: 24, train_length: 3, val_length: 2}\n")
    assert run("data", "check", str(recipe)) == 0


# --------------------------------------------------------------------------------------------
# prepare voc-aug


def write_sbd_mat(path: Path, seg: np.ndarray) -> None:
    """An SBD ``cls`` file: MATLAB struct GTcls with Boundaries, Segmentation, CategoriesPresent."""
    boundaries = np.empty((20, 1), dtype=object)
    for k in range(20):
        boundaries[k, 0] = scipy.sparse.csc_matrix(seg == k + 1, dtype=float)
    present = np.unique(seg[seg > 0]).astype(np.uint8)
    scipy.io.savemat(path, {"GTcls": {"Boundaries": boundaries, "Segmentation": seg,
                                      "CategoriesPresent": present}})


def test_read_sbd_mat_reads_matlab_struct(tmp_path):
    seg = np.zeros((5, 7), dtype=np.uint8)
    seg[1:4, 2:5] = 12
    write_sbd_mat(tmp_path / "x.mat", seg)
    raw = scipy.io.loadmat(tmp_path / "x.mat")["GTcls"]
    assert raw.dtype.names == ("Boundaries", "Segmentation", "CategoriesPresent")  # a struct
    out = read_sbd_mat(tmp_path / "x.mat")
    assert out.dtype == np.uint8 and np.array_equal(out, seg)


def test_prepare_voc_aug(tmp_path, capsys):
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (sbd / "cls").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    (voc / "JPEGImages").mkdir()
    sbd_labels = {name: np.full((6, 8), k + 1, dtype=np.uint8)
                  for k, name in enumerate(["s1", "s2", "s3", "v1"])}
    for name, seg in sbd_labels.items():
        write_sbd_mat(sbd / "cls" / f"{name}.mat", seg)
    (sbd / "train.txt").write_text("s1\ns2\nv1\n")
    (sbd / "val.txt").write_text("s3\n")
    # VOC train v1 (also in SBD) and t1; VOC val v2 and s3 (s3 must leave trainaug)
    for name, values in {"v1": [0, 5, 255], "t1": [0, 6], "v2": [0, 7], "s3": [0, 8]}.items():
        write_label(voc / "SegmentationClass" / f"{name}.png", values)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("v1\nt1\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("v2\ns3\n")

    assert run("data", "prepare", "voc-aug", "--sbd", str(tmp_path / "benchmark_RELEASE"),
               "--voc", str(tmp_path / "VOCdevkit")) == 0
    assert "4 labels copied from VOC, 2 converted from SBD" in capsys.readouterr().out
    trainaug = (voc / "ImageSets/Segmentation/trainaug.txt").read_text().split()
    assert trainaug == ["s1", "s2", "t1", "v1"]
    aug = voc / "SegmentationClassAug"
    assert sorted(p.name for p in aug.iterdir()) == [f"{n}.png" for n in
                                                     ["s1", "s2", "s3", "t1", "v1", "v2"]]
    assert np.array_equal(read_label(aug / "s2.png"), sbd_labels["s2"])
    # VOC's own label (with its 255 border) wins over SBD's for v1
    assert np.array_equal(read_label(aug / "v1.png"), read_label(voc / "SegmentationClass/v1.png"))
    with Image.open(aug / "s1.png") as im:
        assert im.mode == "P"
    # a second run keeps what exists
    assert run("data", "prepare", "voc-aug", "--sbd", str(sbd), "--voc", str(voc)) == 0
    assert "6 already present" in capsys.readouterr().out


def test_prepare_voc_aug_missing_label_and_bad_mat(tmp_path, capsys):
    sbd = tmp_path / "dataset"
    voc = tmp_path / "VOC2012"
    (sbd / "cls").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    (sbd / "train.txt").write_text("s1\n")
    (sbd / "val.txt").write_text("")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("")
    assert run("data", "prepare", "voc-aug", "--sbd", str(sbd), "--voc", str(voc)) == 2
    assert "no label for 's1': neither" in capsys.readouterr().err
    (sbd / "cls" / "s1.mat").write_bytes(b"not a mat file")
    assert run("data", "prepare", "voc-aug", "--sbd", str(sbd), "--voc", str(voc)) == 2
    assert "s1.mat: cannot read .mat file" in capsys.readouterr().err
    assert run("data", "prepare", "voc-aug", "--sbd", str(tmp_path / "nope"), "--voc", str(voc)) == 2
    assert run("data", "prepare", "voc-aug", "--sbd", str(sbd), "--voc", str(sbd)) == 2
    assert "point --voc at VOCdevkit" in capsys.readouterr().err


def test_check_flags_image_modes_it_cannot_read_faithfully(folder, tmp_path, capsys):
    root, recipe = folder
    grey16 = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1300)
    Image.fromarray(grey16).save(root / "images" / "a.png")          # 16-bit: read, scaled
    Image.fromarray(grey16.astype(np.float32)).save(root / "images" / "b.tiff")  # float: refused
    args = "  args: {image_suffix: .png}\n"
    (root / "images" / "b.png").write_bytes((root / "images" / "b.tiff").read_bytes())
    recipe.write_text(recipe.read_text() + args)
    out = tmp_path / "report"
    assert run("data", "check", str(recipe), "--split", "train", "--out", str(out)) == 1
    problems = pd.read_csv(out / "problems.csv")
    assert problems["path"].map(lambda p: Path(p).name).tolist() == ["b.png"]
    assert problems["kind"].tolist() == ["unreadable"]
    assert "image mode F" in problems.loc[0, "detail"]
    assert "no problems found" not in capsys.readouterr().out


def test_check_refuses_an_unwritable_out_before_scanning(folder, tmp_path, capsys, monkeypatch):
    import emactl.data.check as check_mod

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned before refusing")

    monkeypatch.setattr(check_mod, "check_dataset", no_scan)
    _, recipe = folder
    (tmp_path / "a_file").write_text("x")
    assert run("data", "check", str(recipe), "--out", str(tmp_path / "a_file")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a_file: exists and is not a folder; choose another --out" in err
