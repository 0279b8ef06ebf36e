"""The synthetic ``shapes`` dataset: determinism, labels, borders, and its global scene cue."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from emactl.config import DataConfig
from emactl.data import build_dataset
from emactl.data.shapes import CLASSES, SCENES, SHAPES, border_mask, class_index, wave_field
from emactl.errors import UserError


def cfg(**args) -> DataConfig:
    return DataConfig(name="shapes", num_classes=7, crop_size=32,
                      args={"train_length": 8, "val_length": 4, "size": 32, **args})


def test_classes():
    assert len(CLASSES) == 7 == 1 + len(SHAPES) * len(SCENES)
    assert CLASSES[class_index(2, 1)] == "triangle_cool"
    ds = build_dataset(cfg(), "train", False)
    assert ds.class_names == list(CLASSES) and ds.num_classes == 7


def test_same_seed_same_sample_and_index_split_seed_change_it():
    a = build_dataset(cfg(), "train", False)
    b = build_dataset(cfg(), "train", True)
    s0, s0b = a.load(3), b.load(3)
    assert np.array_equal(s0.image, s0b.image) and np.array_equal(s0.label, s0b.label)
    assert not np.array_equal(a.load(4).image, s0.image)
    val = build_dataset(cfg(), "val", False)
    assert not np.array_equal(val.load(3).image, s0.image)
    other = build_dataset(cfg(seed=1), "train", False)
    assert not np.array_equal(other.load(3).image, s0.image)


def test_lengths_per_split():
    assert len(build_dataset(cfg(), "train", True)) == 8
    assert len(build_dataset(cfg(), "val", False)) == 4
    with pytest.raises(IndexError):
        build_dataset(cfg(), "val", False).load(4)


def test_labels_in_range_with_ignore_borders():
    ds = build_dataset(cfg(size=48, min_shapes=1, max_shapes=3), "train", False)
    for i in range(len(ds)):
        s = ds.load(i)
        assert s.image.shape == (48, 48, 3) and s.image.dtype == np.uint8
        assert s.label.shape == (48, 48) and s.label.dtype == np.int64
        values = set(np.unique(s.label).tolist())
        assert values <= set(range(7)) | {255} and 255 in values and len(values - {0, 255}) >= 1
        # one scene per image: all objects share it
        scenes = {(v - 1) % 2 for v in values - {0, 255}}
        assert len(scenes) == 1 and scenes == {ds.scene(i)}
        # the ignore pixels are exactly the 1 px band around class changes
        plain = build_dataset(cfg(size=48, min_shapes=1, max_shapes=3, border=0), "train", False).load(i)
        assert np.array_equal(plain.image, s.image)
        assert np.array_equal(s.label, np.where(border_mask(plain.label, 1), 255, plain.label))


def test_border_mask_band():
    label = np.zeros((6, 6), dtype=np.int64)
    label[2:, 2:] = 3
    band = border_mask(label, 1)
    assert band[1, 1] and band[2, 2] and not band[0, 0] and not band[4, 4]
    assert not border_mask(label, 0).any()
    no_border = build_dataset(cfg(border=0), "train", False).load(0).label
    assert 255 not in no_border


def test_wave_field_has_zero_mean_and_unit_std():
    field = wave_field(np.random.default_rng(0), 40, cycles=2)
    assert abs(field.mean()) < 1e-12 and abs(field.std() - 1) < 1e-12


def test_scene_is_readable_globally_but_not_locally():
    """The mean red−blue difference over the image names the scene; a small window does not."""
    args = {"val_length": 60, "size": 64, "min_shapes": 1, "max_shapes": 3, "noise": 0.08, "cue": 0.05,
            "clutter": 0.2, "texture": 0.06, "cue_on": "image", "min_radius": 0.12, "max_radius": 0.22}
    ds = build_dataset(DataConfig(name="shapes", num_classes=7, args=args), "val", False)
    global_hits, local_hits = 0, 0
    for i in range(len(ds)):
        s = ds.load(i)
        diff = s.image[..., 0].astype(float) - s.image[..., 2]
        sign = 1 if ds.scene(i) == 0 else -1
        global_hits += np.sign(diff.mean()) == sign
        local_hits += np.sign(diff[24:40, 24:40].mean()) == sign
    assert global_hits == len(ds)
    assert local_hits < 0.85 * len(ds)


def test_getitem_tensors():
    x, y = build_dataset(cfg(), "train", True)[0]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64


def test_num_classes_must_be_seven():
    with pytest.raises(UserError, match="data.num_classes=21 but dataset shapes has 7 classes"):
        build_dataset(DataConfig(name="shapes"), "train", False)


def test_knob_validation():
    with pytest.raises(UserError, match=r"data.args.max_shapes: must be >= data.args.min_shapes"):
        build_dataset(cfg(min_shapes=3, max_shapes=2), "train", False)
    with pytest.raises(UserError, match=r"data.args.size: must be >= 16, got 8"):
        build_dataset(cfg(size=8), "train", False)
    with pytest.raises(UserError, match=r"data.args.noise: got 'high'; expected a number"):
        build_dataset(cfg(noise="high"), "train", False)
    ds = build_dataset(cfg(noise=0, cue=0.2, clutter=0), "train", False)  # ints accepted
    assert len(ds) == 8


def test_cue_on_objects_marks_objects_not_background():
    """With ``cue_on=objects`` the objects' mean red−blue names the scene; the background's is 0."""
    ds = build_dataset(cfg(cue_on="objects", cue=0.1, clutter=0.02, noise=0.02, min_shapes=3,
                           max_shapes=4, size=48, val_length=12), "val", False)
    for i in range(len(ds)):
        sample = ds.load(i)
        red_blue = sample.image[..., 0].astype(float) - sample.image[..., 2].astype(float)
        objects = (sample.label > 0) & (sample.label != 255)
        background = sample.label == 0
        sign = 1 if ds.scene(i) == 0 else -1
        assert sign * red_blue[objects].mean() > 0.05 * 255
        assert abs(red_blue[background].mean()) < 0.02 * 255


def test_object_radius_options():
    """Shapes drawn with ``min_radius == max_radius == 0.2`` at 50 px fit a 20-px box."""
    ds = build_dataset(cfg(size=50, min_shapes=1, max_shapes=1, min_radius=0.2, max_radius=0.2,
                           border=0, val_length=6), "val", False)
    for i in range(len(ds)):
        rows, cols = (ds.load(i).label > 0).nonzero()
        assert 14 <= rows.max() - rows.min() + 1 <= 21
        assert 14 <= cols.max() - cols.min() + 1 <= 21
    with pytest.raises(UserError, match=r"data.args.max_radius: must be in \[data.args.min_radius, 0.5\]"):
        build_dataset(cfg(min_radius=0.2, max_radius=0.1), "val", False)


def test_demo_recipe_scene_needs_pooling_over_objects():
    """In the demo's data one object tells its scene ~75 % of the time, all of them > 90 %."""
    from scipy import ndimage

    from emactl.config import load_recipe

    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "shapes.yaml")
    ds = build_dataset(recipe.data, "val", False)
    per_object, per_image = [], []
    for i in range(40):
        sample = ds.load_raw(i)
        sign = 1 if ds.scene(i) == 0 else -1
        red_blue = sample.image[..., 0].astype(float) - sample.image[..., 2].astype(float)
        objects = (sample.label > 0) & (sample.label != 255)
        components, count = ndimage.label(objects)
        per_object += [sign * red_blue[components == j].mean() > 0 for j in range(1, count + 1)]
        per_image.append(sign * red_blue[objects].mean() > 0)
    assert len(per_object) > 250
    assert 0.65 <= np.mean(per_object) <= 0.85
    assert np.mean(per_image) >= 0.9


def test_unknown_cue_on_is_refused():
    with pytest.raises(UserError, match="data.args.cue_on"):
        build_dataset(cfg(cue_on="sky"), "val", False)
