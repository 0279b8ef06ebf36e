"""``emactl eval`` end to end on a tiny model and the synthetic ``shapes`` set, plus the loop."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from emactl.config import EvalConfig
from emactl.engine.checkpoint import checkpoint_path
from emactl.engine.evaluate import SUMMARY_COLUMNS, evaluate, load_for_eval
from emactl.engine.metrics import compute_metrics
from emactl.nn.emanet import ema_units, set_eval_iters
from emactl.visualize.confusion import _summary_note, draw_confusion, find_confusion

from gloo import run_gloo_workers

from cli_run import cli, one_line_error
from runs import tiny_recipe, write_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory holding one checkpoint of an untrained tiny EMANet on ``shapes``."""
    return write_run(tmp_path_factory.mktemp("runs") / "tiny", tiny_recipe("data.args.size=32",
                                                                          "data.args.val_length=3"), 7)


def test_eval_run_dir_writes_and_prints_tables(run_dir, capsys):
    code, out, _ = cli(["eval", str(run_dir), "--device", "cpu", "--no-progress"], capsys)
    assert code == 0
    eval_dir = run_dir / "eval" / "val_whole_s1_T3_it7"
    for name in ("summary.csv", "summary.md", "per_class.csv", "per_class.md", "confusion.csv", "recipe.yaml"):
        assert (eval_dir / name).is_file(), name
    assert "mIoU" in out and "per class" in out and "circle_warm" in out

    summary = pd.read_csv(eval_dir / "summary.csv")
    per_class = pd.read_csv(eval_dir / "per_class.csv")
    confusion = pd.read_csv(eval_dir / "confusion.csv", index_col=0)
    assert confusion.index.name == "gt\\pred"
    assert list(confusion.columns) == list(confusion.index) == per_class["class"].tolist()
    assert per_class["class"].tolist()[:2] == ["background", "circle_warm"]
    assert confusion.to_numpy().sum() > 0
    expect, expect_per_class = compute_metrics(torch.tensor(confusion.to_numpy()))
    for key in ("aAcc", "mAcc", "mIoU", "fwIoU"):
        assert summary[key][0] == pytest.approx(expect[key], nan_ok=True)
    assert per_class["pixels"].tolist() == expect_per_class["pixels"].tolist()
    assert summary["images"][0] == 3 and summary["iteration"][0] == 7
    assert summary["checkpoint"][0].endswith("iter_0000007.pt")


def test_eval_checkpoint_file_with_iters_and_ms_flip(run_dir, tmp_path, capsys):
    ckpt = checkpoint_path(run_dir, 7)
    out_dir = tmp_path / "out"
    code, _, _ = cli(["eval", str(ckpt), "--iters", "5", "--scales", "0.75,1", "--flip", "--mode", "slide",
                      "--out", str(out_dir), "--device", "cpu", "--no-progress"], capsys)
    assert code == 0
    summary = pd.read_csv(out_dir / "summary.csv")
    assert summary["em_iters"][0] == 5
    assert summary["scales"][0] == "0.75,1.0" and bool(summary["flip"][0]) is True
    assert summary["mode"][0] == "slide" and summary["crop_size"][0] == 32


def test_iters_reach_the_ema_units(run_dir):
    run, _, _ = load_for_eval(run_dir, [], iters=6, device="cpu")
    assert [u.eval_iters for u in ema_units(run.model)] == [6]
    assert not run.model.training
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        six = run.model(x)["out"]
        set_eval_iters(run.model, 1)
        one = run.model(x)["out"]
    assert not torch.allclose(six, one)
    run, _, _ = load_for_eval(run_dir, ["eval.iters=2"], device="cpu")
    assert [u.eval_iters for u in ema_units(run.model)] == [2]
    run, _, _ = load_for_eval(run_dir, [], device="cpu")
    assert [u.eval_iters for u in ema_units(run.model)] == [3]


def test_checkpoint_in_run_dir_writes_to_run_eval(run_dir, capsys):
    setting = run_dir / "eval" / "val_whole_s1_T2_it7"
    code, _, _ = cli(["eval", str(checkpoint_path(run_dir, 7)), "--iters", "2", "--device", "cpu", "--no-progress"],
                     capsys)
    assert code == 0 and (setting / "summary.csv").is_file()


