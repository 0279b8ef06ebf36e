"""The trainer: run directory, exact resume, NaN stop, signals, AMP, compile fallback, CLI errors.

Everything runs on the CPU with the tiny backbone, 32 px crops and the synthetic ``shapes``
dataset. Resumed runs must match uninterrupted ones *exactly* (tolerance 0: ``torch.equal``
on every tensor of the state dict, and equal logged losses and metrics).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import emactl
import emactl.engine.trainer as trainer_mod
from emactl.cli import main as cli_main
from emactl.config import load_recipe, to_dict
from emactl.engine.checkpoint import checkpoint_path, latest_checkpoint, list_checkpoints
from emactl.engine.rundir import MetricsLogger, read_metrics
from emactl.engine.trainer import train
from emactl.errors import UserError

from runs import make_recipe, write_recipe_file


pytestmark = pytest.mark.usefixtures("one_thread")


def ckpt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Tolerance 0: every tensor bit-identical."""
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


def train_lines(run_dir: Path) -> list[tuple[int, float, float]]:
    return [(r["iter"], r["loss"], r["lr"]) for r in read_metrics(run_dir) if r["kind"] == "train"]


def val_lines(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "val"]


# --------------------------------------------------------------------------------------------
# Run directory and exact resume (in-process).


@pytest.mark.parametrize(
    "extra",
    [
        ("data.workers=0",),
        ("data.workers=2", "train.accum_steps=2", "model.aux=true", "train.val_every=2"),
    ],
    ids=["workers0", "workers2-accum-aux-val"],
)
def test_resume_matches_straight_run(tmp_path: Path, extra: tuple[str, ...]) -> None:
    recipe = make_recipe(tmp_path, *extra)
    straight = tmp_path / "straight"
    res = train(recipe, straight, progress=False)
    assert res.iteration == 6 and res.stopped_by is None
    assert set(res.metrics) == {"aAcc", "mAcc", "mIoU", "fwIoU"}

    # the run directory
    assert load_recipe(straight / "recipe.yaml") == recipe
    env = json.loads((straight / "env.json").read_text())
    for key in ("torch", "torchvision", "python", "device_name", "cuda_available", "cudnn_available",
                "world_size", "amp", "argv", "start_time", "host"):
        assert key in env
    assert env["world_size"] == 1
    assert env["code"]["emactl"] == emactl.__version__
    assert env["code"]["git_commit"] is None or len(env["code"]["git_commit"]) == 40
    lines = read_metrics(straight)
    assert [r["iter"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert set(lines[0]) == {"kind", "iter", "loss", "lr", "img_per_s", "time"}
    assert val_lines(straight)[-1] == {"kind": "val", "iter": 6, **res.metrics}
    assert (straight / "eval" / "summary.csv").exists() and (straight / "eval" / "per_class.md").exists()
    assert [p.name for p in list_checkpoints(straight)] == ["iter_0000003.pt", "iter_0000006.pt"]

    # resume from iteration 3 in a fresh run directory: iterations 4-6 must be identical
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint_path(straight, 3), checkpoint_path(resumed, 3))
    res2 = train(recipe, resumed, resume=True, progress=False)
    assert res2.iteration == 6
    a, b = ckpt(checkpoint_path(straight, 6)), ckpt(checkpoint_path(resumed, 6))
    assert_same_state(a["model"], b["model"])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6
    assert a["loader"] == b["loader"]
    assert train_lines(resumed) == [t for t in train_lines(straight) if t[0] > 3]
    assert res2.metrics == res.metrics


def test_data_stream_does_not_depend_on_workers(tmp_path: Path) -> None:
    a = train(make_recipe(tmp_path, "train.iters=2", "data.workers=0"), tmp_path / "a", progress=False)
    b = train(make_recipe(tmp_path, "train.iters=2", "data.workers=2"), tmp_path / "b", progress=False)
    assert_same_state(ckpt(latest_checkpoint(a.run_dir))["model"], ckpt(latest_checkpoint(b.run_dir))["model"])


def test_existing_run_needs_resume_and_keep_ckpts(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, "train.iters=4", "train.ckpt_every=1", "train.keep_ckpts=2")
    res = train(recipe, progress=False)
    assert res.run_dir == tmp_path / "runs" / "t"
    assert [p.name for p in list_checkpoints(res.run_dir)] == ["iter_0000003.pt", "iter_0000004.pt"]
    with pytest.raises(UserError, match="--resume"):
        train(recipe, progress=False)
    # resuming a finished run only re-evaluates it (and logs that validation once)
    lines = read_metrics(res.run_dir)
    res2 = train(recipe, resume=True, progress=False)
    assert res2.iteration == 4 and res2.metrics == res.metrics
    assert read_metrics(res.run_dir) == lines
    with pytest.raises(UserError, match="beyond train.iters=3"):
        train(make_recipe(tmp_path, "train.iters=3"), resume=True, progress=False)


def test_metrics_truncate_drops_lines_after_checkpoint_and_partial_lines(tmp_path: Path) -> None:
    log = MetricsLogger(tmp_path)
    for it in range(1, 6):
        log.log({"kind": "train", "iter": it, "loss": 1.0})
        if it == 3:
            log.log({"kind": "val", "iter": it, "mIoU": 1.0})
    with open(log.path, "a") as f:
        f.write('{"kind": "train", "it')  # what a kill -9 may leave
    log.truncate(3)
    assert [(r["kind"], r["iter"]) for r in read_metrics(tmp_path)] == [("train", 1), ("train", 2), ("train", 3), ("val", 3)]
    log.truncate(3, keep_val_at=False)
    assert [r["iter"] for r in read_metrics(tmp_path)] == [1, 2, 3]


# --------------------------------------------------------------------------------------------
# Failures and stops.


def test_nan_loss_stops_with_iteration_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = trainer_mod.seg_loss
    calls = {"n": 0}

    def loss_nan_at_3(*args: Any) -> torch.Tensor:
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(trainer_mod, "seg_loss", loss_nan_at_3)
    recipe = make_recipe(tmp_path, "train.ckpt_every=1")
    with pytest.raises(UserError, match=r"loss is nan at iteration 3\b") as info:
        train(recipe, progress=False)
    assert "\n" not in str(info.value)
    run = tmp_path / "runs" / "t"
    assert [p.name for p in list_checkpoints(run)] == ["iter_0000001.pt", "iter_0000002.pt"]
    assert str(checkpoint_path(run, 2)) in str(info.value)
    assert max(r["iter"] for r in read_metrics(run)) == 2


def test_exploding_lr_stops_cleanly(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, "train.lr=1e10", "train.warmup_iters=0", "train.ckpt_every=1", "train.iters=20")
    with pytest.raises(UserError, match=r"at iteration (\d+)") as info:
        train(recipe, progress=False)
    bad = int(str(info.value).split("at iteration ")[1].split(";")[0])
    run = tmp_path / "runs" / "t"
    last = latest_checkpoint(run)
    assert last == checkpoint_path(run, bad - 1)
    state = ckpt(last)["model"]
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def test_sigint_saves_and_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_step = trainer_mod._Trainer.step

    def step_then_sigint(self: Any, flags: torch.Tensor) -> float:
        loss = real_step(self, flags)
        if self.iteration == 2:
            signal.raise_signal(signal.SIGINT)  # handled: sets the flag, read at the next step
        return loss

    monkeypatch.setattr(trainer_mod._Trainer, "step", step_then_sigint)
    before = signal.getsignal(signal.SIGINT)
    res = train(make_recipe(tmp_path, "train.ckpt_every=100", "train.iters=10"), progress=False)
    assert res.stopped_by == signal.SIGINT and res.metrics is None
    assert res.iteration == 3
    assert latest_checkpoint(res.run_dir) == checkpoint_path(res.run_dir, 3)
    assert signal.getsignal(signal.SIGINT) is before


def test_bf16_autocast_on_cpu_and_fp16_refused(tmp_path: Path) -> None:
    res = train(make_recipe(tmp_path, "train.amp=bf16", "train.iters=2", "train.channels_last=true"), progress=False)
    assert all(torch.isfinite(torch.tensor(t[1])) for t in train_lines(res.run_dir))
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        train(make_recipe(tmp_path, "train.amp=fp16", "name=f"), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "extra",
    [("train.amp=fp16",), ("train.amp=bf16", "train.channels_last=true")],
    ids=["fp16", "bf16-channels_last"],
)
def test_cuda_mixed_precision_trains_and_resumes(tmp_path: Path, extra: tuple[str, ...]) -> None:
    recipe = make_recipe(tmp_path, "train.device=cuda", *extra)
    straight = tmp_path / "straight"
    res = train(recipe, straight, progress=False)
    assert res.iteration == 6 and all(torch.isfinite(torch.tensor(t[1])) for t in train_lines(straight))
    assert json.loads((straight / "env.json").read_text())["device_name"] == torch.cuda.get_device_name()
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint_path(straight, 3), checkpoint_path(resumed, 3))
    train(recipe, resumed, resume=True, progress=False)
    a, b = ckpt(checkpoint_path(straight, 6)), ckpt(checkpoint_path(resumed, 6))
    assert a["scaler"] == b["scaler"] and a["scheduler"] == b["scheduler"]
    # not bit-exact as on the CPU: CUDA's bilinear-upsampling backward adds with atomics
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-3, atol=1e-5, msg=key)


