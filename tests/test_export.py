"""``emactl export``: ONNX / TorchScript / torch.export of tiny runs of every head and of an
imported original-code run, checked against eager PyTorch and ``emactl predict``."""
from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from emactl.engine.evaluate import load_for_eval
from emactl.engine.inference import predict_logits
from emactl.errors import UserError
from emactl.export import (
    AdaptiveAvgPool,
    OnnxModel,
    compare,
    export_network,
    export_run,
    fold_batchnorm,
    sample_image,
)
from emactl.importer import import_checkpoint
from emactl.nn.ema import EMAU
from emactl.nn.heads import CONTEXTS
from emactl.predict import normalise, predict_images

from cli_run import cli, one_line_error
from runs import randomise, tiny_recipe, write_run

from test_importer import original  # noqa: F401  (a module fixture: a small original-code checkpoint)

HEADS = tuple(CONTEXTS.names())


def recipe_dict(head: str, pad_multiple: int | None = 8) -> dict:
    return tiny_recipe(f"name=tiny_{head}", "data.args.size=32", f"model.head={head}", "model.ema.iters=3",
                       "model.ema.eval_iters=2", f"eval.pad_multiple={'null' if pad_multiple is None else pad_multiple}")


def make_run(root: Path, head: str, pad_multiple: int | None = 8) -> Path:
    return write_run(root, recipe_dict(head, pad_multiple), 5, prepare=lambda model: randomise(model, seed=len(head)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("export_runs")
    return {head: make_run(base / head, head) for head in HEADS}




# --------------------------------------------------------------------------------------------
# The pieces: BN folding, exportable adaptive pooling, the EMA unit while tracing.


def test_fold_batchnorm_keeps_the_networks_output(runs):
    run, _, _ = load_for_eval(runs["psp"], [], device="cpu")
    x = torch.randn(1, 3, 29, 35)
    with torch.no_grad():
        expected = run.model(x)["out"]
        folded = export_network(run.model, None)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.model.backbone.modules())
        assert torch.allclose(folded(x), expected, rtol=1e-4, atol=1e-5)
    assert fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)).eval()) == 0


@pytest.mark.parametrize("bins", [1, 2, 3, 6, (2, 5)])
def test_adaptive_pool_matches_torch(bins):
    x = torch.randn(2, 3, 13, 17)
    assert torch.allclose(AdaptiveAvgPool(bins)(x), nn.AdaptiveAvgPool2d(bins)(x), atol=1e-6)


def test_ema_unit_traces_a_plain_graph_and_keeps_eager_numerics():
    unit = EMAU(8, bases=4, iters=3).eval()
    x, other = torch.randn(1, 8, 9, 11), torch.randn(1, 8, 12, 7)
    with torch.no_grad():
        eager = unit(x).clone()
        traced = torch.jit.trace(unit, (x,), check_trace=False)
        again = unit(x)
        # traced at 9x11 (where eager folds conv1 into the products), replayed at another size
        assert torch.allclose(traced(other), unit(other), rtol=1e-5, atol=1e-6)
    assert unit.folds(9 * 11)
    assert torch.equal(again, eager)
    assert "aten::baddbmm" not in str(traced.inlined_graph)  # conv1 is not folded in the graph


# --------------------------------------------------------------------------------------------
# ONNX: every head round-trips; metadata; emactl predict on the .onnx file.


