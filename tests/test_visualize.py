"""``emactl visualize``: every subcommand writes readable, non-blank PNGs of a known size, and
fails with one clear line when the run holds nothing to draw."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from emactl.cli import main
from emactl.data.shapes import CLASSES
from emactl.engine.checkpoint import checkpoint_path
from emactl.visualize import ablation, bases, confusion, curves, predictions, recon
from emactl.visualize.common import figure_pixels

from runs import tiny_recipe, write_run

SIZE = 32
K = 8


def make_run(run_dir: Path, head: str = "ema") -> Path:
    recipe = tiny_recipe(f"data.crop_size={SIZE}", f"data.args.size={SIZE}", "data.args.val_length=3",
                         "data.args.train_length=4", f"model.head={head}", f"model.ema.bases={K}")
    return write_run(run_dir, {**recipe, "name": run_dir.name}, 10)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "tiny")


def cli(capsys: pytest.CaptureFixture, *args: str) -> list[Path]:
    """Run ``emactl visualize ...`` and return the printed paths."""
    with pytest.raises(SystemExit) as exit_info:
        main(["visualize", *args])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    return [Path(line) for line in captured.out.splitlines() if line.strip()]


def cli_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    """Run a failing command: exit code 2 and exactly one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(["visualize", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error"), err
    return lines[0]


def check_png(path: Path, size: tuple[float, float]) -> None:
    """The file opens, has the pixel size of a ``size``-inch figure, and is not blank."""
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == figure_pixels(*size)
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert pixels.var() > 100.0, f"{path} looks blank (variance {pixels.var():.1f})"


def write_image(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    path = folder / name
    Image.fromarray(rng.integers(0, 255, (SIZE, SIZE + 8, 3), dtype=np.uint8)).save(path)
    return path


# --------------------------------------------------------------------------------------------
# Figures.


def test_bases_dataset_images(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = cli(capsys, "bases", str(run), "--count", "2", "--out", str(tmp_path))
    assert [p.name for p in paths] == ["bases_val_000000.png", "bases_val_000001.png"]
    for path in paths:
        check_png(path, bases.figure_size(bases.DEFAULT_TOP, has_label=True))
    assert figure_pixels(*bases.figure_size(4, True)) == (1200, 600)


def test_bases_chosen_on_image_files(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "imgs"
    write_image(folder, "a.png")
    write_image(folder, "b.jpg")
    paths = cli(capsys, "bases", str(run / "checkpoints" / "iter_0000010.pt"), "--images", str(folder),
                "--bases", "0,3,7", "--out", str(tmp_path / "fig"))
    assert [p.name for p in paths] == ["bases_a.png", "bases_b.png"]
    for path in paths:
        check_png(path, bases.figure_size(3, has_label=False))


def test_recon(run: Path, capsys: pytest.CaptureFixture) -> None:
    paths = cli(capsys, "recon", str(run), "--count", "1")
    assert paths == [run / "figures" / "recon_val_000000.png"]
    check_png(paths[0], recon.FIGSIZE)


def test_predictions(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                     monkeypatch: pytest.MonkeyPatch) -> None:
    legends: list[bool] = []
    real = predictions.class_legend

    def spy(*args, ignore: bool = False, **kwargs):
        legends.append(ignore)
        return real(*args, ignore=ignore, **kwargs)

    monkeypatch.setattr(predictions, "class_legend", spy)
    paths = cli(capsys, "predictions", str(run), "-n", "1", "--out", str(tmp_path))
    assert legends == [True]  # shapes labels object borders 255: the legend has "ignored"
    assert [p.name for p in paths] == ["predictions_val_000000.png"]
    check_png(paths[0], predictions.figure_size(has_label=True))
    image = write_image(tmp_path, "photo.png")
    paths = cli(capsys, "predictions", str(run), "--images", str(image), "--out", str(tmp_path / "x"))
    assert [p.name for p in paths] == ["predictions_photo.png"]
    check_png(paths[0], predictions.figure_size(has_label=False))


def test_confusion(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "eval").mkdir(parents=True)
    counts = np.random.default_rng(0).integers(0, 50, (7, 7)) + np.diag(np.full(7, 400))
    counts[5] = 0  # a class without ground-truth pixels
    df = pd.DataFrame(counts, index=list(CLASSES), columns=list(CLASSES))
    df.index.name = "gt\\pred"
    (run_dir / "eval" / "confusion.csv").write_text(df.to_csv())
    pd.DataFrame([{"aAcc": 90.0, "mAcc": 70.0, "mIoU": 60.0, "fwIoU": 85.0, "iteration": 10}]).to_csv(
        run_dir / "eval" / "summary.csv", index=False)
    paths = cli(capsys, "confusion", str(run_dir))
    assert paths == [run_dir / "figures" / "confusion.png"]
    check_png(paths[0], confusion.figure_size(7))
    assert figure_pixels(*confusion.figure_size(7)) == (750, 600)


def write_metrics(run_dir: Path, val: bool = True) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [{"kind": "train", "iter": i, "loss": 2.0 / i ** 0.3, "lr": 0.01 * (1 - i / 400) ** 0.9,
              "img_per_s": 10.0, "time": float(i)} for i in range(10, 401, 10)]
    if val:
        lines += [{"kind": "val", "iter": i, "aAcc": 80.0, "mAcc": 50.0, "mIoU": 30.0 + i / 20, "fwIoU": 70.0}
                  for i in (100, 200, 300, 400)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "tra')


@pytest.mark.parametrize("val", [True, False])
def test_curves(tmp_path: Path, capsys: pytest.CaptureFixture, val: bool) -> None:
    run_dir = tmp_path / "run"
    write_metrics(run_dir, val)
    paths = cli(capsys, "curves", str(run_dir), "--out", str(tmp_path / "out"))
    assert paths == [tmp_path / "out" / "curves.png"]
    check_png(paths[0], curves.figure_size(has_val=val))


def test_curves_skip_json_lines_that_are_not_records(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    write_metrics(run_dir, val=False)
    text = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text("[1, 2]\n3\nnull\n\"x\"\n" + text.rsplit("\n", 1)[0] + "\n")
    paths = cli(capsys, "curves", str(run_dir), "--out", str(tmp_path / "out"))
    check_png(paths[0], curves.figure_size(has_val=False))


def test_curves_without_mid_run_validation_skip_the_val_panel() -> None:
    lines = [{"kind": "train", "iter": i, "loss": 1.0, "lr": 0.01} for i in range(10, 101, 10)]
    lines.append({"kind": "val", "iter": 100, "mIoU": 84.29})
    fig = curves.curves_figure(lines, "t")
    assert len(fig.axes) == 2
    assert "val mIoU 84.29 % at the end" in fig._suptitle.get_text().replace("\n", " ")


def test_recon_says_which_values_it_does_not_draw(run: Path) -> None:
    from emactl.visualize.samples import forward_record, load_images, load_run, require_ema

    loaded, dev, _ = load_run(run, [], "cpu")
    images = load_images(loaded.recipe, None, None, 1)
    rec = forward_record(loaded, require_ema(loaded, "recon"), images.samples[0].image, dev)
    fig = recon.recon_figure(images.samples[0].image, rec, "t")
    assert "below 1e-07 not drawn" in fig.axes[-1].get_ylabel()


def test_ablation_line_spans_the_seed_spread_and_joins_the_diagonal(tmp_path: Path) -> None:
    rows = [{"train_iters": t, "eval_iters": t, "seed": seed, "mIoU": 80.0 + 0.01 * t + (3.0 if seed else -3.0)}
            for t in (1, 3, 5) for seed in (0, 1)]
    df = pd.DataFrame(rows)
    assert ablation.diagonal(df) and not ablation.diagonal(df.assign(eval_iters=1))
    fig = ablation.eval_iters_figure(df.drop(columns=["train_iters"]), ["eval_iters"], "t")
    lo, hi = fig.axes[0].get_ylim()
    assert hi - lo >= 4 * df.groupby("eval_iters")["mIoU"].std().max() - 1e-9
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    fig_path = ablation.draw_ablation(tmp_path)[0]
    assert fig_path == tmp_path / "figures" / "ablation_eval_iters.png"


def test_ablation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = []
    for train_t in (1, 3):
        for eval_t in (1, 2, 3):
            for norm in ("l2", "none"):
                for seed in (0, 1):
                    rows.append({"train_iters": train_t, "eval_iters": eval_t, "norm": norm, "grad": "none",
                                 "seed": seed, "mIoU": 60 + eval_t + train_t + (norm == "l2") + seed,
                                 "aAcc": 90.0, "mAcc": 70.0, "train_time_s": 1.0, "eval_time_s": 0.5,
                                 "params": 1000})
    rows.append({**rows[0], "mIoU": None})  # a failed cell is left out
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    pd.DataFrame(rows).to_csv(sweep / "results.csv", index=False)
    paths = cli(capsys, "ablation", str(sweep))
    assert paths == [sweep / "figures" / "ablation_eval_iters.png", sweep / "figures" / "ablation_norm.png"]
    check_png(paths[0], ablation.LINE_SIZE)
    check_png(paths[1], ablation.bar_size(2))


def test_ablation_bar_per_axis_from_csv(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    csv = tmp_path / "table.csv"
    pd.DataFrame({"bases_update": ["moving_average", "backprop", "none"], "model.ema.temperature": [1.0, 1.0, 2.0],
                  "seed": [0, 0, 0], "mIoU": [70.1, 69.0, 65.2]}).to_csv(csv, index=False)
    paths = cli(capsys, "ablation", str(csv), "--out", str(tmp_path / "f"))
    assert [p.name for p in paths] == ["ablation_bases_update.png", "ablation_model.ema.temperature.png"]
    check_png(paths[0], ablation.bar_size(3))


def test_latest_run_is_the_default(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    for name, stamp in (("old", 1_000_000), ("new", 2_000_000), ("untrained", 3_000_000)):
        write_metrics(runs / name)
        if name != "untrained":
            ckpt = checkpoint_path(runs / name, 10)
            ckpt.parent.mkdir(parents=True)
            ckpt.write_bytes(b"")
            os.utime(ckpt, (stamp, stamp))
    monkeypatch.chdir(tmp_path)
    assert cli(capsys, "curves") == [Path("runs/new/figures/curves.png")]


# --------------------------------------------------------------------------------------------
# Library pieces.


def test_top_bases_by_spatial_variance() -> None:
    resp = torch.full((4, 4, 5), 0.2)
    resp[:2, :, 3] = 0.9  # basis 3 varies most, then basis 1
    resp[:, :2, 1] = 0.4
    assert bases.choose_bases(resp, None, 2) == [3, 1]
    assert bases.choose_bases(resp, [4, 0], 2) == [4, 0]
    assert bases.choose_bases(resp, None, 99) == bases.choose_bases(resp, None, 5)


def test_top_bases_mark_the_predicted_classes_before_variance() -> None:
    resp = torch.full((4, 4, 5), 0.1)
    resp[:, :, 0] = torch.linspace(0.0, 0.9, 16).reshape(4, 4)  # the largest variance, no class
    resp[1:3, 1:3, 2] = 0.6  # basis 2 lights up on the object
    resp[:, :, 4] = 0.5
    resp[1:3, 1:3, 4] = 0.3  # basis 4: the background, a little higher outside the object
    pred = np.zeros((8, 8), dtype=np.int64)
    pred[2:6, 2:6] = 3  # class 3 on the centre: 16 of 64 image pixels, 4 of 16 feature cells
    assert bases.classes_at(pred, (4, 4))[1:3, 1:3].eq(3).all()
    assert bases.choose_bases(resp, None, 3, pred) == [2, 4]  # the object's strong basis first; no flat filler
    assert bases.choose_bases(resp, None, 1, pred) == [2]
    assert bases.choose_bases(resp, None, 2, np.zeros((8, 8), dtype=np.int64)) == [0, 2]  # one class: variance
    resp[1:3, 1:3, 2] = 0.15  # 0.05 above the outside: does not mark the object
    assert bases.choose_bases(resp, None, 3, pred) == [4]


def test_shared_pca_scales_both_maps_alike() -> None:
    x = torch.randn(6, 5, 7)
    a, b, explained = recon.shared_pca_rgb(x, 3.0 * x)  # same directions, other magnitude
    assert np.allclose(a, b) and a.shape == (5, 7, 3) and 0 < explained <= 1
    rel = recon.spectrum(torch.randn(4, 1, 1) * torch.randn(1, 3, 3))  # rank one
    assert rel[0] == 1 and rel[1] < 1e-6 and recon.energy_rank(rel) == 1


def test_ablation_error_bars_are_std_over_seeds() -> None:
    df = pd.DataFrame({"norm": ["l2"] * 4, "grad": ["none", "full"] * 2, "seed": [0, 0, 1, 1],
                       "mIoU": [70.0, 72.0, 74.0, 76.0]})
    stats = ablation.aggregate(df, ["norm"])
    assert stats["mean"].item() == 73.0 and stats["seeds"].item() == 2
    assert stats["std"].item() == pytest.approx(np.std([71.0, 75.0], ddof=1))


# --------------------------------------------------------------------------------------------
# One-line errors.


def test_error_no_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty_run").mkdir()
    assert "no checkpoints" in cli_error(capsys, "bases", str(tmp_path / "empty_run"))


def test_error_no_runs(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert "no run directory with checkpoints" in cli_error(capsys, "recon")


@pytest.mark.parametrize("command", ["bases", "recon"])
def test_error_model_without_ema(tmp_path: Path, capsys: pytest.CaptureFixture, command: str) -> None:
    run_dir = make_run(tmp_path / "fcn_run", head="fcn")
    assert "has no EMA unit" in cli_error(capsys, command, str(run_dir))


def test_error_bad_bases(run: Path, capsys: pytest.CaptureFixture) -> None:
    assert f"K={K}" in cli_error(capsys, "bases", str(run), "--bases", "1,99")
    assert "exclude each other" in cli_error(capsys, "bases", str(run), "--bases", "1", "--top", "2")
    assert "--bases" in cli_error(capsys, "bases", str(run), "--bases", "a,b")


def test_error_no_metrics(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert "no metrics.jsonl" in cli_error(capsys, "curves", str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"kind": "val", "iter": 5, "mIoU": 1.0}\n')
    assert "no training records" in cli_error(capsys, "curves", str(tmp_path))


def test_error_no_confusion(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert "run `emactl eval" in cli_error(capsys, "confusion", str(tmp_path))


def test_error_empty_ablation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    csv = tmp_path / "results.csv"
    csv.write_text("")
    assert "empty" in cli_error(capsys, "ablation", str(tmp_path))
    csv.write_text("train_iters,eval_iters,seed,mIoU\n")
    assert "no completed cells" in cli_error(capsys, "ablation", str(csv))
    csv.write_text("train_iters,eval_iters,seed,mIoU\n3,3,0,70.0\n")
    assert "nothing to compare" in cli_error(capsys, "ablation", str(csv))
    assert "no such sweep directory" in cli_error(capsys, "ablation", str(tmp_path / "nowhere"))
