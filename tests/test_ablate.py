"""``emactl ablate``: axis parsing and grid expansion, tiny end-to-end sweeps, resume and refusal."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from rich.console import Console

import emactl.engine.trainer as trainer
from emactl.ablate.axes import expand, parse_axes, split_values
from emactl.ablate.launcher import TRAIN_FILE, CellOutcome, CellTask, Interrupted, eval_file, run_cells
from emactl.ablate.progress import CellState, SweepMonitor, SweepProgress, cell_line, last_train_record, sweep_line
from emactl.ablate.report import pivot, short_headers
from emactl.ablate.sweep import SWEEP_FILE, default_recipe, default_sweep_dir, plan_recipe, sweep_progress
from emactl.cli import main
from emactl.config import from_dict, to_dict
from emactl.engine.checkpoint import checkpoint_path, latest_checkpoint
from emactl.engine.rundir import code_version
from emactl.nn.choices import BASES_UPDATES, GRAD_MODES, NORMS
from emactl.tables import print_table

from cli_run import cli, one_line_error
from runs import SWEEP, tiny_recipe

TINY = tiny_recipe(*SWEEP, "data.args.val_length=4", "train.iters=2", "train.keep_ckpts=2", "eval.batch_size=4")
AXIS_COLUMNS = ["train_iters", "eval_iters", "seed"]
METRIC_COLUMNS = ["mIoU", "aAcc", "mAcc", "train_time_s", "eval_time_s", "params"]
# One torch thread per cell: on a small shared CPU two spinning OpenMP threads are many times slower.
QUIET = ["--no-progress", "--threads", "1"]


def base_recipe() -> dict:
    return to_dict(from_dict(TINY))


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def grid(recipe_file, tmp_path_factory) -> Path:
    """A 2-cell sweep: train T 1,2 × eval T 1,2 (two trainings, four evaluations)."""
    out = tmp_path_factory.mktemp("sweeps") / "grid"
    with pytest.raises(SystemExit) as exc:
        main(["ablate", "--recipe", str(recipe_file), "--train-iters", "1,2", "--eval-iters", "1,2",
              "--out", str(out), *QUIET])
    assert exc.value.code == 0
    return out


def grid_argv(recipe_file: Path, out: Path) -> list[str]:
    return ["ablate", "--recipe", str(recipe_file), "--train-iters", "1,2", "--eval-iters", "1,2",
            "--out", str(out), *QUIET]


@pytest.fixture
def count_train(monkeypatch) -> list[int]:
    """Calls to the trainer, each recorded with the iteration it resumed from (0: fresh)."""
    calls: list[int] = []
    real = trainer.train

    def counting(recipe, run_dir=None, resume=False, progress=True):
        ckpt = latest_checkpoint(run_dir) if run_dir is not None else None
        calls.append(int(ckpt.stem.split("_")[1]) if ckpt is not None else 0)
        return real(recipe, run_dir, resume=resume, progress=progress)

    monkeypatch.setattr(trainer, "train", counting)
    return calls


# --------------------------------------------------------------------------------------------
# Parsing and expansion.


def test_iters_sets_train_and_eval_t_together():
    axes = parse_axes(iters="1,3,5")
    assert axes.iter_mode == "diagonal"
    cells, notes = expand(base_recipe(), axes, [0])
    assert [c.name for c in cells] == ["T1_seed0", "T3_seed0", "T5_seed0"]
    assert [c.eval_iters for c in cells] == [[1], [3], [5]]
    assert [c.recipe["model"]["ema"]["iters"] for c in cells] == [1, 3, 5]
    assert not notes


def test_train_t_by_eval_t_grid_and_eval_only_axis():
    cells, _ = expand(base_recipe(), parse_axes(train_iters="1,3", eval_iters="1,2,3"), [0])
    assert len(cells) == 2 and all(c.eval_iters == [1, 2, 3] for c in cells)
    cells, _ = expand(base_recipe(), parse_axes(eval_iters="1,4"), [0])
    assert len(cells) == 1 and cells[0].values["train_iters"] == 2 and cells[0].eval_iters == [1, 4]


def test_set_axis_and_plain_override():
    axes = parse_axes(norm="l2,none", sets=["train.lr=0.01,0.02", "train.iters=5", "eval.scales=[0.5,1.0],[1.0]"])
    assert axes.values["train.lr"] == [0.01, 0.02]
    assert axes.values["eval.scales"] == [[0.5, 1.0], [1.0]]
    assert axes.overrides == ["train.iters=5"]
    cells, _ = expand(base_recipe(), axes, [0, 1])
    assert len(cells) == 2 * 2 * 2 * 2
    first = cells[0]
    assert first.values == {"norm": "l2", "train.lr": 0.01, "eval.scales": [0.5, 1.0], "seed": 0}
    assert first.recipe["train"]["lr"] == 0.01 and first.recipe["model"]["ema"]["norm"] == "l2"
    assert {c.recipe["train"]["seed"] for c in cells} == {0, 1}
    assert len({c.name for c in cells}) == len(cells)
    assert split_values("a,[1,2],'x,y'") == ["a", "[1,2]", "'x,y'"]


def test_backprop_cells_get_grad_full_with_a_note():
    cells, notes = expand(base_recipe(), parse_axes(bases_update="moving_average,backprop,none", norm="l2,none"), [0])
    assert len(cells) == 6
    grads = {(c.values["bases_update"], c.values["norm"]): c.values["grad"] for c in cells}
    assert grads[("backprop", "l2")] == "full" and grads[("moving_average", "l2")] == "none"
    assert all(c.recipe["model"]["ema"]["grad"] == c.values["grad"] for c in cells)
    assert len(notes) == 1 and "grad=full" in notes[0]
    cells, notes = expand(base_recipe(), parse_axes(bases_update="moving_average,backprop", grad="none,full"), [0])
    assert [(c.values["bases_update"], c.values["grad"]) for c in cells] == [
        ("moving_average", "none"), ("moving_average", "full"), ("backprop", "full")]
    assert "skipped 1" in notes[0]


def test_heads_without_ema_collapse_the_ema_axes():
    cells, _ = expand(base_recipe(), parse_axes(iters="1,3", heads="ema,fcn"), [0])
    assert [c.name for c in cells] == ["T1_head-ema_seed0", "head-fcn_seed0", "T3_head-ema_seed0"]
    assert cells[1].eval_iters == [None] and cells[1].values["train_iters"] is None


def test_ema_axes_follow_the_registry_not_the_name(monkeypatch):
    """Whether the EMA axes apply is the registry's answer (has_ema_unit), not ``head == "ema"``."""
    import emactl.nn.heads as heads

    monkeypatch.setattr(heads, "has_ema_unit", lambda head: head == "fcn")
    cells, _ = expand(base_recipe(), parse_axes(iters="1,3", heads="ema,fcn"), [0])
    assert [c.name for c in cells] == ["head-ema_seed0", "T1_head-fcn_seed0", "T3_head-fcn_seed0"]