@pytest.mark.parametrize("head", HEADS)
def test_onnx_round_trips_every_head(runs, head, tmp_path):
    path = tmp_path / f"{head}.onnx"
    agreement = export_run(runs[head], "onnx", path, dynamic=True)
    assert agreement is not None and agreement.ok
    assert agreement.mask >= 0.999 and agreement.logits <= 1e-4
    assert agreement.size != (32, 32)  # checked at a size other than the traced one

    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(meta["std"]) == pytest.approx([0.229, 0.224, 0.225])
    assert "input_scale" not in meta  # emactl networks take input scaled to 0-1
    assert json.loads(meta["classes"])[:2] == ["background", "circle_warm"]
    assert json.loads(meta["em_iters"]) == (2 if head == "ema" else None)
    assert json.loads(meta["pad_multiple"]) == 8

    # any runtime: normalise with the metadata, one float32 NCHW tensor in, logits at input size out
    image = sample_image((27, 44), seed=3)
    mean, std = np.array(json.loads(meta["mean"])), np.array(json.loads(meta["std"]))
    x = ((image / 255.0 - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)
    import onnxruntime

    logits = onnxruntime.InferenceSession(str(path)).run(None, {"image": x})[0]
    assert logits.shape == (1, 7, 27, 44) and logits.dtype == np.float32
    run, cfg, _ = load_for_eval(runs[head], [], device="cpu")
    reference = predict_logits(run.model, normalise(image, run.recipe), cfg, 7)
    mask, err = compare(torch.from_numpy(logits), reference)
    assert mask >= 0.999 and err <= 1e-4


def test_export_cli_prints_both_figures_and_fixed_size_refuses_others(runs, tmp_path, capsys):
    path = tmp_path / "fixed.onnx"
    code, out, _ = cli(["export", str(runs["ema"]), "--format", "onnx", "--out", str(path), "--size", "24", "40"], capsys)
    assert code == 0, out
    assert "on a 24x40 sample" in out and "masks agree on 100.000% of pixels" in out and "relative logit error" in out
    model = OnnxModel(path)
    assert model(torch.zeros(1, 3, 24, 40)).shape == (1, 7, 24, 40)
    with pytest.raises(UserError, match="exported for 24x40 input"):
        model(torch.zeros(1, 3, 25, 40))


def test_predict_accepts_an_exported_onnx_file(runs, tmp_path):
    path = tmp_path / "ema.onnx"
    export_run(runs["ema"], "onnx", path, dynamic=True, check=False)
    images = tmp_path / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(33, 40), (21, 26)]):
        Image.fromarray(sample_image((h, w), seed=i)).save(images / f"im{i}.png")
    predict_images(runs["ema"], images, tmp_path / "torch", device="cpu", progress=False)
    predict_images(path, images, tmp_path / "onnx", progress=False)
    for i in range(2):
        a = np.array(Image.open(tmp_path / "torch" / f"im{i}.png"))
        b = np.array(Image.open(tmp_path / "onnx" / f"im{i}.png"))
        assert a.shape == b.shape and (a == b).mean() >= 0.999


def test_predict_on_onnx_replays_flip(runs, tmp_path):
    """Flip is not in the graph: emactl predict replays the stored eval settings around it."""
    path = tmp_path / "flip.onnx"
    export_run(runs["conv3x3"], "onnx", path, dynamic=True, overrides=["eval.flip=true"], check=False)
    image = sample_image((30, 35), seed=5)
    run, cfg, _ = load_for_eval(runs["conv3x3"], ["eval.flip=true"], device="cpu")
    from emactl.predict import load_predictor

    session, recipe, onnx_cfg, _ = load_predictor(path, [], "cpu")
    assert onnx_cfg.flip and onnx_cfg.pad_multiple is None
    ours = predict_logits(session, normalise(image, recipe), onnx_cfg, 7)
    reference = predict_logits(run.model, normalise(image, run.recipe), cfg, 7)
    mask, err = compare(ours, reference)
    assert mask >= 0.999 and err <= 1e-4


def test_predict_on_onnx_replays_sliding_windows(runs, tmp_path):
    """Windows of 17 = 2·8 + 1 pixels over a view padded to 8k + 1: the graph's own padding is
    then a no-op, so emactl predict on the .onnx file matches it on the run."""
    overrides = ["eval.mode=slide", "eval.crop_size=17", "eval.stride=11"]
    agreement = export_run(runs["ema"], "onnx", tmp_path / "slide.onnx", dynamic=True, overrides=overrides)
    assert agreement is not None and agreement.ok and min(agreement.size) > 17


# --------------------------------------------------------------------------------------------
# TorchScript and torch.export.


@pytest.mark.parametrize("fmt", ["torchscript", "exported"])
def test_torchscript_and_torch_export_match_eager_at_another_size(runs, fmt, tmp_path):
    path = tmp_path / f"ema.{fmt}"
    assert export_run(runs["ema"], fmt, path, dynamic=True) is None
    model = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    run, cfg, _ = load_for_eval(runs["ema"], [], device="cpu")
    x = normalise(sample_image((37, 29), seed=1), run.recipe)
    with torch.no_grad():
        ours = model(x)
    mask, err = compare(ours, predict_logits(run.model, x, cfg, 7))
    assert ours.shape == (1, 7, 37, 29) and mask >= 0.999 and err <= 1e-4


