"""``emactl predict``: palette-PNG masks and overlays for a folder of images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emactl.engine.checkpoint import checkpoint_path
from emactl.predict import blend

from cli_run import cli, one_line_error
from runs import TINY, tiny_recipe, write_run

NUM_CLASSES = TINY["data"]["num_classes"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("runs") / "tiny", tiny_recipe("eval.flip=true"), 1)


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(folder / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (17, 24, 3), dtype=np.uint8)).save(folder / "b.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_writes_palette_masks_and_overlays(run_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = cli(["predict", str(run_dir), str(images), "--out", str(out), "--overlay",
                           "--alpha", "0.4", "--device", "cpu", "--no-progress"], capsys)
    assert code == 0 and "wrote 2 masks" in stdout
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png"]
    for stem, size in (("a", (28, 20)), ("b", (24, 17))):
        with Image.open(out / f"{stem}.png") as mask:
            assert mask.mode == "P" and mask.size == size
            values = np.asarray(mask)
            assert values.min() >= 0 and values.max() < NUM_CLASSES
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a.jpg", "b.png"]
    with Image.open(out / "overlays" / "b.png") as over, Image.open(images / "b.png") as src, \
            Image.open(out / "b.png") as mask:
        assert over.mode == "RGB" and over.size == src.size
        palette = np.asarray(mask.getpalette(), dtype=np.uint8).reshape(-1, 3)
        want = blend(np.asarray(src), np.asarray(mask).astype(np.int64), palette, 0.4)
        assert np.array_equal(np.asarray(over), want)
    assert (out / "recipe.yaml").is_file()


def test_predict_single_file(run_dir, images, tmp_path, capsys):
    out = tmp_path / "one"
    code, _, _ = cli(["predict", str(checkpoint_path(run_dir, 1)), str(images / "a.jpg"), "--out", str(out),
                      "--device", "cpu", "--no-progress"], capsys)
    assert code == 0 and (out / "a.png").is_file() and not (out / "overlays").exists()


def test_corrupt_image_is_named(run_dir, images, tmp_path, capsys):
    (images / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, _, err = cli(["predict", str(run_dir), str(images), "--out", str(tmp_path / "o"),
                        "--device", "cpu", "--no-progress"], capsys)
    assert "c.png" in one_line_error(code, err)


def test_empty_folder_and_bad_alpha(run_dir, tmp_path, images, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli(["predict", str(run_dir), str(empty), "--out", str(tmp_path / "o")], capsys)
    assert "no images" in one_line_error(code, err)
    code, _, err = cli(["predict", str(run_dir), str(images), "--out", str(tmp_path / "o"), "--alpha", "2"], capsys)
    assert "--alpha" in one_line_error(code, err)


def test_refuses_to_overwrite_inputs(run_dir, images, capsys):
    code, _, err = cli(["predict", str(run_dir), str(images), "--out", str(images)], capsys)
    assert "overwrite" in one_line_error(code, err)


def test_palette_comes_from_the_dataset_class():
    from emactl.config import from_dict
    from emactl.data.classes import CITYSCAPES_COLOURS
    from emactl.data.palette import voc_palette
    from emactl.predict import dataset_palette

    city = dataset_palette(from_dict({"data": {"name": "cityscapes", "num_classes": 19}}))
    assert city[:19].tolist() == [list(c) for c in CITYSCAPES_COLOURS]
    assert (dataset_palette(from_dict({"data": {"name": "shapes", "num_classes": 7}})) == voc_palette()).all()


@pytest.mark.parametrize("where", ["a_file", "a_file/sub", "/proc/emactl"])
def test_unwritable_out_is_refused_before_predicting(run_dir, images, tmp_path, capsys, monkeypatch, where):
    import emactl.predict as predict_mod

    def no_work(*args, **kwargs):
        raise AssertionError("predicted before refusing")

    monkeypatch.setattr(predict_mod, "predict_images", no_work)
    (tmp_path / "a_file").write_text("x")
    out = Path(where) if where.startswith("/") else tmp_path / where
    code, _, err = cli(["predict", str(run_dir), str(images), "--out", str(out), "--no-progress"], capsys)
    line = one_line_error(code, err)
    assert str(out if where != "a_file/sub" else tmp_path / "a_file/sub") in line and "--out" in line