def test_each_setting_has_its_own_folder_and_training_tables_stay(trained_run_copy, capsys):
    """A multi-scale eval after training writes eval/<setting>/ and leaves the training's eval/ alone;
    both summaries have the same columns, and the confusion figures say which evaluation they show."""
    run = trained_run_copy
    trained = {p.name: p.read_bytes() for p in (run / "eval").iterdir() if p.is_file()}
    assert {"summary.csv", "per_class.csv", "confusion.csv"} <= set(trained)

    code, out, err = cli(["eval", str(run), "--scales", "0.75,1.0,1.25", "--flip", "--device", "cpu",
                          "--no-progress"], capsys)
    assert code == 0
    setting = run / "eval" / "val_whole_s0.75-1-1.25_flip_T3_it2"
    assert (setting / "summary.csv").is_file() and (setting / "confusion.csv").is_file()
    assert {p.name: p.read_bytes() for p in (run / "eval").iterdir() if p.is_file()} == trained
    assert str(setting) in err and "scales 0.75/1/1.25 + flip" in out

    ours, theirs = pd.read_csv(run / "eval" / "summary.csv"), pd.read_csv(setting / "summary.csv")
    assert list(ours.columns) == list(theirs.columns) == list(SUMMARY_COLUMNS)
    assert ours["setting"][0] == "val_whole_s1_T3_it2" and theirs["setting"][0] == setting.name
    assert ours["checkpoint"][0] == theirs["checkpoint"][0] == "checkpoints/iter_0000002.pt"  # the run can move

    assert draw_confusion(run)[0].name == "confusion.png"
    assert draw_confusion(run, setting=setting.name)[0].name == f"confusion_{setting.name}.png"
    assert "single scale" in _summary_note(find_confusion(run)[0])
    assert "scales 0.75/1/1.25 + flip" in _summary_note(find_confusion(run, setting.name)[0])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "model.head_channels=32"], "incompatible checkpoint"),
        (["--scales", "abc"], "--scales"),
        (["--scales", "1,-2"], "--scales"),
        (["--iters", "0"], "--iters"),
        (["--mode", "tiles"], "--mode"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_options_are_one_line_errors(run_dir, capsys, args, message):
    code, _, err = cli(["eval", str(run_dir), "--no-progress", *args], capsys)
    assert message in one_line_error(code, err)


def test_eval_into_a_run_in_use_is_refused_and_an_unwritable_out_before_the_work(
    run_dir, tmp_path, capsys, monkeypatch
):
    from emactl.engine import evaluate as evaluate_mod
    from emactl.io import folder_lock

    def no_work(*args, **kwargs):
        raise AssertionError("evaluated before refusing")

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with monkeypatch.context() as m:
        m.setattr(evaluate_mod, "evaluate", no_work)
        code, _, err = cli(["eval", str(run_dir), "--out", str(a_file), "--device", "cpu", "--no-progress"], capsys)
        assert "a_file: exists and is not a folder; choose another --out" in one_line_error(code, err)
        with folder_lock(run_dir, "emactl train", "wait"):
            code, _, err = cli(["eval", str(run_dir), "--device", "cpu", "--no-progress"], capsys)
            line = one_line_error(code, err)
            assert f"in use by pid {os.getpid()} on " in line and "(emactl train)" in line and "--out" in line
    with folder_lock(run_dir, "emactl train", "wait"):  # writing elsewhere does not need the run
        code, _, _ = cli(["eval", str(run_dir), "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"],
                         capsys)
        assert code == 0 and (tmp_path / "o" / "summary.csv").is_file()


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    good = checkpoint_path(run, 7)
    good.parent.mkdir(parents=True)
    good.write_bytes(checkpoint_path(run_dir, 7).read_bytes())
    checkpoint_path(run, 9).write_bytes(good.read_bytes()[:500])
    code, _, err = cli(["eval", str(run), "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    assert f"{checkpoint_path(run, 9)}: cannot load checkpoint" in err
    assert f"using {good} instead (remove iter_0000009.pt" in err
    (summary,) = (run / "eval").glob("*/summary.csv")  # emactl eval: one folder per setting
    assert pd.read_csv(summary)["checkpoint"][0].endswith(good.name)
    good.write_bytes(b"garbage")
    code, _, err = cli(["eval", str(run), "--device", "cpu", "--no-progress"], capsys)
    line = one_line_error(code, err)
    assert str(checkpoint_path(run, 9)) in line and "remove them" in line


def test_bad_file_with_workers_in_eval_stops_them(tmp_path):
    import multiprocessing

    import numpy as np
    from PIL import Image

    from emactl.config import DataConfig
    from emactl.data import build_dataset, save_palette_png, voc_palette
    from emactl.errors import UserError

    root = tmp_path / "data"
    for i in range(4):
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / f"v{i}.jpg")
        save_palette_png(root / "masks" / f"v{i}.png", np.zeros((8, 8), np.uint8), voc_palette())
    (root / "images" / "v2.jpg").write_bytes((root / "images" / "v2.jpg").read_bytes()[:200])
    (root / "splits").mkdir()
    (root / "splits" / "val.txt").write_text("v0\nv1\nv2\nv3\n")
    data = build_dataset(DataConfig(name="folder", root=str(root), num_classes=3, crop_size=8), "val", False)
    with pytest.raises(UserError, match="v2.jpg: cannot read image") as info:
        evaluate(nn.Conv2d(3, 3, 1), data, EvalConfig(), 3, 255, "cpu", progress=False, workers=2)
    assert "\n" not in str(info.value)
    assert multiprocessing.active_children() == []


def test_corrupt_and_missing_checkpoints(tmp_path, capsys):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"definitely not a checkpoint")
    code, _, err = cli(["eval", str(bad), "--no-progress"], capsys)
    assert "cannot load checkpoint" in one_line_error(code, err)
    code, _, err = cli(["eval", str(tmp_path / "nope"), "--no-progress"], capsys)
    assert "nope" in one_line_error(code, err)


class ListDataset(torch.utils.data.Dataset):
    """Images of mixed sizes with labels that make a pixel-wise model half right."""

    def __init__(self, sizes: list[tuple[int, int]]) -> None:
        gen = torch.Generator().manual_seed(3)
        self.items = []
        for h, w in sizes:
            label = torch.randint(0, 3, (h, w), generator=gen)
            label[0, 0] = 255
            self.items.append((torch.randn(3, h, w, generator=gen), label))
        self.class_names = ["a", "b", "c"]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


SIZES = [(5, 6), (5, 6), (4, 7), (5, 6), (3, 3)]


def test_batches_of_mixed_sizes_match_single_images():
    model, data = nn.Conv2d(3, 3, 1), ListDataset(SIZES)
    one = evaluate(model, data, EvalConfig(batch_size=1), 3, 255, "cpu", progress=False)
    many = evaluate(model, data, EvalConfig(batch_size=3), 3, 255, "cpu", progress=False)
    assert torch.equal(one.confusion, many.confusion)
    assert one.confusion.sum() == sum(h * w - 1 for h, w in SIZES)
    assert one.per_class["class"].tolist() == ["a", "b", "c"]
    assert model.training  # evaluate restores the mode it found


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        result = evaluate(nn.Conv2d(3, 3, 1), ListDataset(SIZES), EvalConfig(batch_size=2), 3, 255, "cpu",
                          progress=False)
        torch.save(result.confusion, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_eval_counts_every_image_once(tmp_path):
    """Two gloo ranks split 5 images 3/2 and all-reduce to the single-process confusion."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    world = 2
    run_gloo_workers(_dist_worker, tmp_path, world, timeout=120)

    torch.manual_seed(0)
    single = evaluate(nn.Conv2d(3, 3, 1), ListDataset(SIZES), EvalConfig(), 3, 255, "cpu", progress=False)
    for rank in range(world):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), single.confusion)


def test_setting_names_tell_every_setting_apart():
    from emactl.engine.evaluate import describe_setting, setting_name

    whole = {"split": "val", "mode": "whole", "scales": [1.0], "flip": False, "em_iters": 3, "iteration": 10}
    assert setting_name(whole) == "val_whole_s1_T3_it10"
    slide = {**whole, "mode": "slide", "crop_size": 769, "stride": 513, "scales": [0.5, 1.75], "flip": True}
    assert setting_name(slide) == "val_slide769x513_s0.5-1.75_flip_T3_it10"
    assert setting_name({**whole, "em_iters": None, "split": "test"}) == "test_whole_s1_it10"
    assert describe_setting({**slide, "scales": "0.5,1.75"}) == (
        "sliding window, scales 0.5/1.75 + flip, T=3, iteration 10")