def test_choice_axes_take_the_units_choices():
    axes = parse_axes(norm=",".join(NORMS), grad=",".join(GRAD_MODES), bases_update=",".join(BASES_UPDATES))
    assert [axes.values[c] for c in ("norm", "grad", "bases_update")] == [list(NORMS), list(GRAD_MODES), list(BASES_UPDATES)]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--norm", "l3"], "--norm: got 'l3'"),
        (["--iters", "0"], "--iters: got '0'"),
        (["--iters", "a"], "--iters: got 'a'"),
        (["--iters", "1,,3"], "--iters"),
        (["--iters", "1,1"], "given twice"),
        (["--momentum", "1.5"], "--momentum"),
        (["--heads", "ema,transformer"], "--heads"),
        (["--iters", "1,3", "--train-iters", "2"], "--iters"),
        (["--set", "model.ema.norm=l2,none"], "--norm"),
        (["--set", "train.seed=1,2"], "--seeds"),
        (["--seeds", "0"], "--seeds"),
        (["--iters", "1", "--threads", "0"], "--threads"),
    ],
)
def test_bad_axis_values_are_one_line_errors(argv, needle, capsys):
    line = one_line_error(*cli(["ablate", *argv, "--no-progress"], capsys)[::2])
    assert needle in line


def test_default_recipe_is_the_shapes_demo():
    assert default_recipe().name == "shapes.yaml"


# --------------------------------------------------------------------------------------------
# End to end on tiny sweeps.