@pytest.mark.parametrize("enabled", [True, False])
def test_cudnn_benchmark_during_steps_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, enabled: bool) -> None:
    """On for the fixed-size training steps (train.cudnn_benchmark), off for validation, whose
    image sizes vary, and the caller's setting back afterwards."""
    seen: dict[str, set[bool]] = {"step": set(), "validate": set()}
    step, validate = trainer_mod._Trainer.step, trainer_mod._Trainer.validate

    def spy_step(self, flags):
        seen["step"].add(torch.backends.cudnn.benchmark)
        return step(self, flags)

    def spy_validate(self, progress):
        seen["validate"].add(torch.backends.cudnn.benchmark)
        return validate(self, progress)

    monkeypatch.setattr(trainer_mod._Trainer, "step", spy_step)
    monkeypatch.setattr(trainer_mod._Trainer, "validate", spy_validate)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    train(make_recipe(tmp_path, f"train.cudnn_benchmark={str(enabled).lower()}", "train.val_every=3"), progress=False)
    assert seen == {"step": {enabled}, "validate": {False}}
    assert torch.backends.cudnn.benchmark is False


def test_compile_failure_falls_back_to_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            raise RuntimeError("backend compiler failed")

    monkeypatch.setattr(torch, "compile", lambda model, **kw: Broken())
    res = train(make_recipe(tmp_path, "train.compile=true", "train.iters=2"), progress=False)
    assert res.iteration == 2 and res.metrics is not None
    assert "torch.compile failed" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The command line.


def cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    return int(info.value.code), capsys.readouterr().err


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = write_recipe_file(tmp_path, "train.iters=2", "train.ckpt_every=2")
    code, err = cli(["train", str(recipe), "--set", "train.bogus=1"], capsys)
    assert code == 2 and err.count("\n") == 1 and "train.bogus" in err

    code, _ = cli(["train", str(recipe), "--no-progress", "--name", "c"], capsys)
    assert code == 0
    run = tmp_path / "runs" / "c"
    assert (run / "eval" / "summary.md").exists()

    code, err = cli(["train", str(recipe), "--no-progress", "--name", "c"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--resume" in err and "--name" in err

    code, err = cli(["train", str(recipe), "--no-progress", "--name", "c", "--resume",
                     "--set", "model.head_channels=32"], capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot change model.head_channels (16 -> 32)" in err

    code, err = cli(["train", str(recipe), "--steps", "0"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--steps" in err


def test_steps_sets_the_training_length_and_iters_is_its_deprecated_spelling(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = write_recipe_file(tmp_path, "train.iters=5", "train.ckpt_every=1")
    code, err = cli(["train", str(recipe), "--no-progress", "--name", "new", "--steps", "1"], capsys)
    assert code == 0 and "deprecated" not in err
    assert latest_checkpoint(tmp_path / "runs" / "new").name == "iter_0000001.pt"

    code, err = cli(["train", str(recipe), "--no-progress", "--name", "old", "--iters", "2"], capsys)
    assert code == 0
    warning = [line for line in err.splitlines() if "deprecated" in line]
    assert len(warning) == 1 and "--steps" in warning[0]
    assert latest_checkpoint(tmp_path / "runs" / "old").name == "iter_0000002.pt"

    assert err.strip().splitlines()[-1].startswith("total time ")

    code, err = cli(["train", str(recipe), "--iters", "2", "--steps", "2"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--steps" in err
    code, err = cli(["train", str(recipe), "--threads", "0"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--threads" in err


# --------------------------------------------------------------------------------------------
# Real signals on a real process: SIGTERM, then kill -9, then resume to the end.


def _start(recipe: Path, tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "emactl", "train", str(recipe), "--no-progress", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )


def _wait_for(cond: Any, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"process ended early: {proc.communicate()}"
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def _iteration(path: Path | None) -> int:
    return -1 if path is None else int(path.stem.split("_")[1])


def test_sigterm_and_kill9_then_resume_match_uninterrupted(tmp_path: Path) -> None:
    recipe = write_recipe_file(
        tmp_path, "train.iters=60", "train.ckpt_every=4", "train.log_every=2", "train.val_every=20",
        "train.keep_ckpts=2", "data.args.train_length=40",
    )
    runs = tmp_path / "runs"

    ref = _start(recipe, tmp_path, "--name", "ref")
    out, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err

    # SIGTERM after the first checkpoint: clean exit 143 with a checkpoint at that iteration
    run = runs / "b"
    proc = _start(recipe, tmp_path, "--name", "b")
    _wait_for(lambda: latest_checkpoint(run) is not None, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = _iteration(latest_checkpoint(run))
    assert f"stopped by SIGTERM at iteration {stopped}" in err
    assert 4 <= stopped < 60

    # resume, then kill -9 as soon as it has written its next checkpoint
    proc = _start(recipe, tmp_path, "--name", "b", "--resume")
    _wait_for(lambda: _iteration(latest_checkpoint(run)) > stopped, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _iteration(latest_checkpoint(run))
    assert killed_at < 60

    # resume to the end: same weights, same logged losses, same metrics as the reference
    (run / "checkpoints" / ".iter_0000099.pt.x.tmp").write_bytes(b"half-written")  # kill -9 litter
    proc = _start(recipe, tmp_path, "--name", "b", "--resume")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert_same_state(ckpt(checkpoint_path(runs / "ref", 60))["model"], ckpt(checkpoint_path(run, 60))["model"])
    assert train_lines(run) == train_lines(runs / "ref")
    assert val_lines(run) == val_lines(runs / "ref")
    assert (run / "eval" / "summary.csv").read_text() == (runs / "ref" / "eval" / "summary.csv").read_text()
    assert json.loads((run / "env.json").read_text())["resumed_from"] == killed_at
    assert not list((run / "checkpoints").glob(".*.tmp"))
    assert to_dict(load_recipe(run / "recipe.yaml"))["train"]["iters"] == 60


# --------------------------------------------------------------------------------------------
# Reliability (issue 13): nothing lost or falsified, no hangs, one line on stderr.


def all_finite(state: Any) -> bool:
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    return all(all_finite(v) for v in state) if isinstance(state, (list, tuple)) else True


def test_non_finite_state_is_never_saved_and_the_last_finite_checkpoint_survives(tmp_path: Path) -> None:
    # lr=1e6 keeps the loss finite for a few steps while BN running variances become inf
    recipe = make_recipe(tmp_path, "train.lr=1e6", "train.warmup_iters=0", "train.ckpt_every=1",
                         "train.keep_ckpts=2", "train.iters=20")
    with pytest.raises(UserError, match=r"NaN or inf|loss is") as info:
        train(recipe, progress=False)
    run = tmp_path / "runs" / "t"
    kept = list_checkpoints(run)
    assert kept and str(kept[-1]) in str(info.value)
    for path in kept:
        state = ckpt(path)
        assert all_finite(state["model"]) and all_finite(state["optimizer"]["state"]), path.name


def hold_lock_in_child(run_dir: Path) -> subprocess.Popen:
    """A process that holds the run's lock until it is killed."""
    code = ("import sys, time; from emactl.io import folder_lock\n"
            "with folder_lock(sys.argv[1], 'emactl train', 'wait'):\n"
            "    print('held', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_concurrent_train_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = write_recipe_file(tmp_path, "train.iters=2", "train.ckpt_every=2")
    run = tmp_path / "runs" / "t"
    holder = hold_lock_in_child(run)
    try:
        code, err = cli(["train", str(recipe), "--no-progress"], capsys)
        assert code == 2 and err.count("\n") == 1
        assert f"in use by pid {holder.pid} on " in err and "(emactl train)" in err and "--name" in err
        assert not list_checkpoints(run) and not (run / "recipe.yaml").exists()
    finally:
        holder.kill()  # kill -9: the lock file stays behind, the lock itself goes with the process
        holder.wait(timeout=60)
    assert (run / ".lock").read_text().startswith(f"pid {holder.pid} ")
    code, err = cli(["train", str(recipe), "--no-progress"], capsys)
    assert code == 0, err
    assert latest_checkpoint(run) == checkpoint_path(run, 2)


def test_resume_refuses_fixed_keys_and_records_the_ones_it_may_change(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = write_recipe_file(tmp_path, "train.iters=3", "train.ckpt_every=3")
    assert cli(["train", str(recipe), "--no-progress"], capsys)[0] == 0
    run = tmp_path / "runs" / "t"
    before = (run / "recipe.yaml").read_text()

    code, err = cli(["train", str(recipe), "--no-progress", "--resume", "--set", "train.lr=0.5",
                     "--set", "train.seed=1"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "cannot change" in err and "train.lr (0.01 -> 0.5)" in err and "train.seed (0 -> 1)" in err
    assert (run / "recipe.yaml").read_text() == before
    assert latest_checkpoint(run) == checkpoint_path(run, 3)

    code, err = cli(["train", str(recipe), "--no-progress", "--resume", "--set", "train.iters=4",
                     "--set", "train.ckpt_every=4"], capsys)
    assert code == 0, err
    assert "changed settings: train.iters 3 -> 4, train.ckpt_every 3 -> 4" in err
    assert load_recipe(run / "recipe.yaml").train.iters == 4
    assert ckpt(checkpoint_path(run, 4))["recipe"]["train"]["iters"] == 4
    env = json.loads((run / "env.json").read_text())
    assert env["resume_changes"]["train.iters"] == {"checkpoint": 3, "now": 4}


def bad_jpeg_folder(root: Path, n: int = 4) -> None:
    """A ``folder`` dataset whose train images are truncated JPEGs (val is fine)."""
    import numpy as np
    from PIL import Image

    from emactl.data import save_palette_png, voc_palette

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        names = [f"{split}{i}" for i in range(n)]
        for name in names:
            image = root / "images" / f"{name}.jpg"
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(image, quality=95)
            if split == "train":
                image.write_bytes(image.read_bytes()[:300])
            save_palette_png(root / "masks" / f"{name}.png", np.zeros((40, 40), np.uint8), voc_palette())
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))


def folder_overrides(root: Path, workers: int) -> tuple[str, ...]:
    return ("data.name=folder", f"data.root={root}", "data.args={}", f"data.workers={workers}")


def test_bad_file_with_workers_stops_them_and_gives_a_clean_line(tmp_path: Path) -> None:
    import multiprocessing

    bad_jpeg_folder(tmp_path / "data")
    recipe = make_recipe(tmp_path, *folder_overrides(tmp_path / "data", 2))
    with pytest.raises(UserError) as info:
        train(recipe, progress=False)
    message = str(info.value)
    assert "cannot read image" in message and "\n" not in message and "DataFileError" not in message
    assert multiprocessing.active_children() == []  # no worker outlives the error


def test_cli_exits_2_on_a_bad_file_with_workers_instead_of_hanging(tmp_path: Path) -> None:
    bad_jpeg_folder(tmp_path / "data")
    recipe = write_recipe_file(tmp_path, *folder_overrides(tmp_path / "data", 2))
    proc = _start(recipe, tmp_path)
    try:
        out, err = proc.communicate(timeout=120)  # a guard against the hang, not a timing check
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "cannot read image" in lines[-1] and "Traceback" not in err


def test_unwritable_outputs_are_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = write_recipe_file(tmp_path, "train.iters=2", "train.ckpt_every=2")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, err = cli(["train", str(recipe), "--no-progress", "--out", str(a_file)], capsys)
    assert code == 2 and err.count("\n") == 1 and str(a_file) in err and "--out" in err

    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    (run / "checkpoints").write_text("not a folder")
    code, err = cli(["train", str(recipe), "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1 and "checkpoints: exists and is not a folder" in err
    assert not (run / "metrics.jsonl").exists()

    code, err = cli(["train", str(recipe), "--no-progress", "--out", "/proc/emactl"], capsys)
    assert code == 2 and err.count("\n") == 1 and "/proc/emactl" in err


def test_full_disk_at_a_checkpoint_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ulimit -f`` makes the second checkpoint's write fail for real (EFBIG), as a full disk would."""
    import resource

    real_save = trainer_mod._Trainer.save
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)

    def save_then_limit(self: Any) -> Path:
        path = real_save(self)
        if self.iteration == 3:
            resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size // 2, limits[1]))
        return path

    monkeypatch.setattr(trainer_mod._Trainer, "save", save_then_limit)
    try:
        with pytest.raises(UserError) as info:
            train(make_recipe(tmp_path, "train.ckpt_every=3", "train.keep_ckpts=1"), progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    run = tmp_path / "runs" / "t"
    message = str(info.value)
    assert message.startswith(f"{checkpoint_path(run, 6)}: cannot write (File too large; needs ")
    assert "needs " in message and " free" in message and "\n" not in message
    assert list_checkpoints(run) == [checkpoint_path(run, 3)]
    assert ckpt(checkpoint_path(run, 3))["iteration"] == 3
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_full_tmpfs_at_a_checkpoint_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real full disk: a 4 MiB tmpfs, filled up after the first checkpoint."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (or is not allowed here)")
    real_save = trainer_mod._Trainer.save

    def save_then_fill(self: Any) -> Path:
        path = real_save(self)
        if self.iteration == 3:
            with open(mount / "filler", "wb") as f:
                f.write(b"\0" * (shutil.disk_usage(mount).free - 4096))
        return path

    monkeypatch.setattr(trainer_mod._Trainer, "save", save_then_fill)
    try:
        recipe = make_recipe(tmp_path, "train.ckpt_every=3", "train.keep_ckpts=1", f"out_dir={mount}")
        with pytest.raises(UserError) as info:
            train(recipe, progress=False)
        run = mount / "t"
        assert str(info.value).startswith(f"{checkpoint_path(run, 6)}: cannot write (No space left on device; needs ")
        assert list_checkpoints(run) == [checkpoint_path(run, 3)]
        assert ckpt(checkpoint_path(run, 3))["iteration"] == 3
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_read_only_file_system_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mount = tmp_path / "ro"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (or is not allowed here)")
    try:
        recipe = write_recipe_file(tmp_path, "train.iters=2")
        code, err = cli(["train", str(recipe), "--no-progress", "--out", str(mount)], capsys)
        assert code == 2 and err.count("\n") == 1
        assert f"{mount / 't'}: cannot create this output folder (Read-only file system)" in err
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_signal_during_the_final_evaluation_stops_with_143(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real_validate = trainer_mod._Trainer.validate

    def validate_with_sigterm(self: Any, progress: bool) -> Any:
        if self.iteration == self.cfg.iters:
            signal.raise_signal(signal.SIGTERM)
        return real_validate(self, progress)

    monkeypatch.setattr(trainer_mod._Trainer, "validate", validate_with_sigterm)
    recipe = write_recipe_file(tmp_path, "train.iters=3", "train.ckpt_every=3")
    code, err = cli(["train", str(recipe), "--no-progress"], capsys)
    run = tmp_path / "runs" / "t"
    assert code == 128 + signal.SIGTERM
    assert f"SIGTERM during the final evaluation; training is complete and saved in {checkpoint_path(run, 3)}" in err
    assert not (run / "eval" / "summary.csv").exists()
    monkeypatch.setattr(trainer_mod._Trainer, "validate", real_validate)
    code, err = cli(["train", str(recipe), "--no-progress", "--resume"], capsys)  # redoes the evaluation
    assert code == 0 and (run / "eval" / "summary.csv").exists()
    assert len(val_lines(run)) == 1


def test_second_sigint_stops_at_once_naming_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real_step = trainer_mod._Trainer.step

    def step_then_two_sigints(self: Any, flags: torch.Tensor) -> float:
        loss = real_step(self, flags)
        if self.iteration == 3:
            signal.raise_signal(signal.SIGINT)  # the first: a flag
            signal.raise_signal(signal.SIGINT)  # the second: stop now
        return loss

    monkeypatch.setattr(trainer_mod._Trainer, "step", step_then_two_sigints)
    before = signal.getsignal(signal.SIGINT)
    recipe = write_recipe_file(tmp_path, "train.iters=10", "train.ckpt_every=2")
    code, err = cli(["train", str(recipe), "--no-progress"], capsys)
    run = tmp_path / "runs" / "t"
    assert code == 128 + signal.SIGINT
    assert (f"stopped by a second SIGINT at iteration 3, without saving; the last checkpoint is "
            f"{checkpoint_path(run, 2)} (continue with --resume)") in err
    assert latest_checkpoint(run) == checkpoint_path(run, 2)
    assert signal.getsignal(signal.SIGINT) is before


def test_second_sigint_during_validation_saves_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real_validate = trainer_mod._Trainer.validate

    def validate_with_two_sigints(self: Any, progress: bool) -> Any:
        if self.iteration == 3:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real_validate(self, progress)

    monkeypatch.setattr(trainer_mod._Trainer, "validate", validate_with_two_sigints)
    recipe = write_recipe_file(tmp_path, "train.iters=10", "train.ckpt_every=100", "train.val_every=3")
    code, err = cli(["train", str(recipe), "--no-progress"], capsys)
    run = tmp_path / "runs" / "t"
    assert code == 128 + signal.SIGINT
    assert f"stopped by SIGINT during validation at iteration 3; saved {checkpoint_path(run, 3)}" in err
    assert latest_checkpoint(run) == checkpoint_path(run, 3) and ckpt(checkpoint_path(run, 3))["iteration"] == 3


def test_corrupt_newest_checkpoint_falls_back_on_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = write_recipe_file(tmp_path, "train.iters=6", "train.ckpt_every=3")
    run = tmp_path / "runs" / "t"
    assert cli(["train", str(recipe), "--no-progress", "--set", "train.iters=5"], capsys)[0] == 0
    newest = checkpoint_path(run, 5)
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a failing disk
    code, err = cli(["train", str(recipe), "--no-progress", "--resume", "--set", "train.iters=5"], capsys)
    assert code == 0, err
    assert f"{newest}: cannot load checkpoint" in err and f"using {checkpoint_path(run, 3)} instead" in err
    assert "renamed iter_0000005.pt to *.corrupt" in err
    assert newest.with_name(newest.name + ".corrupt").exists()
    assert ckpt(newest)["iteration"] == 5


def test_train_eta_uses_the_mean_step_time_of_this_session() -> None:
    from emactl.progress import hms, mean_rate_eta

    assert mean_rate_eta(1000, 0, 0, 5.0) is None  # nothing measured yet: no guess
    assert mean_rate_eta(1000, 100, 0, 60.0) == pytest.approx(540.0)
    assert mean_rate_eta(1000, 600, 500, 60.0) == pytest.approx(240.0)  # resumed at 500: 100 steps in 60 s
    assert mean_rate_eta(1000, 1000, 0, 60.0) == 0.0
    assert (hms(None), hms(59.6), hms(3725)) == ("-:--", "1:00", "1:02:05")