# --------------------------------------------------------------------------------------------
# An imported original-code run: deep stem, pad to 8k+1, align_corners=True, mean = std.


def test_onnx_round_trips_an_imported_original_run(original, tmp_path):  # noqa: F811
    run_dir = import_checkpoint("original", original[1], "orig", tmp_path)
    agreement = export_run(run_dir, "onnx", tmp_path / "orig.onnx", size=(36, 43))
    assert agreement is not None and agreement.ok
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "orig.onnx")).metadata_props}
    assert json.loads(meta["align_corners"]) is True and json.loads(meta["pad_multiple"]) == 8
    assert json.loads(meta["std"]) == json.loads(meta["mean"])


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2.


def test_bad_options_are_one_line_errors(runs, tmp_path, capsys):
    run = str(runs["fcn"])
    out = str(tmp_path / "m.onnx")
    line = one_line_error(*cli(["export", run, "--format", "tflite", "--out", out], capsys)[::2])
    assert "--format" in line and "onnx, torchscript, exported" in line
    line = one_line_error(*cli(["export", run, "--format", "onnx", "--out", out, "--size", "8", "8", "--dynamic"],
                               capsys)[::2])
    assert "--size and --dynamic" in line
    line = one_line_error(*cli(["export", run, "--format", "onnx", "--out", str(tmp_path), "--dynamic"], capsys)[::2])
    assert "is a folder" in line
    line = one_line_error(*cli(["export", run, "--format", "onnx", "--out", out, "--size", "8", "8",
                                "--set", "eval.flip=true"], capsys)[::2])
    assert "--dynamic" in line
    Image.fromarray(sample_image((9, 9))).save(tmp_path / "im.png")
    line = one_line_error(*cli(["predict", str(tmp_path / "missing.onnx"), str(tmp_path), "--out",
                                str(tmp_path / "o")], capsys)[::2])
    assert "no such ONNX file" in line
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_a_missing_extra_names_it(runs, tmp_path, capsys, monkeypatch, missing):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == missing:
            raise ImportError(f"No module named {missing!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    code, _, err = cli(["export", str(runs["fcn"]), "--format", "onnx", "--out", str(tmp_path / "m.onnx")], capsys)
    line = one_line_error(code, err)
    assert 'pip install -e ".[export]"' in line
    assert not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------------------------
# emactl profile --sections export.


def test_profile_export_section_times_both_runtimes(tmp_path, capsys):
    code, out, _ = cli(["profile", "--device", "cpu", "--sections", "export", "--backbone", "tiny", "--crop", "33",
                        "--channels", "16", "--bases", "4", "--repeats", "1", "--threads", "1", "--out",
                        str(tmp_path)], capsys)
    assert code == 0, out
    import pandas as pd

    table = pd.read_csv(tmp_path / "export.csv")
    assert table["runtime"].tolist() == ["eager PyTorch", "onnxruntime"]
    assert (table["threads"] == 1).all() and (table["latency ms"] > 0).all()
    assert table["mask agreement %"][1] >= 99.9 and table["max rel. logit error"][1] <= 1e-4


def test_profile_export_is_opt_in_and_refuses_what_it_cannot_compare(tmp_path, capsys):
    from emactl.profile.report import DEFAULT_SECTIONS, SECTIONS
    from emactl.profile.settings import ProfileSettings

    assert "export" in SECTIONS and "export" not in DEFAULT_SECTIONS
    assert ProfileSettings().sections == DEFAULT_SECTIONS
    code, _, err = cli(["profile", "--device", "cpu", "--dtype", "bf16", "--sections", "export", "--out",
                        str(tmp_path)], capsys)
    assert "fp32" in one_line_error(code, err)


def test_an_onnx_file_that_disagrees_is_not_written(runs, tmp_path, capsys, monkeypatch):
    import emactl.export

    monkeypatch.setattr(emactl.export, "LOGIT_TOLERANCE", 0.0)  # no float32 graph is exact
    path = tmp_path / "m.onnx"
    code, _, err = cli(["export", str(runs["fcn"]), "--format", "onnx", "--out", str(path), "--size", "20", "24"], capsys)
    line = one_line_error(code, err)
    assert "not written" in line and "masks agree on" in line and "relative logit error" in line
    assert list(tmp_path.iterdir()) == []