def test_grid_sweep_writes_tidy_results_and_pivots(grid):
    df = pd.read_csv(grid / "results.csv")
    assert list(df.columns[:3]) == AXIS_COLUMNS
    assert set(METRIC_COLUMNS) <= set(df.columns)
    assert len(df) == 4
    assert sorted(zip(df.train_iters, df.eval_iters)) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert df["mIoU"].notna().all() and (df["params"] > 0).all() and (df["train_time_s"] > 0).all()
    pivot = pd.read_csv(grid / "pivot_iters.csv")
    assert list(pivot.columns) == ["train_iters", "eval_iters=1", "eval_iters=2"]
    assert list(pivot.train_iters) == [1, 2] and pivot.notna().all().all()
    assert (grid / "pivot_iters.md").is_file() and (grid / "results.md").is_file()
    assert (grid / "figures" / "ablation_eval_iters.png").stat().st_size > 0
    summary = pd.read_csv(grid / "summary.csv")
    assert {"mIoU_mean", "mIoU_std", "n"} <= set(summary.columns) and (summary.n == 1).all()
    spec = json.loads((grid / SWEEP_FILE).read_text())
    assert spec["axes"]["values"] == {"train_iters": [1, 2], "eval_iters": [1, 2]} and spec["seeds"] == [0]
    cell = grid / "cells" / "T1_seed0"
    assert (cell / "recipe.yaml").is_file() and (cell / TRAIN_FILE).is_file()
    assert eval_file(cell, 1).is_file() and eval_file(cell, 2).is_file()


def test_rerun_skips_finished_cells_and_rebuilds_the_table(grid, recipe_file, count_train, capsys):
    ckpts = sorted(grid.glob("cells/*/checkpoints/*.pt"))
    mtimes = [p.stat().st_mtime_ns for p in ckpts]
    before = pd.read_csv(grid / "results.csv")
    for name in ("results.csv", "results.md", "pivot_iters.csv", "figures/ablation_eval_iters.png"):
        (grid / name).unlink()
    code, out, err = cli(grid_argv(recipe_file, grid), capsys)
    assert code == 0, err
    assert count_train == []
    assert [p.stat().st_mtime_ns for p in sorted(grid.glob("cells/*/checkpoints/*.pt"))] == mtimes
    assert "2 finished, 0 to run" in err
    pd.testing.assert_frame_equal(pd.read_csv(grid / "results.csv"), before)
    assert (grid / "pivot_iters.csv").is_file() and (grid / "figures" / "ablation_eval_iters.png").is_file()


def test_interrupted_cell_resumes_from_its_checkpoint(grid, recipe_file, count_train, capsys):
    cell = grid / "cells" / "T2_seed0"
    (cell / TRAIN_FILE).unlink()
    checkpoint_path(cell, 2).unlink()
    eval_file(cell, 2).unlink()
    code, _, err = cli(grid_argv(recipe_file, grid), capsys)
    assert code == 0, err
    assert count_train == [1]
    assert checkpoint_path(cell, 2).is_file() and eval_file(cell, 2).is_file()
    assert len(pd.read_csv(grid / "results.csv")) == 4


def test_a_different_sweep_is_refused(grid, recipe_file, capsys):
    spec = (grid / SWEEP_FILE).read_text()
    argv = grid_argv(recipe_file, grid)
    argv[argv.index("1,2")] = "1,3"
    line = one_line_error(*cli(argv, capsys)[::2])
    assert "different sweep" in line and "--out" in line and "axes" in line
    line = one_line_error(*cli(grid_argv(recipe_file, grid) + ["--set", "train.lr=0.02"], capsys)[::2])
    assert "different sweep" in line and "train.lr" in line
    assert (grid / SWEEP_FILE).read_text() == spec


def test_a_sweep_from_before_a_new_recipe_key_still_resumes(grid, recipe_file, count_train, capsys):
    path = grid / SWEEP_FILE
    original = path.read_text()
    spec = json.loads(original)
    try:
        del spec["recipe"]["model"]["ema"]["renorm"]
        path.write_text(json.dumps(spec))
        code, _, err = cli(grid_argv(recipe_file, grid), capsys)
        assert code == 0, err
        assert count_train == []
        spec["recipe"]["model"]["ema"]["renorm"] = False
        path.write_text(json.dumps(spec))
        line = one_line_error(*cli(grid_argv(recipe_file, grid), capsys)[::2])
        assert "recipe.model.ema.renorm (False → True)" in line
    finally:
        path.write_text(original)


