"""Optional experiment loggers: the missing-package line, failure isolation, and (when the
packages are installed) real offline TensorBoard, wandb and MLflow runs read back."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from emactl.cli import main as cli_main
from emactl.engine.loggers import Loggers, require_loggers, scalars
from emactl.engine.rundir import MetricsLogger, read_metrics
from emactl.engine.trainer import train
from emactl.errors import UserError

from runs import make_recipe, write_recipe_file

pytestmark = pytest.mark.usefixtures("one_thread")


def test_scalars_skip_kind_iter_time_and_non_numbers():
    record = {"kind": "val", "iter": 4, "time": 2.0, "mIoU": 51.5, "n": 3, "flag": True, "note": "x"}
    assert scalars(record) == {"val/mIoU": 51.5, "val/n": 3.0}


@pytest.mark.parametrize("name,extra", [("wandb", "wandb"), ("mlflow", "mlflow"),
                                        ("tensorboard", "tensorboard")])
def test_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys, name, extra):
    module = "torch.utils.tensorboard" if name == "tensorboard" else name
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    with pytest.raises(UserError, match=rf"pip install 'emactl\[{extra}\]'"):
        require_loggers(make_recipe(tmp_path, f"train.loggers=[jsonl,{name}]").train)
    recipe = write_recipe_file(tmp_path, f"train.loggers=[{name}]")
    with pytest.raises(SystemExit) as e:
        cli_main(["train", str(recipe), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"train.loggers: {name} needs the {extra} package" in err
    assert not (tmp_path / "runs" / "t" / "metrics.jsonl").exists()  # refused before training


def test_mlflow_default_store_needs_sqlalchemy(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", type(sys)("mlflow"))  # mlflow itself present
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    with pytest.raises(UserError, match=r"mlflow needs the sqlalchemy package; .*'emactl\[mlflow\]'"):
        require_loggers(make_recipe(tmp_path, "train.loggers=[mlflow]").train)
    # a tracking server needs no local database
    require_loggers(make_recipe(tmp_path, "train.loggers=[mlflow]",
                                "train.mlflow_tracking_uri=http://127.0.0.1:5000").train)


class Recorder:
    def __init__(self, fail_at: int | None = None) -> None:
        self.records: list[dict[str, Any]] = []
        self.fail_at, self.closed = fail_at, False

    def log(self, record: dict[str, Any]) -> None:
        if record["iter"] == self.fail_at:
            raise OSError("disk full")
        self.records.append(record)

    def close(self) -> None:
        self.closed = True


def test_a_failing_backend_is_dropped_and_jsonl_keeps_everything(tmp_path, capsys):
    good, bad = Recorder(), Recorder(fail_at=2)
    log = MetricsLogger(tmp_path)
    log.attach(Loggers([("good", good), ("bad", bad)]))
    for it in (1, 2, 3):
        log.log({"kind": "train", "iter": it, "loss": 1.0 / it})
    log.close()
    assert [r["iter"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert [r["iter"] for r in good.records] == [1, 2, 3] and good.closed
    assert [r["iter"] for r in bad.records] == [1] and not bad.closed
    assert "bad logger failed to log (OSError: disk full)" in capsys.readouterr().err


def test_disabled_metrics_logger_ignores_backends(tmp_path):
    rec = Recorder()
    log = MetricsLogger(tmp_path, enabled=False)
    log.attach(Loggers([("rec", rec)]))
    log.log({"kind": "train", "iter": 1, "loss": 1.0})
    log.close()
    assert rec.records == [] and not rec.closed


def jsonl_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run):
        for tag, value in scalars(record).items():
            out.setdefault(tag, []).append((int(record["iter"]), value))
    return out


def assert_series(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    """The same steps, and values equal to float32 precision (TensorBoard stores float32)."""
    assert [step for step, _ in got] == [step for step, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_tensorboard_gets_every_jsonl_scalar_through_the_trainer(tmp_path, fake_tensorboard):
    train(make_recipe(tmp_path, "train.iters=2", "train.loggers=[jsonl,tensorboard]"), tmp_path / "run",
          progress=False)
    assert fake_tensorboard.log_dirs == [str(tmp_path / "run" / "tb")]
    calls = fake_tensorboard.calls
    expected = jsonl_scalars(tmp_path / "run")
    assert "train/loss" in expected and "val/mIoU" in expected
    got: dict[str, list[tuple[int, float]]] = {}
    for tag, value, step in calls:
        got.setdefault(tag, []).append((step, value))
    assert got == expected
    assert fake_tensorboard.purge_steps == [None]  # a first training purges nothing


def test_a_resumed_training_purges_tensorboard_from_its_first_logged_step(tmp_path, fake_tensorboard):
    """Resumed at iteration I, TensorBoard hides the interrupted run's events from I + 1 on (the
    steps that training logs again), or from I when it ends there and validates again; the
    scalars it then gets are exactly the records added to metrics.jsonl."""
    run = tmp_path / "run"
    train(make_recipe(tmp_path, "train.iters=2", "train.loggers=[tensorboard]"), run, progress=False)
    before = len(read_metrics(run))
    fake_tensorboard.calls.clear()
    train(make_recipe(tmp_path, "train.iters=3", "train.loggers=[tensorboard]"), run, resume=True, progress=False)
    added = read_metrics(run)[before:]
    assert [r["iter"] for r in added if r["kind"] == "train"] == [3]
    assert fake_tensorboard.purge_steps == [None, 3]
    assert sorted({step for _, _, step in fake_tensorboard.calls}) == [3]
    train(make_recipe(tmp_path, "train.iters=3", "train.loggers=[tensorboard]"), run, resume=True, progress=False)
    assert fake_tensorboard.purge_steps == [None, 3, 3]  # at its end: validation at 3 runs again
    assert [r["iter"] for r in read_metrics(run) if r["kind"] == "val"].count(3) == 1


# --------------------------------------------------------------------------------------------
# Real back-ends, offline; skipped where their packages are not installed (CI installs .[test]).


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(make_recipe(tmp_path, "train.iters=2", "train.loggers=[tensorboard]"), tmp_path / "run",
          progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert_series(loss, jsonl_scalars(tmp_path / "run")["train/loss"])


def test_tensorboard_shows_each_step_once_after_a_crash_and_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    settings = ("train.iters=4", "train.ckpt_every=2", "train.log_every=1", "train.loggers=[tensorboard]")
    train(make_recipe(tmp_path, *settings), run, progress=False)
    (run / "checkpoints" / "iter_0000004.pt").unlink()  # killed after step 4's log, before its checkpoint
    train(make_recipe(tmp_path, *settings), run, resume=True, progress=False)
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in loss] == [1, 2, 3, 4]  # without the purge: 1, 2, 3, 4, 3, 4
    assert_series(loss, jsonl_scalars(run)["train/loss"])


def test_mlflow_sqlite_store_run(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("alembic")
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    train(make_recipe(tmp_path, "train.iters=2", "train.loggers=[jsonl,mlflow]"), run, progress=False)
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("t")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED"
    expected = jsonl_scalars(run)
    for tag in ("train/loss", "val/mIoU"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, tag))
        assert_series(history, expected[tag])
    assert "recipe.yaml" in [a.path for a in client.list_artifacts(found.info.run_id)]
    assert list((run / "mlartifacts").rglob("recipe.yaml"))  # everything stays in the run
    assert (run / "mlflow-run-id").read_text().strip() == found.info.run_id

    train(make_recipe(tmp_path, "train.iters=3", "train.loggers=[jsonl,mlflow]"), run, resume=True, progress=False)
    (resumed,) = client.search_runs([experiment.experiment_id])  # the same run, not a second one
    assert resumed.info.run_id == found.info.run_id and resumed.info.status == "FINISHED"
    assert 3 in {m.step for m in client.get_metric_history(found.info.run_id, "train/loss")}


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train(make_recipe(tmp_path, "train.iters=2", "train.loggers=[jsonl,wandb]"), run, progress=False)
    (offline,) = (run / "wandb").glob("offline-run-*")
    assert list(offline.glob("*.wandb"))  # the run's records, for `wandb sync` to upload
    assert [r["iter"] for r in read_metrics(run) if r["kind"] == "train"] == [1, 2]
    run_id = (run / "wandb" / "emactl-run-id").read_text().strip()
    assert offline.name.endswith("-" + run_id)
    train(make_recipe(tmp_path, "train.iters=3", "train.loggers=[jsonl,wandb]"), run, resume=True, progress=False)
    segments = sorted((run / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(d.name.endswith("-" + run_id) for d in segments)  # one run, synced together