def test_sweep_records_code_versions_and_warns_when_they_change(grid, recipe_file, count_train, capsys):
    path = grid / SWEEP_FILE
    original = path.read_text()
    spec = json.loads(original)
    assert spec["code_versions"] == [code_version()]
    try:
        spec["code_versions"] = [{"emactl": "0.0.1", "git_commit": "0123456789abcdef", "git_dirty": False}]
        path.write_text(json.dumps(spec))
        code, _, err = cli(grid_argv(recipe_file, grid), capsys)
        assert code == 0, err
        assert count_train == []
        assert "warning:" in err and "emactl 0.0.1 @ 0123456789" in err
        versions = json.loads(path.read_text())["code_versions"]
        assert versions == [spec["code_versions"][0], code_version()]
    finally:
        path.write_text(original)


def test_from_a_trained_run_evaluates_eval_axes_only(grid, tmp_path, count_train, capsys):
    run = grid / "cells" / "T2_seed0"
    out = tmp_path / "from"
    code, _, err = cli(["ablate", "--from", str(run), "--eval-iters", "1,3", "--out", str(out), *QUIET], capsys)
    assert code == 0, err
    assert count_train == []
    df = pd.read_csv(out / "results.csv")
    assert list(df.eval_iters) == [1, 3] and list(df.train_iters) == [2, 2] and df["mIoU"].notna().all()
    assert (out / "pivot_iters.csv").is_file()
    refused = [(["--norm", "l2,none"], "--norm"), (["--iters", "1,3"], "--eval-iters"),
               (["--set", "train.lr=0.1,0.2"], "train.lr"), (["--seeds", "2", "--eval-iters", "1"], "--seeds"),
               (["--recipe", "x.yaml", "--eval-iters", "1"], "--recipe")]
    for argv, needle in refused:
        line = one_line_error(*cli(["ablate", "--from", str(run), *argv, "--out", str(tmp_path / "x")], capsys)[::2])
        assert needle in line


def test_seeds_give_mean_and_std(recipe_file, tmp_path, capsys):
    out = tmp_path / "seeds"
    code, stdout, err = cli(["ablate", "--recipe", str(recipe_file), "--eval-iters", "1,2", "--seeds", "2",
                             "--out", str(out), *QUIET], capsys)
    assert code == 0, err
    df = pd.read_csv(out / "results.csv")
    assert sorted(df.seed.unique()) == [0, 1] and len(df) == 4
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.eval_iters) == [1, 2] and (summary.n == 2).all()
    means = df.groupby("eval_iters")["mIoU"].agg(["mean", "std"])
    assert summary.mIoU_mean.tolist() == pytest.approx(means["mean"].tolist())
    assert summary.mIoU_std.tolist() == pytest.approx(means["std"].tolist())
    assert "±" in (out / "pivot_iters.md").read_text() and "mean ± std" in stdout


def test_failed_cell_is_recorded_and_the_others_finish(recipe_file, tmp_path, capsys):
    out = tmp_path / "failing"
    code, _, err = cli(["ablate", "--recipe", str(recipe_file), "--set", "data.args.val_length=4,0",
                        "--out", str(out), *QUIET, "-j", "2"], capsys)
    line = one_line_error(code, err.strip().splitlines()[-1])
    assert "1 of 2 cells failed" in line and "val-length-0_seed0" in line
    df = pd.read_csv(out / "results.csv")
    assert list(df["data.args.val_length"]) == [4, 0]
    assert df["mIoU"].notna().tolist() == [True, False] and df["error"].notna().tolist() == [False, True]


# --------------------------------------------------------------------------------------------
# Progress inside the cells and the sweep ETA, on a fake clock.


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_eta_from_this_sessions_iterations_and_evaluations():
    clock = FakeClock()
    cells = {"T1": CellState(100, skipped=True), "T3": CellState(100, start=40), "T5": CellState(100)}
    p = SweepProgress(cells, clock)
    assert p.total() == 300 and p.done() == 140
    assert p.eta() is None and "ETA -:--" in sweep_line(p)

    p.start("T3")
    clock.now += 60.0
    p.update("T3", 70, loss=0.5, img_per_s=12.0)  # 30 iterations in 60 s; T3's first 40 were done before
    assert p.estimate() == (pytest.approx(130 * 2.0), True)  # no evaluation timed yet: said so
    line = sweep_line(p)
    assert "170/300 it" in line and "1:00 elapsed" in line and "ETA 4:20 + evaluation" in line

    clock.now += 60.0
    p.update("T3", 60)  # a stale line never moves progress back
    assert p.done() == 170 and p.eta() == pytest.approx(130 * 4.0)

    clock.now += 60.0
    p.update("T3", 100)  # trained: 60 iterations in 180 s, now evaluating
    clock.now += 20.0
    p.finish("T3")  # the evaluation took 20 s
    assert p.estimate() == (pytest.approx(100 * 3.0 + 20.0), False)
    p.start("T5")
    clock.now += 30.0
    p.update("T5", 50)  # 110 iterations in 210 s
    assert p.eta() == pytest.approx(50 * 210.0 / 110 + 20.0)
    clock.now += 100.0
    p.update("T5", 100)
    clock.now += 5.0  # 5 s into T5's evaluation, which takes about 20
    assert p.eta() == pytest.approx(15.0) and "ETA 0:15" in sweep_line(p)

    p.finish("T5", ok=False)  # a failed cell leaves nothing for this session
    assert p.eta() == 0.0 and "3/3 cells" in sweep_line(p)


def test_eta_divides_by_the_cells_running_at_once():
    clock = FakeClock()
    p = SweepProgress({n: CellState(100) for n in "abcd"}, clock, jobs=2)
    p.start("a"), p.start("b")
    clock.now += 100.0
    p.update("a", 50), p.update("b", 50)  # each cell: 2 s per iteration
    assert p.estimate() == (pytest.approx((300 * 2.0) / 2), True)


def test_eval_only_sweep_counts_cells():
    clock = FakeClock()
    p = SweepProgress({"a": CellState(0), "b": CellState(0), "c": CellState(0, skipped=True)}, clock)
    assert p.by_cells and p.total() == 3 and p.done() == 1 and p.eta() is None
    p.start("a")
    clock.now += 10.0
    p.finish("a")
    assert p.eta() == pytest.approx(10.0) and " it " not in sweep_line(p) and "1:00" not in sweep_line(p)


def test_cell_line_and_monitor_read_the_running_cells_metrics(tmp_path):
    run = tmp_path / "cell"
    run.mkdir()
    lines = [{"kind": "train", "iter": i, "loss": 1.0 / i, "img_per_s": 8.0} for i in range(10, 2000, 10)]
    lines.append({"kind": "val", "iter": 1990, "mIoU": 50.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "train", "it')
    assert last_train_record(run)["iter"] == 1990
    assert last_train_record(tmp_path / "missing") is None

    p = SweepProgress({"cell": CellState(4000)}, FakeClock())
    refreshed = []
    monitor = SweepMonitor(p, {"cell": run}, lambda: refreshed.append(1))
    monitor.poll()
    assert p.cells["cell"].done == 0 and refreshed  # not running: not read
    p.start("cell")
    monitor.poll()
    assert cell_line(p.cells["cell"]) == "it 1990/4000 · loss 0.0005 · 8.0 img/s"
    p.update("cell", 4000)
    assert cell_line(p.cells["cell"]) == "evaluating"


def test_sweep_progress_starts_from_checkpoints_and_finished_cells(grid, recipe_file, tmp_path):
    sweep = plan_recipe(recipe_file, parse_axes(train_iters="1,2", eval_iters="1,2"), out=grid)
    p = sweep_progress(sweep, FakeClock())
    assert all(c.skipped for c in p.cells.values()) and p.eta() == 0.0
    fresh = plan_recipe(recipe_file, parse_axes(train_iters="1,2", eval_iters="1,2"), out=tmp_path / "new")
    p = sweep_progress(fresh, FakeClock())
    assert p.total() == 4 and p.done() == 0 and not p.by_cells


def test_pivot_headers_fit_100_columns():
    summary = pd.DataFrame([{"train_iters": 3, "eval_iters": t, "mIoU_mean": 80.0 + t, "mIoU_std": float("nan"),
                             "n": 1} for t in range(1, 9)])
    _, text = pivot(summary, ["train_iters"], ["eval_iters"])
    shown, title = short_headers(text, "mIoU: train T (rows) × eval T (columns)")
    assert list(shown.columns) == ["train_iters", *map(str, range(1, 9))] and title.endswith("eval T (columns)")
    assert short_headers(text, "mIoU per train_iters")[1] == "mIoU per train_iters (columns: eval_iters)"
    con = Console(width=100, record=True)
    print_table(shown, title, con)
    out = con.export_text()
    assert "…" not in out and "continued" not in out and "88.00" in out
    two = pd.DataFrame({"norm": ["l2"], "bases_update=x, grad=y": ["1"]})
    assert short_headers(two, "t") == (two, "t")  # several axes per column: left as they are


def test_sweep_names_are_readable_with_plain_overrides():
    axes = parse_axes(iters="1,3,5", sets=["train.iters=60", "data.root=/data/x y"])
    assert default_sweep_dir("shapes", axes, [0]) == Path("sweeps/shapes_iters-1-3-5_data.root-data-x-y_train.iters-60")
    assert default_sweep_dir("shapes", parse_axes(iters="1,3,5"), [0]) == Path("sweeps/shapes_iters-1-3-5")


# --------------------------------------------------------------------------------------------
# The driver of every executor (here, --jobs worker processes, SLURM), on a fake one.


class FakeExecutor:
    """Ends the running cells as ``script`` says, one step per :meth:`ended` call (an exception
    is raised there, like a Ctrl-C); records what the driver asked of it."""

    where = ""

    def __init__(self, script, slots=2, wait=True, stops=True):
        self.script, self.slots, self.wait, self.stops = list(script), slots, wait, stops
        self.submitted, self.interrupts, self.most = [], [], 0

    def submit(self, task):
        self.submitted.append(task.name)
        return task.name

    def ended(self, running):
        self.most = max(self.most, len(running))
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return {name: CellOutcome(name, status, signum=2 if status == "stopped" else None)
                for name, status in step.items()}

    def interrupt(self, running, count):
        self.interrupts.append((sorted(running), count))
        return self.stops


def drive(executor, names="abc"):
    started, done = [], []
    result = run_cells(executor, [CellTask(n, f"/x/{n}", {}, [None]) for n in names], lambda t: started.append(t.name),
                       lambda o: done.append((o.name, o.status)))
    return result, started, done


def test_cells_run_up_to_slots_at_once_and_a_failure_stops_none():
    executor = FakeExecutor([{"a": "failed"}, {}, {"b": "done", "c": "done"}])
    result, started, done = drive(executor)
    assert result == (None, []) and started == executor.submitted == ["a", "b", "c"] and executor.most == 2
    assert done == [("a", "failed"), ("b", "done"), ("c", "done")]


def test_ctrl_c_stops_submitting_stops_the_running_cells_and_its_signal_wins():
    executor = FakeExecutor([KeyboardInterrupt(), Interrupted(15), {"a": "stopped", "b": "stopped"}])
    result, started, done = drive(executor)
    assert result == (2, []) and started == ["a", "b"]  # c never starts; SIGINT came first
    assert executor.interrupts == [(["a", "b"], 1), (["a", "b"], 2)]  # SIGINT, then SIGTERM to the workers
    assert done == [("a", "stopped"), ("b", "stopped")]


def test_cells_left_running_are_returned():
    executor = FakeExecutor([KeyboardInterrupt()], slots=3, stops=False)  # SLURM jobs go on without the driver
    assert drive(executor)[0] == (2, ["a", "b", "c"]) and executor.interrupts == [(["a", "b", "c"], 1)]
    executor = FakeExecutor([], slots=3, wait=False)  # --no-wait
    assert drive(executor)[0] == (None, ["a", "b", "c"])


def test_every_axis_is_an_option_of_ablate_with_its_help(monkeypatch, capsys):
    """The CLI derives one option per AxisSpec: a new axis needs no edit in commands/ablate.py."""
    from emactl.ablate.axes import AXES, AxisSpec
    from emactl.commands import ablate as command

    extra = AxisSpec("temperature", "--temperature", "model.ema.temperature", True, lambda o, t: float(t),
                     lambda v: f"lam{v}", "0.5,1", ": the E step's λ.")
    monkeypatch.setitem(AXES, "temperature", extra)
    names = [p.name for p in command.AblateCommand("ablate", callback=command.ablate).parameters()]
    assert names[: len(AXES) + 1] == ["iters", *(spec.param for spec in AXES.values())]
    assert "axes" not in names
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = cli(["ablate", "--help"], capsys)
    assert code == 0
    for spec in AXES.values():
        assert spec.option in out
    assert "the E step's λ" in out
    axes = parse_axes(temperature="0.5,1", iters="1,3")
    assert axes.values["temperature"] == [0.5, 1.0] and axes.iter_mode == "diagonal"
